"""Canary rollouts on a node: the shell around the pure rollout cores.

Every node with a site group runs one `RolloutShell`. Each step (every `interval_s`, and at once when its
site's rollout state changes) it:

1. reads the fleet from membership (`fleet.PeerView`: each member's health counters and rollout notes);
2. anti-entropy: fetches, from a peer that announces them, the documents of rollouts it does not hold or
   whose operator commands differ from its own (`GetRollout`), and keeps only what verifies here;
3. as its site group's leader: registers plans with the site, proposes the operator commands the site has
   not applied, rolls back when another site announces an abort (`PeerAborted`), starts a registered
   plan once its members have announced it, and runs each rollout's health gate, proposing what
   `state.proposals` says (the guard decides in every replica's apply);
4. as a device: decides what to serve across the rollouts of its model (`fleet.steer_device`), and
   steers the activator (validated atomic swap, also for a rollback) and the distributor (pins, no
   fetch of a target it must not prefetch);
5. publishes its health counters (`health` section) and its rollout notes (`rollouts` section).

After a restart the device activates nothing until a read barrier through its site leader has made its
replica current (so it never activates the target of a rollout aborted while it was away); with no
leader reachable for `sync_timeout_s` it acts on its last committed state, in the safe direction only.

`SiteVersionRouting` keeps routed Infer for a stream on a device that runs a version its site is on.
`RolloutCollector` exports the rollout metrics (deploy/prometheus/METRICS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mesh._proto import inference_pb2 as inference_pb
from mesh._proto import inference_pb2_grpc as inference_pb_grpc
from mesh._proto import rollout_pb2 as pb
from mesh._proto import rollout_pb2_grpc as pb_grpc
from mesh.artifacts.store import ArtifactStore
from mesh.consensus.group import GroupError, SiteGroup
from mesh.consensus.raft import RaftError
from mesh.identity.ca import Role
from mesh.identity.signing import TrustedKeys
from mesh.identity.tls import peer_identity
from mesh.inference.activation import Steering
from mesh.inference.counts import LATENCY_BUCKETS_S, VersionHealth
from mesh.inference.runtime import ModelRuntime
from mesh.inference.service import InferenceServicer
from mesh.membership.messages import EventKind, MemberEvent, MemberView, State
from mesh.membership.sections import MetaError, read_section
from mesh.membership.view import MembershipView, MetadataBoard
from mesh.node.streams import FORWARDED_KEY, RoutedInference
from mesh.rollout import fleet
from mesh.rollout.announce import (
    AnnounceFormatError,
    RolloutNote,
    Serving,
    WaveEvidence,
    decode_notes,
    encode_notes,
)
from mesh.rollout.docs import DocumentRefused, RolloutDocs, command_digest
from mesh.rollout.health import (
    FoldedEvidence,
    GateOutcome,
    GateVerdict,
    HealthFormatError,
    NodeHealth,
    RolloutSkip,
    SiteEvidence,
    VersionCounters,
    decode_node_health,
    encode_node_health,
    evaluate_gate,
)
from mesh.rollout.plan import (
    CommandAction,
    CommandRefused,
    DeviceFacts,
    MalformedCommand,
    PlanExpiredError,
    PlanFormatError,
    PlanSignatureError,
    RolloutCommand,
    RolloutError,
    RolloutPlan,
    SignedPlan,
    signature_digest,
    verify_command,
    verify_plan,
)
from mesh.rollout.report import rollout_report, rollout_summary
from mesh.rollout.state import (
    Expire,
    LedgerResult,
    OperatorInput,
    Outcome,
    PeerAborted,
    RolloutState,
    SiteRollout,
    encode_input,
    plan_command,
    proposals,
)

log = logging.getLogger("mesh.rollout")

HEALTH_SECTION = "health"
ROLLOUTS_SECTION = "rollouts"
MAX_PARALLEL_FETCHES = 4
_PAUSE_RESUME = (CommandAction.PAUSE, CommandAction.RESUME)


@dataclass(frozen=True)
class RolloutSettings:
    """How a node runs its rollouts (timings; the plan says everything else)."""

    interval_s: float = 1.0  # the leader's gate interval; devices decide at least this often
    min_step_s: float = 0.1  # steps woken by changes come at most this often
    start_grace_s: float = 3.0  # a new plan starts once every selected member announced it, or after this
    fetch_timeout_s: float = 2.0
    propose_timeout_s: float = 3.0
    sync_timeout_s: float = 10.0  # after a restart: act on the last committed state after this long
    # Sites mode: a new plan starts once the representatives' views count every site they see, or after
    # this long; a representative's view is used by its site leader while younger than fleet_max_age_s
    # (None: `fleet_max_age`).
    fleet_start_grace_s: float = 30.0
    fleet_max_age_s: float | None = None

    @property
    def fleet_max_age(self) -> float:
        """Three polls, or two that time out and one more (a slow representative is not dropped at once)."""
        if self.fleet_max_age_s is not None:
            return self.fleet_max_age_s
        return max(3 * self.interval_s, 2 * self.fetch_timeout_s + self.interval_s)


@dataclass(frozen=True)
class SitesHooks:
    """Sites mode (`[membership] pools = "sites"`), from FederationMember: whether this node represents its
    site in the federation pool now, and who does (the members this node's own view chooses that also say
    so: a member that merely claims the role is not asked)."""

    active: Callable[[], bool]
    representatives: Callable[[], Sequence[str]]


DialRollouts = Callable[[str, str], pb_grpc.RolloutsStub]
# Sites mode: fleet views with wave sizes a representative computes an interval at most (its site leader
# asks for one per interval while a rollout is pending; apportioning costs in proportion to the fleet).
SIZED_VIEWS_PER_INTERVAL = 2
# A refused fleet view is logged at INFO at most once a minute per caller (callers are mTLS identities);
# at most this many callers are remembered, and past them refusals log at DEBUG until some expire.
REFUSAL_LOG_INTERVAL_S = 60.0
MAX_REFUSALS_REMEMBERED = 1024


class RolloutShell:
    """One node's part in the fleet's rollouts (see the module doc)."""

    def __init__(
        self,
        *,
        node_id: str,
        site: str,
        labels: dict[str, str],
        model: str | None,
        group: SiteGroup,
        view: MembershipView,
        health_board: MetadataBoard,
        notes_board: MetadataBoard,
        runtime: ModelRuntime | None,
        steer: Callable[[Steering], None],
        refused: Callable[[], Set[str]],
        history: Callable[[], Sequence[tuple[float, str]]],
        store: ArtifactStore,
        data_dir: Path,
        trusted: TrustedKeys,
        dial: DialRollouts,
        settings: RolloutSettings | None = None,
        sites: SitesHooks | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        # Sites mode: this node sees only its site (and, as a representative, the other sites'
        # representatives); the rest of the fleet reaches its site leader as representatives' FleetViews.
        self._sites = sites
        self._last_peers: list[fleet.PeerView] = []
        self._fleet_views: dict[str, dict[str, tuple[float, fleet.FleetView]]] = {}  # rollout -> rep -> view
        self._fleet_polls: dict[tuple[str, str], asyncio.Task] = {}
        self._fleet_polled_at: dict[str, float] = {}
        self._view_misses: dict[tuple[str, str], str] = {}  # (rollout, rep) -> why its last poll gave no view
        self._view_cache: dict[tuple[str, int | None], tuple[float, fleet.FleetView]] = {}
        self._relayed_abort_at: dict[str, float] = {}
        self._abort_seen_at: dict[str, float] = {}
        self._sized_at: list[float] = []  # when this representative computed fleet views with sizes
        self._refusal_logged_at: dict[str | None, float] = {}  # caller -> when a view refusal was logged
        self._closed = False
        self.site = site
        self.labels = dict(labels)
        self.model = model
        self.group = group
        self.settings = settings or RolloutSettings()
        self.docs = RolloutDocs(trusted)
        self._view = view
        self._health_board = health_board
        self._notes_board = notes_board
        self._runtime = runtime
        self._steer = steer
        self._refused = refused
        self._history = history
        self._store = store
        self._data_dir = data_dir
        self._dial = dial
        self._clock = clock
        self._monotonic = monotonic
        self._epoch = int(clock() * 1000)  # counters restart from zero with each run of the node
        self._started_at = monotonic()
        self._wake = asyncio.Event()
        self._synced = False
        self._safe_only = False
        self._active: str | None = None
        self._active_since = monotonic()
        self._active_s: dict[str, float] = {}
        self._history_seen = -float("inf")  # time of the last activation counted in `served`
        self.served: set[str] = set()  # every version of its model this node has activated in this run
        self.steering = fleet.DeviceSteering()
        self._peer_cache: dict[str, tuple[tuple, fleet.PeerView]] = {}
        self._notes_seen: dict[str, bytes] = {}
        self._free_disk: tuple[float, int] = (-float("inf"), 0)
        self._bad_meta_logged: set[str] = set()
        self._fetches: dict[str, asyncio.Task] = {}
        self._fetched: dict[tuple[str, str], tuple[str, str]] = {}
        self._site_views: dict[tuple[str, str], dict[str, Any]] = {}  # (site, rollout) -> what a peer said
        self._verdicts: dict[str, GateVerdict] = {}
        self._passed: dict[str, WaveEvidence] = {}
        self._gated_at: dict[str, float] = {}
        self._plan_refused: dict[str, str] = {}
        self._commands_refused: set[str] = set()
        self._health_at = -float("inf")
        self._was_leader = False
        self.gate_counts: dict[tuple[str, str], int] = {}  # (rollout, pass|fail|wait) -> evaluations here
        self.rollbacks: dict[str, int] = {}  # rollout -> swaps back to its baseline on this node
        self.steps = 0
        self.step_s = 0.0  # time spent in steps (CPU of the loop, mostly): what rollouts cost a node

    # --- the loop ---------------------------------------------------------------------------

    def on_member_events(self, events: Sequence[MemberEvent]) -> None:
        """Membership handler: look again when a peer's rollout notes changed (an abort elsewhere, new
        documents) or a member came or went; health counters alone wait for the next interval."""
        for event in events:
            if event.kind is not EventKind.META:
                self._wake.set()
                return
            member = self._view.member(event.node_id)
            if member is None:
                continue
            try:
                notes = read_section(member.meta, ROLLOUTS_SECTION)
            except MetaError:
                continue
            if self._notes_seen.get(event.node_id) != notes:
                self._notes_seen[event.node_id] = notes
                self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # one bad round must not end rollouts on this node
                log.exception("rollout step failed on %s", self.node_id)
            await asyncio.sleep(self.settings.min_step_s)
            timeout_s = self._next_wake_s()
            changed = asyncio.ensure_future(self.group.rollout_changed(timeout_s))
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({changed, woken}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (changed, woken):
                    task.cancel()
                await asyncio.gather(changed, woken, return_exceptions=True)
            self._wake.clear()

    def _next_wake_s(self) -> float:
        """Until the next step: the interval, or sooner when a wave this node's site soaks ends (its leader
        judges it then, not up to an interval later)."""
        wake_s = self.settings.interval_s
        if self.group.raft.is_leader:
            now = self._clock()
            for plan, rollout in self.group.rollouts():
                if rollout.state is RolloutState.SOAKING and rollout.soak_started_at is not None:
                    left_s = rollout.soak_started_at + plan.wave(rollout.wave).soak_s - now
                    if left_s > 0:
                        wake_s = min(wake_s, left_s + 0.01)
        return max(wake_s, 0.01)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._fetches.values()) + list(self._fleet_polls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def step(self) -> None:
        started = time.perf_counter()
        try:
            await self._step()
        finally:
            self.steps += 1
            self.step_s += time.perf_counter() - started

    async def _step(self) -> None:
        now = self._clock()
        self._observe_active()
        await self._catch_up()
        self._docs_from_ledger(now)
        peers = self.peers()
        self._last_peers = peers
        self._anti_entropy(peers)
        leader = self.group.raft.is_leader
        if self._representing() and not leader:
            await self._relay_aborts(peers, now)
        if leader:
            await self._lead(peers, now)
        elif self._was_leader:
            self._verdicts.clear()
            self._view_misses.clear()  # a leader's; a later term polls afresh
        self._was_leader = leader
        self._steer_device(peers, now)
        self._publish(now)

    # --- catching up after a restart -----------------------------------------------------

    async def _catch_up(self) -> None:
        if self._synced:
            return
        try:
            await self.group.sync(timeout_s=min(1.0, self.settings.interval_s))
        except (RaftError, GroupError):
            if not self._safe_only and self._monotonic() - self._started_at >= self.settings.sync_timeout_s:
                self._safe_only = True
                log.warning(
                    "%s: no leader of %s reachable for %.0f s; acting on its last committed rollout "
                    "state, in the safe direction only (rollbacks, no new target)",
                    self.node_id,
                    self.group.group,
                    self.settings.sync_timeout_s,
                )
            return
        self._synced, self._safe_only = True, False

    # --- reading the fleet -------------------------------------------------------------------

    def peers(self) -> list[fleet.PeerView]:
        """Every member (this node included) as the rollout cores read it."""
        out = []
        now = self._monotonic()
        for member in self._view.members():
            # A member declared dead moments ago still counts as present (`fleet.member_present`).
            dead_for_s = now - member.state_since if member.state is State.DEAD else None
            recently_dead = dead_for_s is not None and fleet.member_present(False, dead_for_s)
            key = (member.incarnation, member.meta_version, member.state, member.labels, recently_dead)
            cached = self._peer_cache.get(member.node_id)
            if cached is not None and cached[0] == key:
                out.append(cached[1])
                continue
            peer = self._peer_view(member, recently_dead)
            self._peer_cache[member.node_id] = (key, peer)
            out.append(peer)
        if len(self._peer_cache) > 2 * len(out) + 16:  # members gone for good (federation churn, say)
            current = {p.node_id for p in out}
            for cache in (self._peer_cache, self._notes_seen):
                for node_id in [n for n in cache if n not in current]:
                    del cache[node_id]
        return out

    def _peer_view(self, member: MemberView, recently_dead: bool = False) -> fleet.PeerView:
        labels = dict(member.labels)
        health: NodeHealth | None = None
        notes: tuple[RolloutNote, ...] = ()
        try:
            raw_health = read_section(member.meta, HEALTH_SECTION)
            health = decode_node_health(raw_health) if raw_health else None
            notes = decode_notes(read_section(member.meta, ROLLOUTS_SECTION))
        except (MetaError, HealthFormatError, AnnounceFormatError) as exc:
            if member.node_id not in self._bad_meta_logged:
                self._bad_meta_logged.add(member.node_id)
                log.warning("ignoring the rollout metadata of %s: %s", member.node_id, exc)
        return fleet.PeerView(
            member.node_id,
            labels.get("site", ""),
            tuple(sorted(labels.items())),
            member.state is State.ALIVE,
            health,
            notes,
            present=member.state in (State.ALIVE, State.SUSPECT) or recently_dead,
        )

    def _address(self, node_id: str) -> str | None:
        member = self._view.member(node_id)
        return None if member is None else member.address

    # --- documents -----------------------------------------------------------------------------

    def _docs_from_ledger(self, now: float) -> None:
        """Plans the site registered (proposed by another member) are documents this node hands on."""
        for plan, _ in self.group.rollouts():
            if self.docs.plan(plan.rollout_id) is None:
                signed = self.group.signed_plan(plan.rollout_id)
                if signed is not None:
                    try:
                        self.docs.add_plan(signed, now=now)
                    except DocumentRefused as exc:
                        log.debug("not handing on %s: %s", plan.label, exc)
        self.docs.forget_expired(now)
        if self._sites is not None:  # what sites mode keeps per rollout, for live rollouts only
            live = {p.rollout_id for p, r in self.group.rollouts() if not r.state.final}
            live |= {p.rollout_id for p in self.docs.plans() if self.group.rollout(p.rollout_id) is None}
            for table in (
                self._fleet_views,
                self._fleet_polled_at,
                self._relayed_abort_at,
                self._abort_seen_at,
            ):
                for rid in [k for k in table if k not in live]:
                    del table[rid]
            for key in [k for k in self._view_misses if k[0] not in live]:  # late poll results too
                del self._view_misses[key]

    def _anti_entropy(self, peers: list[fleet.PeerView]) -> None:
        """Fetch documents a peer announces and this node lacks (bounded, never the same twice)."""
        for peer in peers:
            if peer.node_id == self.node_id or not peer.reachable:
                continue
            for note in peer.notes:
                mine = self.docs.plan(note.rollout_id)
                if mine is not None and not note.matches(mine.digest):
                    continue  # another plan under a known id: never ours to take
                if self.docs.refused(note.plan_digest) is not None:
                    continue
                count, digest = self.docs.note_digests(note.rollout_id)
                if mine is not None and (note.commands == 0 or note.commands_digest == digest):
                    continue
                wanted = (note.plan_digest, note.commands_digest)
                if self._fetched.get((peer.node_id, note.rollout_id)) == wanted:
                    continue
                if note.rollout_id in self._fetches or len(self._fetches) >= MAX_PARALLEL_FETCHES:
                    continue
                self._fetched[(peer.node_id, note.rollout_id)] = wanted
                task = asyncio.create_task(
                    self._fetch_documents(peer, note.rollout_id),
                    name=f"rollout-fetch-{note.rollout_id}-{self.node_id}",
                )
                self._fetches[note.rollout_id] = task
                task.add_done_callback(functools.partial(self._fetch_done, note.rollout_id))

    def _fetch_done(self, rollout_id: str, _task: asyncio.Task[Any]) -> None:
        self._fetches.pop(rollout_id, None)

    async def _fetch_documents(self, peer: fleet.PeerView, rollout_id: str) -> pb.RolloutDocuments | None:
        reply = await self._get_rollout(peer, rollout_id)
        if reply is None:
            # Not reached (a timeout on a busy peer): ask again in a later round, or a document only this
            # peer announces would never be fetched (nor, if forged, refused) while its note is unchanged.
            self._fetched.pop((peer.node_id, rollout_id), None)
            return None
        now = self._clock()
        added = False
        if reply.signed_plan_json:
            try:
                signed = SignedPlan.from_json(reply.signed_plan_json.encode())
                if signed.plan.rollout_id != rollout_id:
                    raise DocumentRefused(
                        f"{peer.node_id} answered {rollout_id} with {signed.plan.label}", "wrong_rollout"
                    )
                added = self.docs.plan(rollout_id) is None
                self.docs.add_plan(signed, now=now)
            except (PlanFormatError, DocumentRefused) as exc:
                log.warning("refusing the plan of %s served by %s: %s", rollout_id, peer.node_id, exc)
                return reply
        for text in reply.command_json:
            try:
                added |= self.docs.add_command(RolloutCommand.from_json(text.encode()), now=now)
            except (MalformedCommand, DocumentRefused) as exc:
                log.warning("refusing a command of %s served by %s: %s", rollout_id, peer.node_id, exc)
        if added:
            log.info("%s learnt documents of rollout %s from %s", self.node_id, rollout_id, peer.node_id)
            self._wake.set()
        return reply

    async def _get_rollout(self, peer: fleet.PeerView, rollout_id: str) -> pb.RolloutDocuments | None:
        address = self._address(peer.node_id)
        if address is None:
            return None
        try:
            reply = await self._dial(address, peer.node_id).GetRollout(
                pb.GetRolloutRequest(rollout_id=rollout_id), timeout=self.settings.fetch_timeout_s
            )
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            log.debug("rollout %s from %s: %s", rollout_id, peer.node_id, code)
            return None
        if reply.site_state_json:
            with contextlib.suppress(ValueError):  # a peer's malformed view is only not remembered
                state = json.loads(reply.site_state_json)
                verdict = json.loads(reply.verdict_json) if reply.verdict_json else None
                if isinstance(state, dict) and (verdict is None or isinstance(verdict, dict)):
                    self._site_views[(peer.site, rollout_id)] = {
                        "node": peer.node_id,
                        "at": self._clock(),
                        "state": state,
                        "verdict": verdict,
                    }
        return reply

    def _log_view_refusal(self, caller: str | None, site_eligible: int | None, members: int) -> None:
        """A fleet view refused: logged at INFO once per caller and interval (a caller that keeps asking,
        misconfigured or hostile, does not fill the log), else at DEBUG."""
        now_m = self._monotonic()
        level = logging.DEBUG
        if now_m - self._refusal_logged_at.get(caller, -math.inf) >= REFUSAL_LOG_INTERVAL_S:
            if len(self._refusal_logged_at) >= MAX_REFUSALS_REMEMBERED:
                self._refusal_logged_at = {
                    c: t for c, t in self._refusal_logged_at.items() if now_m - t < REFUSAL_LOG_INTERVAL_S
                }
            if len(self._refusal_logged_at) < MAX_REFUSALS_REMEMBERED:
                self._refusal_logged_at[caller] = now_m
                level = logging.INFO
        log.log(
            level,
            "%s: no fleet view for %s (%s eligible): only for a member of site %s, with at most its %d "
            "members",
            self.node_id,
            caller,
            site_eligible,
            self.site,
            members,
        )

    def documents(
        self,
        rollout_id: str,
        site_eligible: int | None = None,
        caller: str | None = None,
        *,
        fleet_view: bool = False,
    ) -> pb.RolloutDocuments:
        """What this node answers a peer's GetRollout with; with `fleet_view`, from a representative in sites
        mode, its view of the rest of the fleet too (`fleet_json`; with this site's wave sizes for
        `site_eligible` devices): only for a member of its own site (`caller`), for a count its site can
        have, and at most SIZED_VIEWS_PER_INTERVAL views with sizes an interval (apportioning the waves
        costs in proportion to the fleet's devices; a started site asks for none)."""
        signed = self.docs.signed_plan(rollout_id)
        reply = pb.RolloutDocuments(rollout_id=rollout_id, node_id=self.node_id, site=self.site)
        if signed is not None:
            reply.signed_plan_json = signed.to_json().decode()
            reply.command_json.extend(c.to_json().decode() for c in self.docs.commands(rollout_id))
        known = self.group.rollout(rollout_id)
        if known is not None:
            reply.site_state_json = json.dumps(_site_state_doc(*known))
        verdict = self._verdicts.get(rollout_id)
        if verdict is not None and self.group.raft.is_leader:
            reply.verdict_json = json.dumps(_verdict_doc(verdict))
        if (fleet_view or site_eligible is not None) and self._representing():
            plan = self.docs.plan(rollout_id) or (known[0] if known is not None else None)
            site_members = {p.node_id for p in self._last_peers if p.site == self.site}
            if caller not in site_members or (site_eligible or 0) > len(site_members):
                self._log_view_refusal(caller, site_eligible, len(site_members))
            elif plan is not None:
                view = self._fleet_view(plan, site_eligible)
                if view is not None:
                    reply.fleet_json = view.to_json().decode()
        decision = self.steering.decisions.get(rollout_id)
        if decision is not None:
            reply.device_json = json.dumps(
                {
                    "version": decision.version,
                    "reason": decision.reason,
                    "skip": None if decision.skip is None else decision.skip.kind.value,
                }
            )
        return reply

    # --- the leader's part ---------------------------------------------------------------------

    async def _lead(self, peers: list[fleet.PeerView], now: float) -> None:
        for plan in self.docs.plans():
            try:
                await self._lead_one(plan, peers, now)
            except (RaftError, GroupError) as exc:
                log.info("%s: rollout %s: %s (next round retries)", self.node_id, plan.rollout_id, exc)

    async def _lead_one(self, plan: RolloutPlan, peers: list[fleet.PeerView], now: float) -> None:
        rid = plan.rollout_id
        known = self.group.rollout(rid)
        if known is None:
            await self._register(plan, now)
            return
        plan, rollout = known
        if rollout.state.final:
            return
        if plan.expired(now):
            await self._propose(encode_input(rid, Expire(now)))
            return
        if await self._propose_commands(plan, rollout, now):
            known = self.group.rollout(rid)
            assert known is not None
            plan, rollout = known
            if rollout.state.final:
                return
        views: dict[str, fleet.FleetView] = {}
        # Another site aborted it (a leader that represents its site sees that site's representatives).
        aborted = fleet.aborted_elsewhere(plan, self.site, peers)
        if self._sites is not None and aborted is None:
            # Sites mode: this site's members only; the rest of the fleet as its representatives see it.
            peers = [p for p in peers if p.site == self.site]
            views = self._views_of(plan, peers, sized=rollout.state is RolloutState.PENDING)
            aborted_view = next((v for v in views.values() if v.aborted_site is not None), None)
            if aborted_view is not None and aborted_view.aborted_site is not None:
                # The representative that saw it proposes the abort with the other site's reason itself
                # (`_relay_aborts`), and its view carries the reason once it has fetched it; the abort
                # goes ahead with what is known after a while. Meanwhile nothing starts or passes.
                first_seen = self._abort_seen_at.setdefault(rid, self._monotonic())
                reason = aborted_view.aborted_reason
                if reason or self._monotonic() - first_seen >= 2 * self.settings.interval_s:
                    reason = reason or (
                        f"announced aborted by site {aborted_view.aborted_site} (seen by this site's "
                        "representatives)"
                    )
                    await self._propose(
                        encode_input(rid, PeerAborted(now, aborted_view.aborted_site, reason))
                    )
                return
        if aborted is not None:
            reason = await self._abort_reason(plan, aborted)
            await self._propose(encode_input(rid, PeerAborted(now, aborted.site, reason)))
            return
        if rollout.state is RolloutState.PENDING:
            if fleet.start_ready(
                plan, peers, registered_at=rollout.updated_at, now=now, grace_s=self.settings.start_grace_s
            ):
                if self._sites is None:
                    start = fleet.start_input(plan, self.site, peers, now)
                else:
                    view = self._start_view(plan, rollout, peers, views, now)
                    if view is None:
                        return
                    start = fleet.start_input(plan, self.site, peers, now, fleet=view)
                result = await self._propose(encode_input(rid, start))
                if result is not None:
                    log.info("%s: %s", self.group.group, result.message)
            return
        if rollout.wave == 0:
            return  # wave 1 held for an operator: nothing to judge yet
        soak_end = (rollout.soak_started_at or now) + plan.wave(rollout.wave).soak_s
        last = self._gated_at.get(rid, -float("inf"))
        if now - last < self.settings.interval_s * 0.9 and not last < soak_end <= now:
            return
        self._gated_at[rid] = now
        members = [p.node_id for p in peers if p.site == self.site and fleet.selected(plan, p)]

        def judge(remote: Sequence[SiteEvidence] | FoldedEvidence) -> GateVerdict:
            return evaluate_gate(
                plan,
                rollout.wave,
                cohort=rollout.cohort(members),
                reports=fleet.gate_reports(plan, self.site, peers),
                marks=rollout.marks_map(),
                soak_started_at=rollout.soak_started_at or now,
                now=now,
                remote=remote,
                site=self.site,
                earlier=rollout.cohort(members, rollout.wave - 1) if rollout.wave > 1 else (),
            )

        if self._sites is None:
            verdict = judge(fleet.remote_evidence(plan, self.site, peers))
        else:
            verdict = fleet.sites_verdict(plan, judge, views)  # each representative's view judged
        previous = self._verdicts.get(rid)
        passed = self._passed.get(rid)
        if (
            previous is not None
            and previous.wave < verdict.wave
            and previous.outcome is GateOutcome.PASS
            and (passed is None or passed.wave < previous.wave)
        ):
            # The wave moved on by a pass this leader did not see applied. Where it did (the usual case),
            # the pass it proposed stays: later verdicts of that wave (while it waited for an approval)
            # cover the window the next wave's verdicts cover too, and other sites add both up.
            self._passed[rid] = WaveEvidence.of(previous.evidence(self.site))
        self._verdicts[rid] = verdict
        kind = {GateOutcome.PASS: "pass", GateOutcome.FAIL: "fail"}.get(verdict.outcome, "wait")
        self.gate_counts[(rid, kind)] = self.gate_counts.get((rid, kind), 0) + 1
        for step in proposals(plan, rollout, verdict, now):
            result = await self._propose(encode_input(rid, step))
            if result is not None and result.outcome is Outcome.APPLIED:
                log.info("%s: %s", self.group.group, result.message)
                if verdict.outcome is GateOutcome.PASS:
                    self._passed[rid] = WaveEvidence.of(verdict.evidence(self.site))

    # --- sites mode ---------------------------------------------------------------------------------

    def _representing(self) -> bool:
        return self._sites is not None and self._sites.active()

    def _fleet_view(self, plan: RolloutPlan, site_eligible: int | None) -> fleet.FleetView | None:
        """This representative's view of the rest of the fleet for `plan` (cached for half an interval: the
        fold reads every federation member); None if the peers' figures cannot be folded, or when more
        views with sizes were asked for this interval than SIZED_VIEWS_PER_INTERVAL."""
        key = (plan.rollout_id, site_eligible)
        now_m = self._monotonic()
        cached = self._view_cache.get(key)
        if cached is not None and now_m - cached[0] < self.settings.interval_s / 2:
            return cached[1]
        if site_eligible is not None:
            self._sized_at = [t for t in self._sized_at if now_m - t < self.settings.interval_s]
            if len(self._sized_at) >= SIZED_VIEWS_PER_INTERVAL:
                log.debug("%s: no sized fleet view of %s this interval", self.node_id, plan.rollout_id)
                return None
            self._sized_at.append(now_m)
        try:
            view = fleet.fleet_view(plan, self.site, self._last_peers, site_eligible=site_eligible)
        except (RolloutError, ValueError) as exc:  # CohortError, HealthFormatError: peers' figures
            log.warning("%s: no fleet view of %s: %s", self.node_id, plan.rollout_id, exc)
            return None
        if view.aborted_site is not None:
            seen = self._site_views.get((view.aborted_site, plan.rollout_id))
            if seen is not None and seen["state"].get("state") == RolloutState.ABORTED.value:
                reason = str(seen["state"].get("reason", ""))[: fleet.MAX_ABORT_REASON]
                view = dataclasses.replace(view, aborted_reason=reason)
            else:  # ask the aborting site why, for the next view
                aborted = fleet.aborted_elsewhere(plan, self.site, self._last_peers)
                why = (f"why-{plan.rollout_id}", aborted.node_id if aborted is not None else "")
                if aborted is not None and why not in self._fleet_polls and not self._closed:
                    task = asyncio.create_task(self._get_rollout(aborted, plan.rollout_id))
                    self._fleet_polls[why] = task
                    task.add_done_callback(functools.partial(self._poll_done, why))
        if len(self._view_cache) > 64:
            self._view_cache.clear()
        self._view_cache[key] = (now_m, view)
        return view

    async def _relay_aborts(self, peers: list[fleet.PeerView], now: float) -> None:
        """A representative that sees another site abort a rollout this site runs proposes the abort to its
        own site itself (any member may propose), at most once an interval per rollout: an abort must not
        wait for the site leader's next poll, nor depend on it."""
        now_m = self._monotonic()
        for plan, rollout in self.group.rollouts():
            rid = plan.rollout_id
            if (
                rollout.state.final
                or now_m - self._relayed_abort_at.get(rid, -float("inf")) < self.settings.interval_s
            ):
                continue
            aborted = fleet.aborted_elsewhere(plan, self.site, peers)
            if aborted is None:
                continue
            self._relayed_abort_at[rid] = now_m
            reason = await self._abort_reason(plan, aborted)
            result = await self._propose(encode_input(rid, PeerAborted(now, aborted.site, reason)))
            if result is not None and result.outcome is Outcome.APPLIED:
                log.info(
                    "%s: %s (relayed by representative %s)", self.group.group, result.message, self.node_id
                )

    def _views_of(
        self, plan: RolloutPlan, peers: list[fleet.PeerView], *, sized: bool
    ) -> dict[str, fleet.FleetView]:
        """The fresh views of the rest of the fleet this site leader holds for `plan` (by representative),
        asking the representatives again once an interval, for this site's wave sizes too while `sized`
        (before the start). A leader that represents its site itself computes its own view."""
        assert self._sites is not None
        rid = plan.rollout_id
        eligible = len(fleet.site_populations(plan, peers).get(self.site, [])) if sized else None
        now_m = self._monotonic()
        advertised = set(self._sites.representatives())
        held = self._fleet_views.setdefault(rid, {})
        for rep in [r for r in held if r not in advertised and r != self.node_id]:
            del held[rep]
        for key in [k for k in self._view_misses if k[0] == rid and k[1] not in advertised]:
            del self._view_misses[key]
        if self._representing():
            own = self._fleet_view(plan, eligible)
            if own is not None:
                held[self.node_id] = (now_m, own)
                self._view_misses.pop((rid, self.node_id), None)
            else:
                self._view_misses[(rid, self.node_id)] = (
                    "this node's own view could not be made now (see its log)"
                )
        elif self.node_id in held:
            del held[self.node_id]
        if now_m - self._fleet_polled_at.get(rid, -float("inf")) >= self.settings.interval_s:
            self._fleet_polled_at[rid] = now_m
            for rep in sorted(advertised - {self.node_id}):
                if (rid, rep) not in self._fleet_polls and not self._closed:
                    task = asyncio.create_task(
                        self._poll_view(plan, rep, eligible), name=f"fleet-view-{rid}-{rep}"
                    )
                    self._fleet_polls[(rid, rep)] = task
                    task.add_done_callback(functools.partial(self._poll_done, (rid, rep)))
        max_age = self.settings.fleet_max_age
        return {rep: view for rep, (at, view) in held.items() if now_m - at <= max_age}

    def _poll_done(self, key: tuple[str, str], _task: asyncio.Task[Any]) -> None:
        self._fleet_polls.pop(key, None)

    async def _poll_view(self, plan: RolloutPlan, rep: str, eligible: int | None) -> None:
        address = self._address(rep)
        if address is None:
            self._view_misses[(plan.rollout_id, rep)] = "it is not in this node's membership view"
            return
        try:
            reply = await self._dial(address, rep).GetRollout(
                pb.GetRolloutRequest(rollout_id=plan.rollout_id, site_eligible=eligible, fleet_view=True),
                timeout=self.settings.fetch_timeout_s,
            )
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            log.debug("fleet view of %s from %s: %s", plan.rollout_id, rep, code)
            self._view_misses[(plan.rollout_id, rep)] = f"its GetRollout failed ({code})"
            return
        if not reply.fleet_json:  # not (or no longer) a representative, or no sized view this interval
            self._view_misses[(plan.rollout_id, rep)] = "it answered without a view"
            return
        try:
            view = fleet.FleetView.from_json(reply.fleet_json.encode())
        except fleet.FleetViewError as exc:
            log.warning("ignoring the fleet view of %s from representative %s: %s", plan.rollout_id, rep, exc)
            self._view_misses[(plan.rollout_id, rep)] = "its view was malformed"
            return
        if not view.for_plan(plan, self.site):
            log.warning(
                "ignoring a fleet view from representative %s: not of %s for site %s",
                rep,
                plan.label,
                self.site,
            )
            self._view_misses[(plan.rollout_id, rep)] = "its view was of another plan or site"
            return
        self._view_misses.pop((plan.rollout_id, rep), None)
        self._fleet_views.setdefault(plan.rollout_id, {})[rep] = (self._monotonic(), view)
        self._wake.set()

    def _start_view(
        self,
        plan: RolloutPlan,
        rollout: SiteRollout,
        peers: list[fleet.PeerView],
        views: Mapping[str, fleet.FleetView],
        now: float,
    ) -> fleet.FleetView | None:
        """The view a sites-mode leader starts `plan` with: one asked with this site's eligible count now,
        that counts every site it sees (or the grace has passed). None: not yet."""
        eligible = len(fleet.site_populations(plan, peers).get(self.site, []))
        view = fleet.cautious_start(plan, views.values(), eligible)
        if not fleet.fleet_start_ready(
            view, registered_at=rollout.updated_at, now=now, grace_s=self.settings.fleet_start_grace_s
        ):
            return None
        return view

    async def _register(self, plan: RolloutPlan, now: float) -> None:
        rid = plan.rollout_id
        if plan.expired(now):
            return
        refused = self._plan_refused.get(rid)
        if refused is not None:
            busy = any(p.model == plan.model and not r.state.final for p, r in self.group.rollouts())
            if refused != "model_busy" or busy:
                return
        signed = self.docs.signed_plan(rid)
        if signed is None:
            return
        result = await self._propose(plan_command(signed, now=now))
        if result is None:
            return
        if result.outcome is Outcome.REFUSED:
            self._plan_refused[rid] = _refusal_reason(result)
            log.warning("%s refused %s: %s", self.group.group, plan.label, result.message)
        else:
            self._plan_refused.pop(rid, None)
            log.info("%s: %s", self.group.group, result.message)

    async def _propose_commands(self, plan: RolloutPlan, rollout: SiteRollout, now: float) -> bool:
        """Propose the operator commands this site has not applied, oldest first; a pause or resume older
        than one already applied is superseded. True if any was applied."""
        used = {nonce for nonce, _ in rollout.used_nonces}
        held = self.docs.commands(plan.rollout_id)
        latest = max(
            (c.issued_at for c in held if c.nonce in used and c.action in _PAUSE_RESUME),
            default=-float("inf"),
        )
        changed = False
        for command in held:
            digest = command_digest(command)
            if command.nonce in used or digest in self._commands_refused or command.expires_at <= now:
                continue
            if command.action in _PAUSE_RESUME and command.issued_at < latest:
                continue
            result = await self._propose(encode_input(plan.rollout_id, OperatorInput(now, command)))
            if result is None:
                return changed
            if result.outcome is Outcome.REFUSED:
                self._commands_refused.add(digest)
            elif result.outcome is Outcome.APPLIED:
                changed = True
                log.info("%s: %s", self.group.group, result.message)
            if command.action in _PAUSE_RESUME:
                latest = max(latest, command.issued_at)
        return changed

    async def _abort_reason(self, plan: RolloutPlan, peer: fleet.PeerView) -> str:
        """Why `peer`'s site aborted, as its replica says (so every site's audit log names the gate,
        the devices and the measured rate); a plain note if that peer cannot be asked."""
        seen = self._site_views.get((peer.site, plan.rollout_id))
        aborted = seen is not None and seen["state"].get("state") == RolloutState.ABORTED.value
        if not aborted and await self._get_rollout(peer, plan.rollout_id) is not None:
            seen = self._site_views.get((peer.site, plan.rollout_id))
        if seen is not None and seen["state"].get("state") == RolloutState.ABORTED.value:
            return str(seen["state"].get("reason", ""))[:400] or f"announced by {peer.node_id}"
        return f"announced aborted by {peer.node_id} of site {peer.site}"

    async def _propose(self, command: bytes) -> LedgerResult | None:
        try:
            return await self.group.propose_rollout(command, timeout_s=self.settings.propose_timeout_s)
        except (RaftError, GroupError) as exc:
            log.info("%s: rollout proposal not committed: %s", self.node_id, exc)
            return None

    # --- the device's part ---------------------------------------------------------------------

    def _observe_active(self) -> None:
        runtime = self._runtime
        active = runtime.active if runtime is not None else None
        version = active.version if active is not None and active.name == self.model else None
        for at, activated in self._history():
            if at > self._history_seen:
                self.served.add(activated)
                self._history_seen = at
        if version == self._active:
            return
        now_m = self._monotonic()
        if self._active is not None:
            self._active_s[self._active] = self._active_s.get(self._active, 0.0) + now_m - self._active_since
        previous, self._active, self._active_since = self._active, version, now_m
        if version is not None:
            self.served.add(version)
        for plan, rollout in self.group.rollouts():
            if (
                plan.model == self.model
                and previous == plan.target_version
                and version == plan.baseline_version
                and (
                    rollout.state is RolloutState.ABORTED
                    or self.steering.decisions.get(plan.rollout_id) is not None
                    and self.steering.decisions[plan.rollout_id].version == plan.baseline_version
                )
            ):
                self.rollbacks[plan.rollout_id] = self.rollbacks.get(plan.rollout_id, 0) + 1
                log.warning(
                    "%s rolled back %s %s -> %s (%s)",
                    self.node_id,
                    plan.model,
                    previous,
                    version,
                    rollout.reason or "aborted",
                )

    def active_seconds(self, version: str) -> float:
        spent = self._active_s.get(version, 0.0)
        if version == self._active:
            spent += self._monotonic() - self._active_since
        return spent

    def facts(self) -> DeviceFacts:
        runtime = self._runtime
        active = runtime.active if runtime is not None else None
        checked_at, free = self._free_disk
        if self._monotonic() - checked_at >= 5.0:  # a statvfs per step is not needed: disks fill slowly
            try:
                free = shutil.disk_usage(self._data_dir).free
            except OSError:
                free = 0
            self._free_disk = (self._monotonic(), free)
        return DeviceFacts(
            self.node_id,
            tuple(self.labels.items()),
            runtime.backend.version if runtime is not None else "0",
            free,
            signature_digest(active.signature) if active is not None and active.name == self.model else None,
        )

    def _complete_versions(self) -> set[str]:
        out = set()
        for name, version in self._store.stored_versions():
            if name == self.model and self._store.model_path(name, version).exists():
                out.add(version)
        return out

    def _aborts_known(self, peers: list[fleet.PeerView]) -> dict[str, str]:
        aborted = {}
        for plan, rollout in self.group.rollouts():
            if rollout.state.final:
                continue
            command = self.docs.abort_of(plan.rollout_id)
            if command is not None:
                aborted[plan.rollout_id] = f"aborted by operator {command.key_id}: {command.reason}"
                continue
            peer = fleet.aborted_elsewhere(plan, self.site, peers)
            if peer is not None:
                aborted[plan.rollout_id] = f"site {peer.site} aborted it (announced by {peer.node_id})"
        return aborted

    def _steer_device(self, peers: list[fleet.PeerView], now: float) -> None:
        if self.model is None:
            return
        rollouts = self.group.rollouts()
        registered = {p.rollout_id for p, _ in rollouts}
        unregistered = [p for p in self.docs.plans() if p.rollout_id not in registered]
        self.steering = fleet.steer_device(
            self.model,
            rollouts,
            unregistered,
            self.facts(),
            complete=self._complete_versions(),
            serving=self._active,
            aborted=self._aborts_known(peers),
            now=now,
            safe_only=self._safe_only,
            tombstones=self.group.rollout_tombstones(),
        )
        if not self._synced and not self._safe_only:
            self._steer(Steering(wait=True))
        else:
            self._steer(Steering(desired=self.steering.desired, keep=True, blocked=self.steering.blocked))

    def pinned(self) -> Set[tuple[str, str]]:
        """Versions the rollouts need on disk (the distributor keeps them whatever their age)."""
        return self.steering.pinned

    def unwanted(self) -> Set[tuple[str, str]]:
        """Versions the distributor must not start fetching now."""
        return self.steering.unwanted

    def background(self) -> Set[tuple[str, str]]:
        """Versions the distributor fetches at low priority (targets prefetched outside this device's
        wave)."""
        return self.steering.background

    def stream_substitute(self, owner: str, stream_id: str) -> str | None:
        """Who serves a stream routed to `owner` when `owner` runs a version its site is not on (None: the
        owner serves it)."""
        if self.model is None:
            return None
        mine = [(p, r) for p, r in self.group.rollouts() if p.model == self.model]
        if not mine:
            return None
        plan, rollout = max(mine, key=lambda pr: (pr[0].created_at, pr[0].rollout_id))
        acceptable = fleet.acceptable_versions(plan, rollout.state)
        peers = [p for p in self.peers() if p.site == self.site]

        def version_of(peer: fleet.PeerView) -> str | None:
            if peer.node_id == self.node_id:
                active = self._runtime.active if self._runtime is not None else None
                return active.version if active is not None and active.name == self.model else None
            note = peer.note(plan)
            if note is None:
                return None
            return {Serving.BASELINE: plan.baseline_version, Serving.TARGET: plan.target_version}.get(
                note.serving
            )

        by_id = {p.node_id: p for p in peers}
        owner_peer = by_id.get(owner)
        if owner_peer is None or version_of(owner_peer) in acceptable or version_of(owner_peer) is None:
            return None
        candidates = [
            p.node_id
            for p in peers
            if (p.reachable or p.node_id == self.node_id) and version_of(p) in acceptable
        ]
        return fleet.stream_server(stream_id, candidates)

    # --- publishing ------------------------------------------------------------------------------

    def _publish(self, now: float) -> None:
        if self._monotonic() - self._health_at >= self.settings.interval_s:
            self._health_at = self._monotonic()
            self._publish_health()
        self._notes_board.set_meta(encode_notes(self._notes(), self._notes_board.meta_limit_bytes))

    def _publish_health(self) -> None:
        if self.model is None or self._runtime is None:
            return
        versions: set[str] = set()
        skips: list[RolloutSkip] = []
        for plan, rollout in self.group.rollouts():
            if plan.model != self.model or rollout.state.final:
                continue
            versions |= {plan.baseline_version, plan.target_version}
            decision = self.steering.decisions.get(plan.rollout_id)
            if decision is not None and decision.skip is not None:
                skips.append(RolloutSkip(plan.rollout_id, decision.skip.kind))
        snapshot = {(h.model, h.version): h for h in self._runtime.health.snapshot()}
        refused = self._refused()
        entries = []
        for version in sorted(versions):
            counts = snapshot.get((self.model, version))
            active_s = self.active_seconds(version)
            failures = 1 if version in refused else 0
            if counts is None:
                if active_s == 0 and failures == 0:
                    continue
                counts = VersionHealth(self.model, version, 0, {}, (0,) * (len(LATENCY_BUCKETS_S) + 1), 0.0)
            entries.append(
                VersionCounters.from_health(
                    counts, epoch=self._epoch, active_s=active_s, activation_failures=failures
                )
            )
        budget = self._health_board.meta_limit_bytes
        while True:
            try:
                blob = encode_node_health(NodeHealth(tuple(entries), tuple(skips[:8])))
            except HealthFormatError:
                blob = b"x" * (budget + 1)
            if len(blob) <= budget or not (entries or skips):
                break
            if skips:
                skips.pop()
            else:
                entries.pop()
        self._health_board.set_meta(blob if entries or skips else b"")

    def _notes(self) -> list[RolloutNote]:
        leader = self.group.raft.is_leader
        representing = self._representing()
        leader_notes: dict[str, RolloutNote] = {}
        if representing and not leader:
            leader_id = self.group.raft.leader_id
            for peer in self._last_peers:
                if peer.node_id == leader_id and peer.site == self.site:
                    leader_notes = {n.rollout_id: n for n in peer.notes}
        rows = []
        for plan in self.docs.plans():
            known = self.group.rollout(plan.rollout_id)
            rollout = known[1] if known is not None else None
            count, digest = self.docs.note_digests(plan.rollout_id)
            decision = self.steering.decisions.get(plan.rollout_id)
            verdict = self._verdicts.get(plan.rollout_id) if leader else None
            evidence: tuple[WaveEvidence, ...] = ()
            outcome = None if verdict is None else verdict.outcome
            if verdict is not None and rollout is not None and not rollout.state.final:
                evidence = (WaveEvidence.of(verdict.evidence(self.site)),)
                passed = self._passed.get(plan.rollout_id)
                if passed is not None and passed.wave < verdict.wave:
                    evidence = (passed, *evidence)
            population = None
            if representing:
                # What the federation pool learns of this site: its population for the plan, and its
                # leader's word (the leader is in general no representative, so its note stays here).
                population = fleet.site_population(plan, rollout, self.site, self._last_peers)
                relayed = leader_notes.get(plan.rollout_id)
                if not leader and relayed is not None and rollout is not None and not rollout.state.final:
                    evidence, outcome = relayed.evidence, relayed.verdict
            note = RolloutNote(
                plan.rollout_id,
                plan.digest,
                count,
                digest,
                state=None if rollout is None else rollout.state,
                wave=0 if rollout is None else rollout.wave,
                first_wave=0 if rollout is None else fleet.cohort_wave(rollout, self.node_id),
                serving=fleet.serving_of(plan, self.model, self._active),
                skip=None if decision is None or decision.skip is None else decision.skip.kind,
                verdict=outcome,
                evidence=evidence,
                population=population,
            )
            final = rollout is not None and rollout.state.final
            rows.append(((final, -plan.created_at), note))
        return [note for _, note in sorted(rows, key=lambda r: r[0])]

    # --- operators ---------------------------------------------------------------------------------

    async def start(self, signed: SignedPlan) -> LedgerResult:
        """Register a publisher-signed plan with this site (from `mesh rollout start`). A plan that does not
        verify is still proposed, so every replica refuses and audits it; it is never handed on. One that
        verifies is handed on (even if no leader answers now: the site's leader registers it later)."""
        now = self._clock()
        try:
            verify_plan(signed, self.docs.trusted, now=now)
            verified = True
        except (PlanSignatureError, PlanExpiredError) as exc:
            verified = False
            log.warning("%s: refusing %s: %s", self.node_id, signed.plan.label, exc)
        result = None
        try:
            result = await self.group.propose_rollout(
                plan_command(signed, now=now), timeout_s=self.settings.propose_timeout_s
            )
        finally:
            if verified and (result is None or result.outcome is not Outcome.REFUSED):
                try:
                    self.docs.add_plan(signed, now=now)
                except DocumentRefused as exc:
                    log.warning("%s: not handing on %s: %s", self.node_id, signed.plan.label, exc)
            self._wake.set()
        return result

    async def command(self, command: RolloutCommand) -> LedgerResult | None:
        """An operator-signed command: proposed to this site, whose replicas verify it and audit a refusal,
        and handed on to every site once it verifies here. None: the rollout is not known here."""
        now = self._clock()
        plan = self.docs.plan(command.rollout_id)
        known = self.group.rollout(command.rollout_id)
        if plan is not None:
            registered = plan
        elif known is not None:
            registered = known[0]
        else:
            return None
        try:
            verify_command(command, registered, self.docs.trusted, now=now, used_nonces=())
            verified = True
        except CommandRefused as exc:
            verified = False
            log.warning("%s: refusing %s: %s", self.node_id, command.label, exc)
        try:
            # Proposed before it is handed on: the site leader's loop would otherwise race this call to it.
            return await self.group.propose_rollout(
                encode_input(command.rollout_id, OperatorInput(now, command)),
                timeout_s=self.settings.propose_timeout_s,
            )
        finally:
            if verified and plan is not None:
                try:
                    self.docs.add_command(command, now=now)
                except DocumentRefused as exc:
                    log.warning("%s: not handing on %s: %s", self.node_id, command.label, exc)
            self._wake.set()

    def report(self, rollout_id: str | None) -> dict[str, Any] | None:
        """Where a rollout stands (newest if `rollout_id` is None), for `mesh rollout status`."""
        plans = {p.rollout_id: p for p in self.docs.plans()}
        for plan, _ in self.group.rollouts():
            plans.setdefault(plan.rollout_id, plan)
        if not plans:
            return None
        if rollout_id is None:
            plan = max(plans.values(), key=lambda p: (p.created_at, p.rollout_id))
        elif rollout_id in plans:
            plan = plans[rollout_id]
        else:
            return None
        known = self.group.rollout(plan.rollout_id)
        own = None if known is None else known[1]
        verdict = self._verdicts.get(plan.rollout_id)
        report = rollout_report(
            plan,
            site=self.site,
            node_id=self.node_id,
            own=own,
            own_verdict=None if verdict is None else _verdict_doc(verdict),
            peers=self.peers(),
            site_views=self._site_views,
            now=self._clock(),
            max_share_ppm=self.group.policy.rollout_max_share_ppm,
        )
        if self._sites is not None:
            report["fleet_views"] = self._fleet_views_doc(plan.rollout_id, own)
        return report

    def _fleet_views_doc(self, rollout_id: str, own: SiteRollout | None) -> dict[str, Any]:
        """Sites mode, for `mesh rollout status`: the representatives' views of the rest of the fleet this
        node holds (a site leader holds them), how old, why a representative gave none, and a note when
        the site waits for one."""
        assert self._sites is not None
        now_m = self._monotonic()
        max_age = self.settings.fleet_max_age
        reps = sorted(self._sites.representatives())
        leader = self.group.raft.is_leader
        held = sorted(self._fleet_views.get(rollout_id, {}).items())
        views = [
            {
                "representative": rep,
                "age_s": round(now_m - at, 1),
                "fresh": now_m - at <= max_age,
                "sites": view.sites,
                "counted": view.counted,
            }
            for rep, (at, view) in held
        ]
        misses = {rep: why for (rid, rep), why in sorted(self._view_misses.items()) if rid == rollout_id}
        misses = {rep: why for rep, why in misses.items() if rep in reps}
        if own is not None and own.state not in (RolloutState.PENDING, RolloutState.SOAKING):
            note = ""  # finished, or waiting for an operator: not for a view
        elif not leader:
            holder = self.group.raft.leader_id
            note = (
                f"the site leader ({holder}) holds the representatives' views of the other sites; ask it"
                if holder
                else "this site has no leader now; its leader will hold the representatives' views"
            )
        elif own is None:
            refused = self._plan_refused.get(rollout_id)
            note = (
                f"this site's group refused the plan ({refused}); no view is asked for"
                if refused
                else "the plan is not registered in this site's group yet; views are asked for once it is"
            )
        elif not reps:
            note = (
                "no member of this site is advertised as a representative in the federation, so no view of "
                "the other sites reaches this site: check `[membership] pools`/`representatives` and "
                "`mesh admin status` on the site's members"
            )
        elif not any(v["fresh"] for v in views):
            named = ", ".join(f"{r} ({misses[r]})" if r in misses else r for r in reps)
            pending = own.state is RolloutState.PENDING
            waits = "wave 1 does not start" if pending else "the wave's gate does not pass"
            note = (
                f"no fresh view of the other sites from a representative (within {max_age:g} s): {waits} "
                f"until one answers; representatives: {named}. `mesh admin status --node REP` shows "
                "whether a representative reaches the federation"
            )
        else:
            note = ""
        return {"leader": leader, "representatives": reps, "views": views, "misses": misses, "note": note}

    def summaries(self) -> list[dict[str, Any]]:
        """One line per rollout this node knows, newest first, for `mesh rollout ls`."""
        plans = {p.rollout_id: p for p in self.docs.plans()}
        for plan, _ in self.group.rollouts():
            plans.setdefault(plan.rollout_id, plan)
        peers = self.peers()
        out = []
        for plan in sorted(plans.values(), key=lambda p: (p.created_at, p.rollout_id), reverse=True):
            known = self.group.rollout(plan.rollout_id)
            out.append(
                rollout_summary(plan, site=self.site, own=None if known is None else known[1], peers=peers)
            )
        return out


def _refusal_reason(result: LedgerResult) -> str:
    return next(
        (str(e.payload.get("reason", "")) for e in reversed(result.audit) if e.kind == "rollout_refused"), ""
    )


def _site_state_doc(plan: RolloutPlan, rollout: SiteRollout) -> dict[str, Any]:
    return {
        "state": rollout.state.value,
        "wave": rollout.wave,
        "reason": rollout.reason,
        "waiting_for": rollout.waiting_for(plan),
        "soak_started_at": rollout.soak_started_at,
        "eligible_count": rollout.eligible_count,
        "updated_at": rollout.updated_at,
        "approved_waves": sorted(rollout.approved_waves),
        # per wave, the highest cohort score in it (hex; None: nobody of this site): who was in which wave
        "thresholds": [None if t is None else f"{t:064x}" for t in rollout.thresholds],
    }


def _verdict_doc(verdict: GateVerdict) -> dict[str, Any]:
    doc = verdict.to_dict()
    doc.pop("marks", None)
    return doc


# --- the gRPC service ------------------------------------------------------------------------------

MAX_DOCUMENT_CHARS = 64 * 1024
NO_ROLLOUTS = (
    "this node takes no part in rollouts: it has no [raft] section (rollouts are decided in each "
    "site's Raft group); ask a node of a site group"
)


class RolloutServicer(pb_grpc.RolloutsServicer):
    """GetRollout for fleet nodes; the rest for operators. A thin adapter over `RolloutShell`."""

    def __init__(
        self, shell: RolloutShell | None, store: ArtifactStore, runtime: ModelRuntime | None
    ) -> None:
        self._shell = shell
        self._store = store
        self._runtime = runtime

    async def _operator(self, context) -> RolloutShell:
        peer = peer_identity(context)
        if peer is None or peer.role is not Role.OPERATOR:
            who = f"{peer.role.value} {peer.name!r}" if peer else "an unauthenticated caller"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"rollout commands need an operator certificate; this is {who}",
            )
        if self._shell is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_ROLLOUTS)
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        return self._shell

    async def GetRollout(self, request: pb.GetRolloutRequest, context) -> pb.RolloutDocuments:
        if peer_identity(context) is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "rollout documents need a fleet certificate")
        if self._shell is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_ROLLOUTS)
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        if len(request.rollout_id) > 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rollout_id is longer than 64 characters")
        site_eligible = request.site_eligible if request.HasField("site_eligible") else None
        caller = peer_identity(context)
        return self._shell.documents(
            request.rollout_id,
            site_eligible,
            caller.name if caller is not None else None,
            fleet_view=request.fleet_view or site_eligible is not None,
        )

    async def GetManifests(self, request: pb.GetManifestsRequest, context) -> pb.GetManifestsResponse:
        await self._operator(context)
        if len(request.versions) > 8:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ask for at most 8 versions at once")
        out = []
        for version in request.versions:
            try:
                out.append(self._store.load_manifest(request.model, version).to_json().decode())
            except (FileNotFoundError, OSError, ValueError) as exc:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"{request.model} {version} is not held on this node ({type(exc).__name__}); "
                    "publish it here or ask the origin",
                )
            except Exception as exc:  # ArtifactError and friends: unreadable here
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.model} {version}: {exc}")
        active = self._runtime.active if self._runtime is not None else None
        return pb.GetManifestsResponse(
            signed_manifest_json=out,
            active_version=active.version if active is not None and active.name == request.model else "",
        )

    async def Start(self, request: pb.StartRequest, context) -> pb.RolloutResult:
        shell = await self._operator(context)
        text = await _document(context, request.signed_plan_json, "signed_plan_json")
        try:
            signed = SignedPlan.from_json(text.encode())
        except PlanFormatError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = await _write(context, shell.start(signed))
        return _result(shell, result)

    async def Command(self, request: pb.CommandRequest, context) -> pb.RolloutResult:
        shell = await self._operator(context)
        text = await _document(context, request.command_json, "command_json")
        try:
            command = RolloutCommand.from_json(text.encode())
        except MalformedCommand as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = await _write(context, shell.command(command))
        if result is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"rollout {command.rollout_id} is not known on {shell.node_id}; "
                "list rollouts with `mesh rollout ls`",
            )
        return _result(shell, result)

    async def Status(self, request: pb.RolloutStatusRequest, context) -> pb.RolloutStatusResponse:
        shell = await self._operator(context)
        report = shell.report(request.rollout_id or None)
        if report is None:
            what = f"rollout {request.rollout_id}" if request.rollout_id else "any rollout"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"{shell.node_id} knows of no {what}; `mesh rollout ls` lists the rollouts it knows",
            )
        return pb.RolloutStatusResponse(report_json=json.dumps(report))

    async def List(self, request: pb.RolloutListRequest, context) -> pb.RolloutListResponse:
        shell = await self._operator(context)
        return pb.RolloutListResponse(rollouts_json=json.dumps(shell.summaries()))


async def _document(context, text: str, field: str) -> str:
    if not text:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is empty")
    if len(text) > MAX_DOCUMENT_CHARS:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is longer than {MAX_DOCUMENT_CHARS}")
    return text


async def _write(context, submit) -> Any:
    from mesh.consensus.raft import NoLeaderError, ProposalTimeout

    try:
        return await submit
    except NoLeaderError as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except ProposalTimeout as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    except (RaftError, GroupError) as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


def _result(shell: RolloutShell, result: LedgerResult) -> pb.RolloutResult:
    return pb.RolloutResult(
        outcome=result.outcome.value,
        rollout_id=result.rollout_id or "",
        message=result.message,
        refusal_reason=_refusal_reason(result) if result.outcome is Outcome.REFUSED else "",
        group=shell.group.group,
        node_id=shell.node_id,
    )


# --- routed inference on the site's versions ----------------------------------------------------------


class SiteVersionRouting(RoutedInference):
    """Routed Infer that keeps a stream on a version its site is on: while a site's rollout is aborted
    (or completed), a stream whose owner still serves the other version (its swap is under way, or it
    skipped the rollout) is served by a device of the site that runs the right one, chosen by rendezvous
    hashing of the stream. Otherwise, as `RoutedInference`."""

    def __init__(
        self,
        runtime,
        *,
        node_id: str,
        group: SiteGroup | None,
        view: MembershipView,
        dial: Callable[[str, str], inference_pb_grpc.InferenceStub],
        rollouts: RolloutShell | None,
    ) -> None:
        super().__init__(runtime, node_id=node_id, group=group, view=view, dial=dial)
        self._me = node_id
        self._site_group = group
        self._members = view
        self._dial_inference = dial
        self._rollouts = rollouts
        self.substituted = 0

    async def Infer(self, request: inference_pb.InferRequest, context) -> inference_pb.InferResponse:
        group, rollouts = self._site_group, self._rollouts
        metadata = dict(context.invocation_metadata() or ())
        caller = peer_identity(context)
        forwarded = FORWARDED_KEY in metadata and caller is not None and caller.role is Role.NODE
        if request.stream_id and group is not None and rollouts is not None and not forwarded:
            owner = group.routes().get(request.stream_id)
            server = None if owner is None else rollouts.stream_substitute(owner, request.stream_id)
            if server is not None:
                self.substituted += 1
                if server == self._me:
                    return await InferenceServicer.Infer(self, request, context)
                member = self._members.member(server)
                if member is not None:
                    remaining_s = context.time_remaining()
                    try:
                        return await self._dial_inference(member.address, server).Infer(
                            request,
                            timeout=remaining_s if remaining_s is not None else 10.0,
                            metadata=((FORWARDED_KEY, self._me),),
                        )
                    except grpc.aio.AioRpcError as exc:
                        await context.abort(
                            exc.code(),
                            f"forwarded to {server} (serving stream "
                            f"{request.stream_id} for {owner}): {exc.details()}",
                        )
        return await super().Infer(request, context)


# --- metrics ----------------------------------------------------------------------------------------------

_STATE_LABELS = {
    RolloutState.PENDING: "pending",
    RolloutState.SOAKING: "progressing",
    RolloutState.PAUSED: "paused",
    RolloutState.WAITING_APPROVAL: "held",
    RolloutState.COMPLETED: "completed",
    RolloutState.ABORTED: "rolled_back",
}


class RolloutCollector:
    """Rollout metrics read from the shell at scrape time (names in deploy/prometheus/METRICS.md)."""

    def __init__(self, shell: RolloutShell) -> None:
        self._shell = shell

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        shell = self._shell
        state = GaugeMetricFamily(
            "fleetmesh_rollout_state",
            "The rollout's state in this node's site (1 for the current one)",
            labels=["rollout", "model", "version", "state"],
        )
        wave = GaugeMetricFamily(
            "fleetmesh_rollout_wave", "Index of the current wave, from 0", labels=["rollout"]
        )
        ratio = GaugeMetricFamily(
            "fleetmesh_rollout_wave_target_ratio",
            "Share of the selected devices the current wave targets",
            labels=["rollout"],
        )
        verdicts = CounterMetricFamily(
            "fleetmesh_rollout_gate_verdicts",
            "Health gate evaluations by this node (as its site's leader)",
            labels=["rollout", "verdict"],
        )
        rollbacks = CounterMetricFamily(
            "fleetmesh_rollout_rollbacks",
            "Swaps back to the baseline on this node",
            labels=["rollout", "model"],
        )
        for plan, rollout in shell.group.rollouts():
            rid = plan.rollout_id
            for s, name in _STATE_LABELS.items():
                state.add_metric([rid, plan.model, plan.target_version, name], 1 if rollout.state is s else 0)
            wave.add_metric([rid], max(rollout.wave - 1, 0))
            ratio.add_metric([rid], plan.wave(rollout.wave).share_ppm / 1_000_000 if rollout.wave else 0.0)
            for kind in ("pass", "fail", "wait"):
                verdicts.add_metric([rid, kind], shell.gate_counts.get((rid, kind), 0))
            rollbacks.add_metric([rid, plan.model], shell.rollbacks.get(rid, 0))
        yield from (state, wave, ratio, verdicts, rollbacks)


__all__ = [
    "HEALTH_SECTION",
    "ROLLOUTS_SECTION",
    "RolloutCollector",
    "RolloutServicer",
    "RolloutSettings",
    "RolloutShell",
    "SitesHooks",
    "SiteVersionRouting",
]
