"""Camera streams in the node's data path: Infer requests follow the site's routing
table, this node claims its own streams, a node that membership declares dead has its
streams reassigned (and given back once it has stayed alive a while), and an overloaded
node hands some off, each by a decision that goes through the guard in the site's Raft
group.

I/O shell around `SiteGroup` (Raft + ledger + guard) and the inference servicer; the
plans themselves are pure functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

import grpc

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.consensus.group import GroupError, SiteGroup
from mesh.consensus.planning import OverloadWatch, plan_offload, plan_reassignment
from mesh.consensus.premises import ReturnSchedule, plan_return, stale_holds
from mesh.consensus.raft import RaftError
from mesh.guard.core import Decision, DecisionChange, DecisionKind
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.inference.service import InferenceServicer
from mesh.membership.config import MembershipConfig
from mesh.membership.messages import EventKind, MemberEvent, State
from mesh.membership.view import MembershipView
from mesh.retry import Backoff, retry

log = logging.getLogger("mesh.decisions")

# Set on a forwarded Infer call, so the owner serves it even if its table is momentarily different.
FORWARDED_KEY = "x-mesh-forwarded-by"
# How long a member that was marked dead must stay ALIVE before its streams are returned (the node
# derives it from its membership timings: `StreamReassigner.settle_period_s`).
DEFAULT_RETURN_AFTER_S = 30.0
# Changes a leader remembers having proposed (so it does not re-propose one an operator denied).
MAX_REMEMBERED_PROPOSALS = 256


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
                                f"stream {request.stream_id} is routed to {owner}, which is down; its "
                                "streams are being reassigned (see `mesh admin pending` if the move waits "
                                "for approval)")
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
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
    """The leader's decisions about its site's streams as members die and come back.

    - A member marked DEAD: propose moving its streams to the live members with the fewest
      (`consensus.planning.plan_reassignment`); the guard applies it or holds it.
    - A member ALIVE again: withdraw a held reassignment of its streams (its premise is gone),
      and, once it has stayed ALIVE for `return_after_s`, propose giving it back the streams a
      reassignment took from it that are still where the reassignment put them
      (`consensus.premises`). A held return to a member that is down again is withdrawn.
    - Never propose a change that is already held, or already in flight from this node, and
      never re-propose a change an operator denied.

    Only the group's leader proposes; `reconcile` re-plans on a timer (and at once on a
    membership change, or when a return falls due), so nothing is stranded by an election.
    """

    def __init__(self, *, node_id: str, group: SiteGroup, view: MembershipView, site: str,
                 rng: random.Random, return_after_s: float = DEFAULT_RETURN_AFTER_S) -> None:
        self.node_id = node_id
        self.group = group
        self._view = view
        self._site = site
        self._rng = rng
        self._tasks: set[asyncio.Task] = set()
        self._returns = ReturnSchedule(return_after_s)
        self._in_flight: set[DecisionChange] = set()  # changes of proposals awaiting their outcome
        self._proposed_as: dict[DecisionChange, str] = {}  # change -> id of this node's last proposal of it
        self._wake = asyncio.Event()
        self._next_return_at: float | None = None
        self.proposed: list[Decision] = []
        self.withdrawn: list[str] = []

    @property
    def return_after_s(self) -> float:
        return self._returns.settle_s

    @staticmethod
    def settle_period_s(membership: MembershipConfig, n_members: int) -> float:
        """How long a member must stay ALIVE before its streams are returned: three suspicion timeouts
        (a flapping link is suspected again well within that) and at least one push-pull round (the
        views of both sides of a healed partition have been reconciled). LAN timings give 30 s."""
        return max(3 * membership.suspicion_timeout_s(n_members), membership.push_pull_interval_s)

    def on_member_events(self, events: Sequence[MemberEvent]) -> None:
        """Membership event handler: a death starts a reassignment; a return starts the settle
        period and wakes `reconcile` (which withdraws what the return made stale)."""
        now = time.monotonic()
        for event in events:
            node = event.node_id
            if event.kind is EventKind.DEAD:
                self._returns.down(node)
                self.on_dead(node)
            elif event.kind in (EventKind.SUSPECT, EventKind.LEFT):
                self._returns.down(node)
            elif event.kind is EventKind.ALIVE:
                self._returns.up(node, now, restart=True)
            elif event.kind is EventKind.JOINED:
                self._returns.up(node, now)
            else:
                continue
            member = self._view.member(node)
            if member is None or dict(member.labels).get("site") == self._site:
                self._wake.set()  # a member of this site changed: re-plan now, not at the next tick

    def on_dead(self, dead: str) -> None:
        task = asyncio.create_task(self._reassign(dead), name=f"reassign-{dead}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def orphaned_owners(self) -> list[str]:
        """Route owners that membership reports dead or gone, whose move is not already held."""
        members = {m.node_id: m.state for m in self._view.members()}
        held_from = {m.from_node for h in self.group.pending()
                     if h.decision.kind is DecisionKind.REASSIGN_STREAMS for m in h.decision.moves}
        owners = set(self.group.routes().values())
        return sorted(o for o in owners
                      if members.get(o) in (State.DEAD, State.LEFT) and o not in held_from)

    async def reconcile(self, interval_s: float = 5.0) -> None:
        """A death noticed while this node was not the leader (an election, a failed proposal)
        must not strand streams, nor a return leave a stale hold: the leader re-plans every
        `interval_s`, at once after a membership change, and when a return falls due."""
        while True:
            delay_s = interval_s
            if self._next_return_at is not None:
                delay_s = min(delay_s, max(0.0, self._next_return_at - time.monotonic()))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns normally when the wait ends in
            # the same loop turn as a cancellation, swallowing it, and this loop then never ends (a node's
            # stop hung on it while members' leave events woke it).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.reconcile_once()
            except Exception:  # keep reconciling whatever one round hit
                log.exception("stream reconciliation round failed")

    async def reconcile_once(self) -> None:
        """One round: withdraw stale holds, reassign dead owners' streams, return streams that are due."""
        now = time.monotonic()
        self._returns.observe(set(live_site_members(self._view, self._site)), now)
        if not self.group.raft.is_leader:
            self._next_return_at = None
            return
        await self.withdraw_stale()
        for owner in self.orphaned_owners():
            await self._reassign(owner)
        await self.return_due(now)

    async def withdraw_stale(self) -> None:
        """Withdraw held reassignments of members that are ALIVE again, and held returns to
        members that are down again (`consensus.premises.stale_holds`)."""
        states = {m.node_id: m.state for m in self._view.members()}
        alive = {n for n, s in states.items() if s is State.ALIVE}
        pending = self.group.pending()
        gone = {n for h in pending for m in h.decision.moves for n in (m.from_node, m.to_node)
                if states.get(n) in (State.DEAD, State.LEFT, None)}
        for stale in stale_holds(pending, alive=alive, gone=gone):
            try:
                result = await self.group.withdraw(stale.decision_id, stale.reason)
            except (RaftError, GroupError) as exc:
                log.error("could not withdraw held decision %s (retried by reconciliation): %s",
                          stale.decision_id, exc)
                continue
            self.withdrawn.append(stale.decision_id)
            log.info("withdrew held decision %s: %s (%s)", stale.decision_id, stale.reason,
                     result.outcome.value)

    async def return_due(self, now: float) -> None:
        """Propose giving back their streams to members ALIVE for `return_after_s` whose streams a
        reassignment took; remember when the next one falls due."""
        routes, displaced = self.group.routes(), self.group.displaced()
        due, self._next_return_at = self._returns.due(routes, displaced, now)
        for home in due:
            decision = plan_return(routes, displaced, home, group=self.group.group, proposer=self.node_id,
                                   alive_for_s=self._returns.alive_for_s(home, now) or 0.0, now=time.time(),
                                   rng=self._rng)
            if decision is not None:
                await self._propose_once(decision, f"returning {len(decision.moves)} streams to {home}")

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
        await self._propose_once(decision, f"reassigning {len(decision.moves)} streams of dead {dead}")

    async def _propose_once(self, decision: Decision, what: str) -> None:
        """Propose `decision` unless the same change is held, in flight from here, or was denied."""
        change = decision.change
        if change in self._in_flight or any(h.decision.change == change for h in self.group.pending()):
            return
        earlier = self._proposed_as.get(change)
        if earlier is not None and self.group.outcome_of(earlier) == "denied":
            return  # an operator said no to exactly this; a different plan may be proposed
        self._in_flight.add(change)
        self.proposed.append(decision)
        try:
            result = await self.group.propose(decision)
        except (RaftError, GroupError) as exc:
            log.error("could not propose %s (retried by reconciliation): %s", what, exc)
            return
        finally:
            self._in_flight.discard(change)
        self._proposed_as.pop(change, None)
        self._proposed_as[change] = decision.decision_id
        while len(self._proposed_as) > MAX_REMEMBERED_PROPOSALS:
            del self._proposed_as[next(iter(self._proposed_as))]
        log.info("%s: %s (%s)", what, result.outcome.value, result.message)

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
            log.warning("%s is overloaded but has no stream it could hand to another node of %s", node_id,
                        site)
            continue
        try:
            result = await group.propose(decision)
        except (RaftError, GroupError) as exc:
            log.error("could not propose moving streams off overloaded %s: %s", node_id, exc)
            continue
        log.info("moving %d streams off overloaded %s: %s (%s)", len(decision.moves), node_id,
                 result.outcome.value, result.message)
