"""Camera streams in the node's data path: Infer requests follow the site's routing
table, this node claims its own streams, a node that membership declares dead has its
streams reassigned, and an overloaded node hands some off, each by a decision that goes
through the guard in the site's Raft group.

I/O shell around `SiteGroup` (Raft + ledger + guard) and the inference servicer; the
plans themselves are pure functions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

import grpc

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.consensus.group import GroupError, SiteGroup
from mesh.consensus.planning import OverloadWatch, plan_offload, plan_reassignment
from mesh.consensus.raft import RaftError
from mesh.guard.core import Decision
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.inference.service import InferenceServicer
from mesh.membership.messages import EventKind, MemberEvent, State
from mesh.membership.view import MembershipView
from mesh.retry import Backoff, retry

log = logging.getLogger("mesh.decisions")

# Set on a forwarded Infer call, so the owner serves it even if its table is momentarily different.
FORWARDED_KEY = "x-mesh-forwarded-by"


class RoutedInference(InferenceServicer):
    """Infer for a stream the routing table gives to another node is forwarded to that node."""

    def __init__(self, runtime, *, node_id: str, group: SiteGroup | None, view: MembershipView,
                 dial: Callable[[str, str], pb_grpc.InferenceStub]) -> None:
        super().__init__(runtime)
        self._node_id = node_id
        self._group = group
        self._view = view
        self._dial = dial
        self.forwarded = 0

    async def Infer(self, request: pb.InferRequest, context) -> pb.InferResponse:
        group = self._group
        metadata = dict(context.invocation_metadata() or ())
        caller = peer_identity(context)
        forwarded = FORWARDED_KEY in metadata and caller is not None and caller.role is Role.NODE
        if not request.stream_id or group is None or forwarded:  # only a fleet node may say "forwarded"
            return await super().Infer(request, context)
        owner = group.routes().get(request.stream_id)
        if owner is None or owner == self._node_id:
            return await super().Infer(request, context)
        member = self._view.member(owner)
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


class StreamReassigner:
    """When membership marks a node of our site dead, the group's leader proposes moving that
    node's streams to the live members with the fewest. The guard decides whether the move may
    happen on its own or waits for an operator."""

    def __init__(self, *, node_id: str, group: SiteGroup, view: MembershipView, site: str,
                 rng: random.Random) -> None:
        self.node_id = node_id
        self.group = group
        self._view = view
        self._site = site
        self._rng = rng
        self._tasks: set[asyncio.Task] = set()
        self.proposed: list[Decision] = []

    def on_member_events(self, events: Sequence[MemberEvent]) -> None:
        """Membership event handler: a member's death starts a reassignment of its streams."""
        for event in events:
            if event.kind is EventKind.DEAD:
                self.on_dead(event.node_id)

    def on_dead(self, dead: str) -> None:
        task = asyncio.create_task(self._reassign(dead), name=f"reassign-{dead}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def orphaned_owners(self) -> list[str]:
        """Route owners that membership reports dead or gone, whose move is not already held."""
        members = {m.node_id: m.state for m in self._view.members()}
        held_from = {m.from_node for h in self.group.pending() for m in h.decision.moves}
        owners = set(self.group.routes().values())
        return sorted(o for o in owners
                      if members.get(o) in (State.DEAD, State.LEFT) and o not in held_from)

    async def reconcile(self, interval_s: float = 5.0) -> None:
        """A death noticed while this node was not the leader (an election, a failed proposal)
        must not strand streams: the leader re-plans for every dead owner on a timer."""
        while True:
            await asyncio.sleep(interval_s)  # the reconciliation period
            try:
                if self.group.raft.is_leader:
                    for owner in self.orphaned_owners():
                        await self._reassign(owner)
            except Exception:  # keep reconciling whatever one round hit
                log.exception("stream reassignment round failed")

    def plan(self, dead: str) -> Decision | None:
        """The reassignment decision for `dead`'s streams (consensus.planning), or None."""
        routes = self.group.routes()
        live = live_site_members(self._view, self._site, exclude=dead)
        if not live and any(owner == dead for owner in routes.values()):
            log.error("streams of %s cannot be reassigned: no live member of site %s", dead, self._site)
        return plan_reassignment(routes, dead, live, group=self.group.group, proposer=self.node_id,
                                 now=time.time(), rng=self._rng)

    async def _reassign(self, dead: str) -> None:
        if not self.group.raft.is_leader:
            return  # the leader proposes; every member would otherwise propose the same move
        decision = self.plan(dead)
        if decision is None:
            return
        self.proposed.append(decision)
        try:
            result = await self.group.propose(decision)
        except (RaftError, GroupError) as exc:
            log.error("could not propose reassigning %s's streams (retried by reconciliation): %s", dead, exc)
            return
        log.info("reassigning %d streams of dead %s: %s (%s)", len(decision.moves), dead,
                 result.outcome.value, result.message)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def claim_streams(group: SiteGroup, streams: Mapping[str, str], *, backoff: Backoff) -> None:
    """Route this device's own streams to it once the group has a leader; the ledger keeps any
    stream already routed elsewhere where it is. Retried with back-off while there is no leader."""

    async def attempt() -> None:
        await group.raft.wait_for_leader(30.0)
        result = await group.set_routes(streams)
        log.info("claimed streams %s: %s", ", ".join(streams), result.message)

    await retry(attempt, retry_on=(RaftError, GroupError, TimeoutError), backoff=backoff,
                what="claiming streams " + ", ".join(streams), log=log)


def live_site_members(view: MembershipView, site: str, *, exclude: str = "") -> list[str]:
    """Node ids of the ALIVE members of `site` (this node included), minus `exclude`."""
    return sorted(m.node_id for m in view.members()
                  if m.state is State.ALIVE and dict(m.labels).get("site") == site and m.node_id != exclude)


async def watch_overload(*, node_id: str, group: SiteGroup, runtime, view: MembershipView,
                         site: str, rng: random.Random, interval_s: float = 5.0) -> None:
    """Propose moving half of this node's streams to its site's least-loaded nodes when its
    inference queue stays long; the guard decides whether that may happen without an operator."""
    watch = OverloadWatch(workers=runtime.workers)
    while True:
        await asyncio.sleep(interval_s)  # the sampling period
        if not watch.sample(runtime.status().pending):
            continue
        decision = plan_offload(group.routes(), node_id, live_site_members(view, site), group=group.group,
                                reason=watch.reason(node_id, interval_s), now=time.time(), rng=rng)
        if decision is None:
            log.warning("%s is overloaded but has no stream it could hand to another node of %s", node_id, site)
            continue
        try:
            result = await group.propose(decision)
        except (RaftError, GroupError) as exc:
            log.error("could not propose moving streams off overloaded %s: %s", node_id, exc)
            continue
        log.info("moving %d streams off overloaded %s: %s (%s)", len(decision.moves), node_id,
                 result.outcome.value, result.message)
