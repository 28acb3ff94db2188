"""What other capabilities may see of membership: a read-only view and the events.

Shells (transfer, local decisions, routed inference) are handed a `MembershipView` and
subscribe to `MemberEvent`s through the node; they never hold the SWIM core itself, so
nothing outside membership can change what a node believes about its peers. The one
thing another capability may write is this node's own metadata (`MetadataBoard`), which
the distributor uses to announce what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from mesh.membership.core import Membership
from mesh.membership.messages import MemberEvent, MemberView

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
    """The `MembershipView` (and `MetadataBoard`) of a SWIM core: what the node hands to shells."""

    def __init__(self, core: Membership) -> None:
        self._core = core

    @property
    def node_id(self) -> str:
        return self._core.node_id

    def members(self) -> list[MemberView]:
        return self._core.members()

    def member(self, node_id: str) -> MemberView | None:
        return self._core.member(node_id)

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
