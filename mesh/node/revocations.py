"""Revocations spread from node to node: each node announces the digest of the set it enforces
in its membership metadata ("revocations" section); when a peer announces another digest, the
node fetches that peer's set (Trust.Revocations) and merges it. The set only grows and merging
is a union, so every node converges on every revocation any node holds, including a node that
was offline when the operator revoked. A peer's set is fetched at most once per
`fetch_interval_s`, so a peer announcing a digest that never matches cannot make a node fetch
in a loop; every entry is verified against the operator keys before it counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from mesh._proto import trust_pb2 as pb
from mesh._proto import trust_pb2_grpc as pb_grpc
from mesh.identity.revocation import RevocationError, RevocationSet
from mesh.identity.signing import TrustedKeys
from mesh.identity.trust import TrustStore
from mesh.membership.messages import MemberEvent
from mesh.membership.sections import MetaError, read_section
from mesh.membership.view import MembershipView, MetadataBoard

log = logging.getLogger("mesh.node.revocations")

REVOCATIONS_SECTION = "revocations"


class RevocationGossip:
    """Anti-entropy of revocations: announce our digest, fetch a differing peer's set."""

    def __init__(self, store: TrustStore, *, view: MembershipView, board: MetadataBoard,
                 dial: Callable[[str, str], pb_grpc.TrustStub], trusted: TrustedKeys,
                 now: Callable[[], float], fetch_interval_s: float = 5.0, timeout_s: float = 5.0) -> None:
        self._store = store
        self._view = view
        self._board = board
        self._dial = dial
        self._trusted = trusted
        self._now = now
        self._fetch_interval_s = fetch_interval_s
        self._timeout_s = timeout_s
        self._last_fetch: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    def announce(self) -> None:
        self._board.set_meta(self._store.digest_prefix())

    def on_member_events(self, events: Sequence[MemberEvent]) -> None:
        """Membership event handler: look for peers whose announced set differs from ours."""
        ours = self._store.digest_prefix()
        now = self._now()
        for member in self._view.members():
            if member.node_id == self._view.node_id or self._store.is_revoked_id(member.node_id):
                continue
            try:
                theirs = read_section(member.meta, REVOCATIONS_SECTION)
            except MetaError:
                continue
            if not theirs or theirs == ours:
                continue
            if now - self._last_fetch.get(member.node_id, -float("inf")) < self._fetch_interval_s:
                continue
            self._last_fetch[member.node_id] = now
            task = asyncio.create_task(self._fetch(member.node_id, member.address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch(self, node_id: str, address: str) -> None:
        try:
            reply = await self._dial(address, node_id).Revocations(pb.RevocationsRequest(),
                                                                    timeout=self._timeout_s)
        except (grpc.aio.AioRpcError, OSError) as exc:
            log.debug("could not fetch revocations from %s: %s", node_id, exc)
            return
        try:
            theirs = RevocationSet.from_json(reply.revocations_json, self._trusted)
        except RevocationError as exc:
            log.warning("%s sent a revocation list that does not verify: %s", node_id, exc)
            return
        if self._store.merge(theirs):
            self.announce()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
