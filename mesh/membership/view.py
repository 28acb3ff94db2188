"""What other capabilities may see of membership: a read-only view and the events.

Shells (transfer, local decisions, routed inference) are handed a `MembershipView` and
subscribe to `MemberEvent`s through the node; they never hold the SWIM core itself, so
nothing outside membership can change what a node believes about its peers. The one
thing another capability may write is this node's own metadata (`MetadataBoard`), which
the distributor uses to announce what it holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from mesh.membership.core import Membership
from mesh.membership.messages import MemberEvent, MemberView, State

MemberEventHandler = Callable[[Sequence[MemberEvent]], None]


class MembershipView(Protocol):
    """Read-only: the member table as this node believes it."""

    @property
    def node_id(self) -> str: ...

    def members(self) -> list[MemberView]: ...

    def member(self, node_id: str) -> MemberView | None: ...

    def live_count(self) -> int: ...

    def dissemination_s(self) -> float:
        """About how long an update takes to reach every live member (for hold-offs)."""
        ...


class MetadataBoard(Protocol):
    """This node's own metadata blob, gossiped with its membership entry."""

    @property
    def meta_limit_bytes(self) -> int: ...

    def set_meta(self, meta: bytes) -> None: ...


class CoreView:
    """The `MembershipView` (and `MetadataBoard`) of a SWIM core: what the node hands to shells.

    `revoked(node_id)` names members an operator revoked: the view reports them DEAD whatever
    gossip says, so no shell fetches from them, routes to them or counts them, from the moment
    the revocation arrives (SWIM then marks them dead too: no node answers or dials them)."""

    def __init__(self, core: Membership, revoked: Callable[[str], bool] = lambda node_id: False) -> None:
        self._core = core
        self._revoked = revoked

    def _overlay(self, member: MemberView) -> MemberView:
        if member.state in (State.DEAD, State.LEFT) or not self._revoked(member.node_id):
            return member
        # Dead since forever: nothing may take a revoked member for one that died a moment ago.
        return dataclasses.replace(member, state=State.DEAD, state_since=-math.inf)

    @property
    def node_id(self) -> str:
        return self._core.node_id

    def members(self) -> list[MemberView]:
        return [self._overlay(m) for m in self._core.members()]

    def member(self, node_id: str) -> MemberView | None:
        member = self._core.member(node_id)
        return None if member is None else self._overlay(member)

    def live_count(self) -> int:
        return self._core.live_count()

    def dissemination_s(self) -> float:
        return self._core.config.dissemination_s(self._core.live_count())

    @property
    def meta_limit_bytes(self) -> int:
        return self._core.meta_limit_bytes

    def set_meta(self, meta: bytes) -> None:
        self._core.set_meta(meta)


def fan_out(*handlers: MemberEventHandler) -> MemberEventHandler:
    """One membership event handler that calls each of `handlers` in order."""

    def handle(events: Sequence[MemberEvent]) -> None:
        for handler in handlers:
            handler(events)

    return handle
