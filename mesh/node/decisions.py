"""The node's local decisions in its data path: Infer requests follow the site's
routing table, and a node that membership declares dead has its streams
reassigned by a decision that goes through the guard.

I/O shell around `SiteGroup` (Raft + ledger + guard) and the inference servicer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable

import grpc

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.consensus.group import SiteGroup
from mesh.consensus.raft import RaftError
from mesh.guard.core import Decision, DecisionKind, StreamMove
from mesh.inference.service import InferenceServicer
from mesh.membership.core import Membership
from mesh.membership.messages import State

log = logging.getLogger("mesh.decisions")

# Set on a forwarded Infer call, so the owner serves it even if its table is momentarily different.
FORWARDED_KEY = "x-mesh-forwarded-by"


class RoutedInference(InferenceServicer):
    """Infer for a stream the routing table gives to another node is forwarded to that node."""

    def __init__(self, runtime, *, node_id: str, group: Callable[[], SiteGroup | None],
                 membership: Callable[[], Membership],
                 dial: Callable[[str, str], pb_grpc.InferenceStub]) -> None:
        super().__init__(runtime)
        self._node_id = node_id
        self._group = group
        self._membership = membership
        self._dial = dial
        self.forwarded = 0

    async def Infer(self, request: pb.InferRequest, context) -> pb.InferResponse:
        group = self._group()
        metadata = dict(context.invocation_metadata() or ())
        if not request.stream_id or group is None or FORWARDED_KEY in metadata:
            return await super().Infer(request, context)
        owner = group.routes().get(request.stream_id)
        if owner is None or owner == self._node_id:
            return await super().Infer(request, context)
        member = self._membership().member(owner)
        if member is None or member.state not in (State.ALIVE, State.SUSPECT):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"stream {request.stream_id} is routed to {owner}, which is down; its streams "
                                "are being reassigned (see `mesh admin pending` if the move waits for approval)")
        remaining_s = context.time_remaining()
        try:
            reply = await self._dial(member.address, owner).Infer(
                request, timeout=remaining_s if remaining_s is not None else 10.0,
                metadata=((FORWARDED_KEY, self._node_id),))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"forwarded to {owner} (owner of stream {request.stream_id}): "
                                            f"{exc.details()}")
        self.forwarded += 1
        return reply


class DeathReassigner:
    """When membership marks a node of our site dead, the group's leader proposes moving that
    node's streams to the live members with the fewest. The guard decides whether the move may
    happen on its own or waits for an operator."""

    def __init__(self, *, node_id: str, group: SiteGroup, membership: Callable[[], Membership],
                 site: str) -> None:
        self.node_id = node_id
        self.group = group
        self._membership = membership
        self._site = site
        self._tasks: set[asyncio.Task] = set()
        self.proposed: list[Decision] = []

    def on_dead(self, dead: str) -> None:
        task = asyncio.create_task(self._reassign(dead), name=f"reassign-{dead}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def plan(self, dead: str) -> Decision | None:
        """The reassignment decision for `dead`'s streams, or None if it served none."""
        routes = self.group.routes()
        streams = sorted(s for s, owner in routes.items() if owner == dead)
        if not streams:
            return None
        live = sorted(m.node_id for m in self._membership().members()
                      if m.state is State.ALIVE and dict(m.labels).get("site") == self._site and m.node_id != dead)
        if not live:
            log.error("streams of %s cannot be reassigned: no live member of site %s", dead, self._site)
            return None
        load = Counter(owner for owner in routes.values() if owner in live)
        moves = []
        for stream in streams:
            target = min(live, key=lambda n: (load[n], n))
            load[target] += 1
            moves.append(StreamMove(stream, dead, target))
        return Decision(kind=DecisionKind.REASSIGN_STREAMS, group=self.group.group, proposer=self.node_id,
                        reason=f"{dead} was marked dead by membership", proposed_at=time.time(),
                        nonce=secrets.token_hex(8), moves=tuple(moves))

    async def _reassign(self, dead: str) -> None:
        if not self.group.raft.is_leader:
            return  # the leader proposes; every member would otherwise propose the same move
        decision = self.plan(dead)
        if decision is None:
            return
        self.proposed.append(decision)
        try:
            result = await self.group.propose(decision)
        except RaftError as exc:
            log.error("could not propose reassigning %s's streams: %s", dead, exc)
            return
        log.info("reassigning %d streams of dead %s: %s (%s)", len(decision.moves), dead,
                 result.outcome.value, result.message)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
