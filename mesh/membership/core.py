"""SWIM membership core with Lifeguard: failure detection and gossip dissemination, without I/O.

Rules of this module (everything that decides what a node believes lives here):

- Pure. No sockets, clocks, threads or asyncio. Every method takes `now`
  (monotonic seconds) and all randomness comes from the injected
  `random.Random`. The adapter delivers the returned `Send`s, hands replies
  back (`on_ack`, `on_nack`, `on_gossip_reply`, `on_push_pull_reply`, and
  delivers what that last one returns) and calls `tick(now)` at
  `next_deadline()`. After `tick(now)`, `next_deadline() > now`.
- Member table: node id -> address, labels, incarnation, state. Self is in it
  and is always ALIVE, or LEFT after `leave()`.
- Precedence of a gossiped update over what we hold (`_OVERRIDES`, SWIM with
  memberlist's rules): ALIVE needs a newer incarnation; SUSPECT, DEAD and LEFT
  win at the same incarnation, in that order of strength (SUSPECT never
  replaces DEAD or LEFT, DEAD never replaces LEFT). Only ALIVE carries address
  and label changes. An update that changed the table is queued for
  re-broadcast; one that did not is dropped, which is what ends an epidemic.
  A SUSPECT at the incarnation we already suspect changes nothing but, with
  Lifeguard, may be a new confirmation (below), which is re-broadcast.
- Members we have never heard of are learned only from ALIVE: SUSPECT, DEAD
  or LEFT about an unknown id is ignored (memberlist does the same).
- Self: SUSPECT/DEAD/LEFT about us at our incarnation or above is refuted by
  jumping to that incarnation + 1 and broadcasting ALIVE; ALIVE about us above
  our incarnation (our previous life, before a restart) makes us jump too. An
  older rumour about us re-queues our current ALIVE: its sender missed the
  refutation. Our own ALIVE is queued at start (memberlist's setAlive). After
  `leave()` nothing about us is refuted and `tick` does nothing.
- Events are about other members only: JOINED the first time we learn of one,
  then one event per state entered (ALIVE, SUSPECT, DEAD, LEFT), UPDATED for a
  new address or labels without a change of state, META for new metadata.
- Metadata (`set_meta`): an opaque blob a member publishes about itself,
  versioned by `meta_version` within an incarnation. It rides in the member's
  update like labels do, so dissemination and push-pull carry it; at the same
  incarnation and state a higher meta_version replaces it, and any update that
  wins by incarnation brings its own. `meta_version` should start from a value
  that grows across restarts (the runner passes wall-clock milliseconds), or a
  restarted member's fresh metadata would lose to its old self's.
- Probing: one probe per probe interval, targets taken round-robin from a
  shuffled list of ALIVE/SUSPECT members (reshuffled, newcomers included, at
  the end of each round). No ack by the probe timeout: ask `indirect_checks`
  ALIVE relays. No ack by the end of the interval: the target is SUSPECT (or,
  if it already was, we confirm the suspicion).
- Local health (Lifeguard's LHM, memberlist's awareness): a score from 0 to
  `awareness_max_multiplier - 1`. Probe interval and probe timeout are
  multiplied by score + 1. A probe that got an ack lowers it by one; a failed
  probe raises it by the number of relays that sent no nack (by one if no
  relay was asked); refuting a suspicion about ourselves raises it by one.
  A node that cannot keep its own timing so probes more slowly and waits
  longer, instead of accusing healthy peers.
- Suspicion: whoever sees a member become SUSPECT starts its own timer. Plain
  SWIM (`lifeguard=False`): `suspicion_timeout_s(live_count)`. Lifeguard: the
  timer starts at `suspicion_max_timeout_s` and shrinks, by
  `lifeguard_suspicion_timeout_s`, with each distinct accuser other than the
  one who started it, down to the plain timeout after
  `suspicion_confirmations_expected` of them. At expiry, still SUSPECT at the
  same incarnation means DEAD. Our own failed probe of a member we already
  suspect is a confirmation, and is gossiped as one.
- Telling the suspect: a message to a member we suspect or think dead always
  carries that accusation first, so that the member can refute it even after
  the queue has forgotten it; with Lifeguard a probe that fails sends the
  accusation to the suspect at once; every probe interval we also tell up to
  `gossip_nodes` of our suspects that we suspect them, so each suspicion
  holder hears the refutation from the suspect itself.
- Nacks: a relay that gets no ack from the target within
  `relay_timeout_s(...)` answers the requester with a Nack (`nack_for`).
- Dissemination: a queue of updates, one per node id, each sent at most
  `retransmit_limit(live_count)` times, fewest-sent first, piggybacked on every
  Ping, Ack, Nack, PingReq and Gossip up to `max_gossip_bytes`.
- Anti-entropy: every push-pull interval, a state exchange with one ALIVE and
  one DEAD member (the latter is how two sides of a healed partition find each
  other again). The exchange is paged (`PushPull`): each page holds the
  sender's and the recipient's entries and a range of the table in id order
  up to `max_push_pull_bytes`; successive rounds walk the table. A join pulls
  every page of the seed's table at once. In a merged state, DEAD about
  another node counts as SUSPECT: we give it a suspicion timeout to refute
  instead of believing a stale verdict (memberlist's mergeState does the
  same). While we know no other member at all, the push-pull round re-sends
  the join to the seeds.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from mesh.membership.config import MembershipConfig, lifeguard_suspicion_timeout_s
from mesh.membership.federation import site_of
from mesh.membership.messages import (
    Ack,
    EventKind,
    Gossip,
    Labels,
    MemberEvent,
    MemberView,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Send,
    State,
    UnknownMember,
    Update,
    Updates,
    WrongPool,
    WrongTarget,
)

__all__ = ["MAX_META_BYTES", "MAX_UPDATES_PER_MESSAGE", "Membership", "MembershipStats", "overrides",
           "push_pull_interval_s"]

_NEWER = "newer"                    # incoming incarnation > held incarnation
_SAME_OR_NEWER = "same-or-newer"    # incoming incarnation >= held incarnation

_OVERRIDES: dict[tuple[State, State], str] = {
    # (incoming state, held state): incarnation the incoming update needs.
    # Pairs missing from the table never override.
    (State.ALIVE, State.ALIVE): _NEWER,
    (State.ALIVE, State.SUSPECT): _NEWER,
    (State.ALIVE, State.DEAD): _NEWER,
    # A node that left and comes back (restart, rejoin) does so with a higher
    # incarnation; without this pair it could never rejoin.
    (State.ALIVE, State.LEFT): _NEWER,
    (State.SUSPECT, State.ALIVE): _SAME_OR_NEWER,
    (State.SUSPECT, State.SUSPECT): _NEWER,
    (State.DEAD, State.ALIVE): _SAME_OR_NEWER,
    (State.DEAD, State.SUSPECT): _SAME_OR_NEWER,
    (State.LEFT, State.ALIVE): _SAME_OR_NEWER,
    (State.LEFT, State.SUSPECT): _SAME_OR_NEWER,
    (State.LEFT, State.DEAD): _SAME_OR_NEWER,
}

_EVENT_ON_ENTERING: dict[State, EventKind] = {
    State.ALIVE: EventKind.ALIVE,
    State.SUSPECT: EventKind.SUSPECT,
    State.DEAD: EventKind.DEAD,
    State.LEFT: EventKind.LEFT,
}

_LIVE_STATES = (State.ALIVE, State.SUSPECT)

# memberlist's pushPullScaleThreshold: above this many nodes the push-pull
# interval grows with log2(n), so full-state traffic stays roughly constant.
_PUSH_PULL_SCALE_THRESHOLD = 32

# Metadata is for compact facts (model versions held), not payloads.
MAX_META_BYTES = 4096

# Most updates one message may carry: a piggyback is far below it, a push-pull
# page is cut at it, and the wire adapter refuses messages above it.
MAX_UPDATES_PER_MESSAGE = 4096

# A relay waits for the target at most this share of the time the requester
# has left, so that its nack still arrives before the requester gives up.
_NACK_SHARE_OF_REMAINING = 0.8

# No update is smaller than one with empty strings: below this budget, stop looking.
_SMALLEST_UPDATE_BYTES = Update("", "", 0, State.ALIVE).size_bytes()


def overrides(incoming_state: State, incoming_incarnation: int, held_state: State,
              held_incarnation: int) -> bool:
    """Whether a gossiped (state, incarnation) replaces the one we hold for a known member."""
    rule = _OVERRIDES.get((incoming_state, held_state))
    if rule is _NEWER:
        return incoming_incarnation > held_incarnation
    if rule is _SAME_OR_NEWER:
        return incoming_incarnation >= held_incarnation
    return False


def push_pull_interval_s(config: MembershipConfig, n_members: int) -> float:
    """memberlist's pushPullScale: the configured interval up to 32 members, then
    multiplied by ceil(log2(n) - log2(32)) + 1 (x2 up to 64, x3 up to 128, ...)."""
    if n_members <= _PUSH_PULL_SCALE_THRESHOLD:
        return config.push_pull_interval_s
    multiplier = math.ceil(math.log2(n_members) - math.log2(_PUSH_PULL_SCALE_THRESHOLD)) + 1
    return config.push_pull_interval_s * multiplier


def _page_end_min(a: str, b: str) -> str:
    """The lower of two page ends, "" (end of table) being the highest."""
    if not a:
        return b
    if not b:
        return a
    return min(a, b)


@dataclass
class MembershipStats:
    """Counters for metrics and tests; they only ever grow."""

    probes_sent: int = 0
    probes_failed: int = 0          # probe cycles that ended without any ack
    indirect_probes_sent: int = 0   # PingReqs sent (one per relay)
    nacks_received: int = 0         # relays that told us the target did not answer them either
    pings_received: int = 0
    updates_applied: int = 0        # updates that changed the member table
    refutations: int = 0            # times we raised our incarnation to deny a rumour
    confirmations: int = 0          # Lifeguard: independent accusers counted for our suspicions
    gossips_sent: int = 0
    push_pulls_sent: int = 0
    foreign_dropped: int = 0        # updates about members of another site (`site_only` pools)


@dataclass(slots=True)
class _Member:
    node_id: str
    address: str
    labels: Labels
    incarnation: int
    state: State
    state_since: float
    last_heard: float | None = None
    meta_version: int = 0
    meta: bytes = b""
    accuser: str = ""   # who started the suspicion, while SUSPECT

    def as_update(self) -> Update:
        return Update(self.node_id, self.address, self.incarnation, self.state, self.labels,
                      self.meta_version, self.meta, self.accuser if self.state is State.SUSPECT else "")

    def view(self) -> MemberView:
        return MemberView(self.node_id, self.address, self.labels, self.state, self.incarnation,
                          self.state_since, self.last_heard, self.meta_version, self.meta)


@dataclass(slots=True)
class _Broadcast:
    """A queued update and how many messages have carried it so far."""

    update: Update
    transmits: int = 0


@dataclass(slots=True)
class _Suspicion:
    """One suspicion timer (memberlist's suspicion): it runs from `started_at`
    for `lifeguard_suspicion_timeout_s(len(confirmed), expected, min_s, max_s)`."""

    incarnation: int
    started_at: float
    min_s: float
    max_s: float
    expected: int
    accusers: set[str]          # who started it and who confirmed it; each counts once
    confirmed: int = 0
    deadline: float = 0.0

    def reschedule(self) -> None:
        self.deadline = self.started_at + lifeguard_suspicion_timeout_s(
            self.confirmed, self.expected, self.min_s, self.max_s)


@dataclass
class _Probe:
    """The one outstanding probe: direct Ping sent, relays asked at `indirect_at`,
    verdict at `ends_at`."""

    target_id: str
    seq: int
    indirect_at: float
    ends_at: float
    indirect_sent: bool = False
    relays: tuple[str, ...] = ()
    nacked: set[str] = field(default_factory=set)


class Membership:
    """One node's SWIM state machine: feed it messages and time, deliver what it returns."""

    def __init__(self, node_id: str, address: str, labels: Labels, config: MembershipConfig,
                 rng: random.Random, now: float, *, incarnation: int = 0, meta_version: int = 0,
                 known: Iterable[Update] = ()) -> None:
        """`incarnation` lets a restarted node resume where it was (if it kept it);
        a node that starts at 0 instead learns its old incarnation from peers and
        jumps above it. `known` seeds the table with members (a simulator's
        converged pool): they are taken as they are, without events and without
        being queued for gossip."""
        self.node_id = node_id
        self.address = address
        self.labels = labels
        self.config = config
        self.stats = MembershipStats()
        self._site = site_of(labels)
        self._rng = rng
        self._self = _Member(node_id, address, labels, incarnation, State.ALIVE, now,
                             meta_version=meta_version)
        self._members: dict[str, _Member] = {node_id: self._self}
        self._live_count = 1
        self._left = False
        self._joining = False
        self._events: list[MemberEvent] = []
        self._next_seq = 1
        self._seed_addresses: list[str] = []
        self._health = 0
        # Node ids in order, for push-pull pages; rebuilt when a member is added.
        self._sorted_ids: list[str] | None = None
        self._push_pull_cursor = ""

        # The broadcast queue: one entry per node id, filed in buckets by
        # transmit count; within a bucket, insertion order is age (newest last).
        self._queued: dict[str, _Broadcast] = {}
        self._queue_buckets: list[dict[str, _Broadcast]] = [{}]
        # Announce ourselves as memberlist's setAlive does: a joiner's ALIVE then
        # spreads from the joiner as well as from its seed.
        self._enqueue(self._self.as_update())

        # Suspicion timers by node id; the heap orders their deadlines and may
        # hold stale entries, which are skipped when popped.
        self._suspicions: dict[str, _Suspicion] = {}
        self._suspicion_heap: list[tuple[float, str, int]] = []

        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._probe_index = 0

        for update in known:
            if update.node_id == node_id or update.node_id in self._members or self._foreign(update):
                continue
            member = _Member(update.node_id, update.address, update.labels, update.incarnation, update.state,
                             now, meta_version=update.meta_version, meta=update.meta, accuser=update.accuser)
            self._members[update.node_id] = member
            self._live_count += update.state in _LIVE_STATES
            if member.state is State.SUSPECT:
                self._start_suspicion(member, now)

        # Random phases, as memberlist staggers its tickers, so that nodes
        # started together do not probe and gossip in lockstep.
        self._next_probe_at = now + rng.uniform(0, config.probe_interval_s)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval_s)
        self._next_push_pull_at = now + rng.uniform(0, config.push_pull_interval_s)

    # -- queries -------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score (memberlist's awareness): 0 is healthy; probe
        interval and timeout are multiplied by score + 1."""
        return self._health

    @property
    def probe_interval_s(self) -> float:
        """The probe interval now, stretched by the local health score."""
        return self.config.probe_interval_s * (self._health + 1)

    @property
    def probe_timeout_s(self) -> float:
        """The direct probe timeout now, stretched by the local health score."""
        return self.config.probe_timeout_s * (self._health + 1)

    def members(self) -> list[MemberView]:
        """Every known member including self, sorted by node id."""
        return [self._members[node_id].view() for node_id in sorted(self._members)]

    def member(self, node_id: str) -> MemberView | None:
        found = self._members.get(node_id)
        return found.view() if found else None

    def live_count(self) -> int:
        """Members ALIVE or SUSPECT, self included (unless we left)."""
        return self._live_count

    def suspicion_deadline(self, node_id: str) -> float | None:
        """When our suspicion of `node_id` turns into DEAD, if we suspect it."""
        suspicion = self._suspicions.get(node_id)
        return suspicion.deadline if suspicion else None

    @property
    def meta_limit_bytes(self) -> int:
        """Largest metadata we publish: MAX_META_BYTES, and at most a quarter of the piggyback
        budget, since a member's every update (its ALIVE refutation too) carries its metadata and
        an update larger than the budget would never be piggybacked at all."""
        return min(MAX_META_BYTES, self.config.max_gossip_bytes // 4)

    def set_meta(self, meta: bytes) -> None:
        """Publish new metadata about ourselves; it spreads like any update."""
        if len(meta) > self.meta_limit_bytes:
            raise ValueError(f"metadata is {len(meta)} bytes, at most {self.meta_limit_bytes} "
                             f"(a quarter of max_gossip_bytes, at most {MAX_META_BYTES})")
        if self._left or meta == self._self.meta:
            return
        self._self.meta = bytes(meta)
        self._self.meta_version += 1
        self._enqueue(self._self.as_update())

    def drain_events(self) -> list[MemberEvent]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float:
        """Earliest `now` at which `tick` has work; `math.inf` once we have left."""
        if self._left:
            return math.inf
        deadline = min(self._next_probe_at, self._next_gossip_at, self._next_push_pull_at)
        probe = self._probe
        if probe is not None:
            deadline = min(deadline, probe.ends_at if probe.indirect_sent else probe.indirect_at)
        heap = self._suspicion_heap
        while heap and not self._is_current(heap[0]):
            heapq.heappop(heap)
        if heap:
            deadline = min(deadline, heap[0][0])
        return deadline

    def relay_timeout_s(self, requester_remaining_s: float | None) -> float:
        """How long to wait, as a PingReq relay, for the target's ack before answering
        with a Nack: the probe timeout (memberlist's), but no more than most of the
        time the requester has left (`None`: unknown), so the nack reaches it in time."""
        timeout_s = self.config.probe_timeout_s
        if requester_remaining_s is not None:
            timeout_s = min(timeout_s, max(0.0, requester_remaining_s) * _NACK_SHARE_OF_REMAINING)
        return timeout_s

    # -- lifecycle -----------------------------------------------------------

    def join(self, seed_addresses: Sequence[str], now: float, *, remember: bool = True) -> list[Send]:
        """State exchange with each seed; their replies (`on_push_pull_reply`) fill
        our table, page after page, and our ALIVE spreads from them. While we know
        no other member, every push-pull round repeats this (a lost join is retried)
        with the seeds of the last join that `remember`ed them."""
        addresses = list(dict.fromkeys(seed_addresses))
        if remember:
            self._seed_addresses = addresses
        sends = []
        for address in addresses:
            if address != self.address:
                members, page_end = self._page("", None)
                pp = PushPull(self.node_id, members, self.config.pool, "", page_end)
                sends.append(Send(address, None, pp))
                self.stats.push_pulls_sent += 1
        self._joining = bool(sends)
        return sends

    def leave(self, now: float) -> list[Send]:
        """Announce a graceful leave (LEFT at incarnation + 1) to up to 3 x gossip_nodes
        ALIVE peers. Afterwards `tick` does nothing; incoming messages are still
        answered, and their replies keep carrying our LEFT."""
        if self._left:
            return []
        me = self._self
        me.incarnation += 1
        self._set_state(me, State.LEFT, now)
        self._left = True
        self._probe = None
        left = me.as_update()
        self._enqueue(left)
        peers = [m for m in self._members.values() if m is not me and m.state is State.ALIVE]
        chosen = self._rng.sample(peers, min(3 * self.config.gossip_nodes, len(peers)))
        sends = [Send(m.address, m.node_id, self._gossip_message(m.node_id, first=(left,))) for m in chosen]
        self.stats.gossips_sent += len(sends)
        return sends

    # -- timers --------------------------------------------------------------

    def tick(self, now: float) -> list[Send]:
        """Run every timer due at `now`; calling early is harmless."""
        if self._left:
            return []
        self._expire_suspicions(now)
        sends = self._advance_probe(now)
        if now >= self._next_gossip_at:
            self._next_gossip_at = _next_after(self._next_gossip_at, self.config.gossip_interval_s, now)
            sends += self._gossip_round(now)
        if now >= self._next_push_pull_at:
            interval_s = push_pull_interval_s(self.config, self._live_count)
            self._next_push_pull_at = _next_after(self._next_push_pull_at, interval_s, now)
            sends += self._push_pull_round(now)
        return sends

    def _advance_probe(self, now: float) -> list[Send]:
        sends: list[Send] = []
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.indirect_at:
            sends += self._ask_relays(probe, now)
        notified = None
        if probe is not None and now >= probe.ends_at:
            self._probe = None
            notice = self._probe_failed(probe, now)
            if notice is not None:
                sends.append(notice)
                notified = notice.target_id
        if self._probe is None and now >= self._next_probe_at:
            sends += self._start_probe(now)
            sends += self._notify_suspects(notified)
        return sends

    def _start_probe(self, now: float) -> list[Send]:
        interval_s = self.probe_interval_s
        self._next_probe_at = now + interval_s
        target = self._next_probe_target()
        if target is None:
            return []
        seq = self._new_seq()
        timeout_s = self.probe_timeout_s
        self._probe = _Probe(target.node_id, seq, now + timeout_s, now + interval_s)
        self.stats.probes_sent += 1
        ping = Ping(self.node_id, target.node_id, seq, self._piggyback(target.node_id), self.config.pool)
        return [Send(target.address, target.node_id, ping, timeout_s)]

    def _next_probe_target(self) -> _Member | None:
        """Next ALIVE/SUSPECT member in the shuffled round; a new round (with
        newcomers, without the dead) starts when this one is used up."""
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                candidate = self._members.get(self._probe_order[self._probe_index])
                self._probe_index += 1
                if candidate is not None and candidate.state in _LIVE_STATES:
                    return candidate
            self._probe_order = [node_id for node_id, m in self._members.items()
                                 if m is not self._self and m.state in _LIVE_STATES]
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _notify_suspects(self, notified: str | None) -> list[Send]:
        """Once per probe interval, tell up to `gossip_nodes` members we suspect
        (other than the one just probed, whose Ping says it, and the one just
        told by `_probe_failed`) that we do.

        Gossip spreads a refutation in well under a second and then forgets it;
        a node that missed it would declare the member dead when its timer runs
        out. The suspect's reply to this notice carries its refutation to us
        directly (Lifeguard's "buddy system", which memberlist applies to pings).
        """
        skip = (self._probe.target_id if self._probe else None, notified)
        suspects = [m for m in self._members.values() if m.state is State.SUSPECT and m.node_id not in skip]
        if not suspects:
            return []
        chosen = self._rng.sample(suspects, min(self.config.gossip_nodes, len(suspects)))
        self.stats.gossips_sent += len(chosen)
        return [self._gossip_send(m) for m in chosen]

    def _gossip_message(self, recipient_id: str, first: tuple[Update, ...] = ()) -> Gossip:
        return Gossip(self.node_id, self._piggyback(recipient_id, first), self.config.pool)

    def _gossip_send(self, member: _Member) -> Send:
        return Send(member.address, member.node_id, self._gossip_message(member.node_id),
                    self.config.probe_interval_s)

    def _ask_relays(self, probe: _Probe, now: float) -> list[Send]:
        probe.indirect_sent = True
        target = self._members.get(probe.target_id)
        if target is None or target.state not in _LIVE_STATES:
            return []
        relays = [m for m in self._members.values()
                  if m.state is State.ALIVE and m is not self._self and m is not target]
        chosen = self._rng.sample(relays, min(self.config.indirect_checks, len(relays)))
        probe.relays = tuple(relay.node_id for relay in chosen)
        self.stats.indirect_probes_sent += len(chosen)
        remaining_s = probe.ends_at - now
        return [Send(relay.address, relay.node_id,
                     PingReq(self.node_id, target.node_id, target.address, probe.seq,
                             self._piggyback(relay.node_id), self.config.pool), remaining_s)
                for relay in chosen]

    def _probe_failed(self, probe: _Probe, now: float) -> Send | None:
        """Suspect (or confirm) the target; the notice to send it at once, if any."""
        self.stats.probes_failed += 1
        if self.config.lifeguard:
            # memberlist: relays that answered (nack) show our own network and
            # loop are fine; each silent one counts against our own health.
            missing = len(probe.relays) - len(probe.nacked) if probe.relays else 1
            self._change_health(missing)
        target = self._members.get(probe.target_id)
        if target is None or target.state not in _LIVE_STATES:
            return None
        was_alive = target.state is State.ALIVE
        self._apply(Update(target.node_id, target.address, target.incarnation, State.SUSPECT, target.labels,
                           target.meta_version, target.meta, self.node_id), now)
        if was_alive and self.config.lifeguard and target.state is State.SUSPECT:
            # Lifeguard: tell the suspect now rather than when gossip gets there,
            # so its refutation races our suspicion timers from the start.
            self.stats.gossips_sent += 1
            return self._gossip_send(target)
        return None

    def _expire_suspicions(self, now: float) -> None:
        heap = self._suspicion_heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._is_current(entry):
                continue  # superseded: refuted, rescheduled, re-suspected or already dead
            _, node_id, incarnation = entry
            del self._suspicions[node_id]
            suspect = self._members[node_id]
            self._apply(Update(node_id, suspect.address, incarnation, State.DEAD, suspect.labels,
                               suspect.meta_version, suspect.meta), now)

    def _is_current(self, entry: tuple[float, str, int]) -> bool:
        deadline, node_id, incarnation = entry
        suspicion = self._suspicions.get(node_id)
        return (suspicion is not None and suspicion.incarnation == incarnation
                and suspicion.deadline == deadline)

    def _gossip_round(self, now: float) -> list[Send]:
        if not self._queued:
            return []
        to_dead_s = self.config.gossip_to_dead_s
        # Gossip to the recently dead too (memberlist): a node wrongly declared
        # dead hears it and refutes while others still remember it.
        candidates = [m for m in self._members.values() if m is not self._self and (
            m.state in _LIVE_STATES or (m.state is State.DEAD and now - m.state_since < to_dead_s))]
        chosen = self._rng.sample(candidates, min(self.config.gossip_nodes, len(candidates)))
        sends = []
        for m in chosen:
            updates = self._piggyback(m.node_id)
            if not updates:
                break  # the queue ran dry on earlier recipients
            sends.append(Send(m.address, m.node_id, Gossip(self.node_id, updates, self.config.pool),
                              self.config.probe_interval_s))
        self.stats.gossips_sent += len(sends)
        return sends

    def _push_pull_round(self, now: float) -> list[Send]:
        alive, dead = [], []
        for m in self._members.values():
            if m is self._self:
                continue
            if m.state is State.ALIVE:
                alive.append(m)
            elif m.state is State.DEAD:
                dead.append(m)
        # One live peer repairs what gossip lost; one dead peer, if any, is how a
        # partition heals: it refutes our verdict and its ALIVE spreads.
        chosen = [self._rng.choice(group) for group in (alive, dead) if group]
        if not chosen and len(self._members) == 1:
            # We know nobody: the join was lost (or the seeds were down). Retry it.
            return self.join(self._seed_addresses, now)
        sends = []
        for m in chosen:
            sends.append(Send(m.address, m.node_id, self._push_pull_page(self._push_pull_cursor, m.node_id)))
        self.stats.push_pulls_sent += len(sends)
        return sends

    def _push_pull_page(self, page_after: str, recipient_id: str | None) -> PushPull:
        members, page_end = self._page(page_after, recipient_id)
        return PushPull(self.node_id, members, self.config.pool, page_after, page_end)

    def _page(self, page_after: str, recipient_id: str | None) -> tuple[Updates, str]:
        """Our entry, our entry about the recipient, then members with ids after
        `page_after` in id order while they fit `max_push_pull_bytes` (at least one,
        so that a walk of the table always advances); and the last id taken, or ""
        if the page reached the end of the table."""
        budget_bytes = self.config.max_push_pull_bytes
        members = [self._self.as_update()]
        recipient = self._members.get(recipient_id) if recipient_id else None
        if recipient is not None and recipient is not self._self:
            members.append(recipient.as_update())
        budget_bytes -= sum(u.size_bytes() for u in members)
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self._members)
        ids = self._sorted_ids
        start = bisect.bisect_right(ids, page_after) if page_after else 0
        taken = 0
        for index in range(start, len(ids)):
            node_id = ids[index]
            member = self._members[node_id]
            if member is self._self or member is recipient:
                continue
            update = member.as_update()
            size = update.size_bytes()
            if taken and (size > budget_bytes or len(members) >= MAX_UPDATES_PER_MESSAGE):
                return tuple(members), ids[index - 1]
            members.append(update)
            budget_bytes -= size
            taken += 1
        return tuple(members), ""

    # -- incoming messages ---------------------------------------------------

    def _check_pool(self, pool: str, what: str, sender: str) -> None:
        if pool != self.config.pool:
            raise WrongPool(f"{what} from {sender!r} is for pool {pool or 'site'!r} but reached "
                            f"{self.node_id!r}'s pool {self.config.pool or 'site'!r}")

    def on_ping(self, ping: Ping, now: float) -> Ack:
        self._check_pool(ping.pool, "ping", ping.sender)
        if ping.target != self.node_id:
            raise WrongTarget(f"ping from {ping.sender!r} is for {ping.target!r} but reached "
                              f"{self.node_id!r} "
                              f"at {self.address}; the sender's address for {ping.target!r} is stale")
        self.stats.pings_received += 1
        self._receive(ping.sender, ping.updates, now)
        return Ack(self.node_id, ping.seq, self._piggyback(ping.sender))

    def on_ack(self, ack: Ack, now: float) -> None:
        """A direct Ack, or a relayed one (sender is the probed node, seq is ours)."""
        self._receive(ack.sender, ack.updates, now)
        probe = self._probe
        # A late ack (after the verdict) still carries news but no longer counts.
        if probe is not None and ack.seq == probe.seq and ack.sender == probe.target_id:
            self._probe = None
            if self.config.lifeguard:
                self._change_health(-1)

    def on_nack(self, nack: Nack, now: float) -> None:
        """A relay we asked could not reach the probe's target either (Lifeguard)."""
        self._receive(nack.sender, nack.updates, now)
        probe = self._probe
        if (probe is not None and nack.seq == probe.seq and nack.sender in probe.relays
                and nack.sender not in probe.nacked):
            probe.nacked.add(nack.sender)
            self.stats.nacks_received += 1

    def on_ping_req(self, req: PingReq, now: float) -> Ping:
        """Relay side of an indirect probe: the Ping to send to `req.target_address`."""
        self._check_pool(req.pool, "ping request", req.sender)
        if req.target not in self._members:
            raise UnknownMember(f"{req.sender!r} asked {self.node_id!r} to probe {req.target!r}, "
                                f"which {self.node_id!r} has never heard of")
        self._receive(req.sender, req.updates, now)
        return Ping(self.node_id, req.target, self._new_seq(), self._piggyback(req.target), self.config.pool)

    def on_relayed_ack(self, req: PingReq, ack: Ack, now: float) -> Ack:
        """Relay side: the target answered our Ping; the Ack to return to `req.sender`."""
        if ack.sender != req.target:
            raise WrongTarget(f"relayed ping for {req.target!r} was answered by {ack.sender!r}")
        self.on_ack(ack, now)
        return Ack(req.target, req.seq, self._piggyback(req.sender))

    def nack_for(self, req: PingReq, now: float) -> Nack:
        """Relay side: the target did not answer within `relay_timeout_s`; the Nack
        to return to `req.sender`."""
        return Nack(self.node_id, req.seq, self._piggyback(req.sender))

    def on_gossip(self, gossip: Gossip, now: float) -> Gossip:
        self._check_pool(gossip.pool, "gossip", gossip.sender)
        self._receive(gossip.sender, gossip.updates, now)
        return Gossip(self.node_id, self._piggyback(gossip.sender), self.config.pool)

    def on_gossip_reply(self, reply: Gossip, now: float) -> None:
        self._receive(reply.sender, reply.updates, now)

    def on_push_pull(self, pp: PushPull, now: float) -> PushPull:
        """Merge a page and answer with ours for the same range of ids."""
        self._check_pool(pp.pool, "push-pull", pp.sender)
        self._merge_state(pp, now)
        return self._push_pull_page(pp.page_after, pp.sender)

    def on_push_pull_reply(self, pp: PushPull, now: float) -> list[Send]:
        """Merge the page a peer answered with. Returns the request for the next page
        while we are joining (a joiner pulls the seed's whole table at once);
        otherwise the next round's page starts where both pages stopped."""
        # Both sides covered the range up to the lower of the two page ends; ours
        # is where our page for that range ends (before the merge adds members).
        ours = self._page(pp.page_after, pp.sender)[1]
        self._merge_state(pp, now)
        covered_to = _page_end_min(pp.page_end, ours)
        if not self._joining:
            self._push_pull_cursor = covered_to
            return []
        sender = self._members.get(pp.sender)
        if not pp.page_end or sender is None:
            self._joining = False
            return []
        self.stats.push_pulls_sent += 1
        return [Send(sender.address, sender.node_id, self._push_pull_page(covered_to, sender.node_id))]

    def _receive(self, sender: str, updates: Iterable[Update], now: float) -> None:
        for update in updates:
            self._apply(update, now)
        # After the updates: a joining sender becomes known by its own ALIVE.
        known = self._members.get(sender)
        if known is not None and known is not self._self:
            known.last_heard = now

    def _merge_state(self, pp: PushPull, now: float) -> None:
        self._receive(pp.sender, (self._merged(u) for u in pp.members), now)

    def _merged(self, update: Update) -> Update:
        """In a pushed state, another node's DEAD may be a stale verdict (the other
        side of a partition): we suspect instead, and the member gets a timeout to
        refute. A suspicion taken from a state exchange is ours (memberlist's
        mergeState). About ourselves, DEAD stays DEAD: we refute it either way."""
        if update.node_id == self.node_id or update.state not in (State.DEAD, State.SUSPECT):
            return update
        return replace(update, state=State.SUSPECT, accuser=self.node_id)

    # -- the member table ----------------------------------------------------

    def _foreign(self, update: Update) -> bool:
        """An update about a member of another site, in a pool of this site only."""
        return self.config.site_only and site_of(update.labels) != self._site

    def _apply(self, update: Update, now: float) -> bool:
        """Apply one update by the precedence rules; True if it changed the table."""
        if update.node_id == self.node_id:
            return self._apply_about_self(update)
        if self._foreign(update):
            self.stats.foreign_dropped += 1
            held = self._members.get(update.node_id)
            if held is None or held.state is State.LEFT or update.state is not State.ALIVE \
                    or update.incarnation < held.incarnation:  # a stale entry relayed late says nothing
                return False
            # A member we hold now says it belongs to another site (its labels changed): it has
            # left this site's pool. Without this it would stay ALIVE here with its old labels,
            # answering our pings, for as long as it runs.
            self._set_state(held, State.LEFT, now)
            self._suspicions.pop(held.node_id, None)
            self._emit(EventKind.LEFT, held, now)
            self._enqueue(held.as_update())
            return True
        held = self._members.get(update.node_id)
        broadcast: Update | None = None
        if held is None:
            if update.state is not State.ALIVE:
                return False
            held = _Member(update.node_id, update.address, update.labels, update.incarnation, State.ALIVE,
                           now,
                           meta_version=update.meta_version, meta=update.meta)
            self._members[update.node_id] = held
            self._sorted_ids = None
            self._live_count += 1
            self._emit(EventKind.JOINED, held, now)
        elif update.state is held.state and update.incarnation == held.incarnation:
            # The same verdict: new metadata, or (Lifeguard) one more accuser.
            changed = False
            if update.meta_version > held.meta_version:
                held.meta_version, held.meta = update.meta_version, update.meta
                self._emit(EventKind.META, held, now)
                changed = True
            if held.state is State.SUSPECT and self._confirm(held, update.accuser, now):
                # Re-broadcast the confirmation under its own accuser, as memberlist does,
                # so that every holder of the suspicion can count it.
                broadcast = replace(held.as_update(), accuser=update.accuser)
                changed = True
            if not changed:
                return False
        else:
            if not overrides(update.state, update.incarnation, held.state, held.incarnation):
                return False
            if ((update.incarnation > held.incarnation or update.meta_version > held.meta_version)
                    and (update.meta_version, update.meta) != (held.meta_version, held.meta)):
                held.meta_version, held.meta = update.meta_version, update.meta
                self._emit(EventKind.META, held, now)
            held.incarnation = update.incarnation
            identity_changed = False
            if update.state is State.ALIVE:
                identity_changed = (held.address, held.labels) != (update.address, update.labels)
                held.address, held.labels = update.address, update.labels
            if update.state is not held.state:
                self._set_state(held, update.state, now)
                self._emit(_EVENT_ON_ENTERING[update.state], held, now)
            elif identity_changed:
                self._emit(EventKind.UPDATED, held, now)
            if held.state is State.SUSPECT:
                held.accuser = update.accuser
                self._start_suspicion(held, now)
            else:
                held.accuser = ""
                self._suspicions.pop(held.node_id, None)
        self._enqueue(broadcast or held.as_update())
        self.stats.updates_applied += 1
        return True

    def _apply_about_self(self, update: Update) -> bool:
        me = self._self
        if self._left:
            return False
        if update.state is State.ALIVE:
            if update.incarnation <= me.incarnation:
                return False
        elif update.incarnation < me.incarnation:
            # Already refuted, but the refutation has not reached whoever still
            # spreads this. Queue it afresh: the reply to that sender (and the
            # next few messages) carry it. Without this a node that missed the
            # refutation declares us dead when its suspicion timer runs out.
            self._enqueue(me.as_update())
            return False
        me.incarnation = update.incarnation + 1
        self._enqueue(me.as_update())
        if update.state is not State.ALIVE:
            self.stats.refutations += 1
            if self.config.lifeguard:
                # memberlist: being accused is a hint that we are the slow one.
                self._change_health(1)
        return True

    def _change_health(self, delta: int) -> None:
        self._health = min(max(0, self._health + delta), self.config.awareness_max_multiplier - 1)

    def _set_state(self, member: _Member, state: State, now: float) -> None:
        self._live_count += (state in _LIVE_STATES) - (member.state in _LIVE_STATES)
        member.state = state
        member.state_since = now

    def _start_suspicion(self, member: _Member, now: float) -> None:
        config, n = self.config, self._live_count
        min_s = config.suspicion_timeout_s(n)
        if config.lifeguard:
            max_s, expected = config.suspicion_max_timeout_s(n), config.suspicion_confirmations_expected(n)
        else:
            max_s, expected = min_s, 0
        # The accuser who started it is not a confirmation: our own suspicion
        # may come back to us by gossip.
        suspicion = _Suspicion(member.incarnation, now, min_s, max_s, expected,
                               {member.accuser} if member.accuser else set())
        suspicion.reschedule()
        self._suspicions[member.node_id] = suspicion
        heapq.heappush(self._suspicion_heap, (suspicion.deadline, member.node_id, member.incarnation))

    def _confirm(self, member: _Member, accuser: str, now: float) -> bool:
        """Count `accuser` for our suspicion of `member` (Lifeguard); True if it was new."""
        suspicion = self._suspicions.get(member.node_id)
        if (suspicion is None or not accuser or suspicion.confirmed >= suspicion.expected
                or accuser in suspicion.accusers):
            return False
        suspicion.accusers.add(accuser)
        suspicion.confirmed += 1
        suspicion.reschedule()
        heapq.heappush(self._suspicion_heap, (suspicion.deadline, member.node_id, member.incarnation))
        self.stats.confirmations += 1
        return True

    def _emit(self, kind: EventKind, member: _Member, now: float) -> None:
        self._events.append(MemberEvent(kind, member.node_id, member.incarnation, now))

    def _new_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- dissemination -------------------------------------------------------

    def _enqueue(self, update: Update) -> None:
        """Queue for broadcast, replacing any older update about the same node."""
        older = self._queued.get(update.node_id)
        if older is not None:
            del self._queue_buckets[older.transmits][update.node_id]
        entry = _Broadcast(update)
        self._queued[update.node_id] = entry
        self._queue_buckets[0][update.node_id] = entry

    def _piggyback(self, recipient_id: str, first: tuple[Update, ...] = ()) -> Updates:
        """Updates to ride on one message to `recipient_id`, within `max_gossip_bytes`.

        `first` go first; then, if we suspect the recipient or think it dead, that
        accusation (so it can refute even after the queue dropped it); then the
        queue, fewest-sent and newest first. Each queued update carried counts as
        one transmission; at the retransmit limit it leaves the queue.
        """
        budget_bytes = self.config.max_gossip_bytes
        chosen: list[Update] = []
        recipient = self._members.get(recipient_id)
        urgent = list(first)
        if (recipient is not None and recipient is not self._self
                and recipient.state in (State.SUSPECT, State.DEAD)):
            urgent.append(recipient.as_update())
        for update in urgent:
            size = update.size_bytes()
            if size <= budget_bytes:
                chosen.append(update)
                budget_bytes -= size
        urgent_by_node = {u.node_id: u for u in chosen}
        carried: list[_Broadcast] = []
        for bucket in self._queue_buckets:
            for entry in reversed(bucket.values()):
                update = entry.update
                if update.node_id in urgent_by_node:
                    if urgent_by_node[update.node_id] == update:
                        carried.append(entry)
                    continue
                size = update.size_bytes()
                if size <= budget_bytes:
                    chosen.append(update)
                    carried.append(entry)
                    budget_bytes -= size
                    if budget_bytes < _SMALLEST_UPDATE_BYTES:
                        break
            if budget_bytes < _SMALLEST_UPDATE_BYTES:
                break
        if carried:
            limit = self.config.retransmit_limit(self._live_count)
            for entry in carried:
                self._count_transmit(entry, limit)
        return tuple(chosen)

    def _count_transmit(self, entry: _Broadcast, limit: int) -> None:
        node_id = entry.update.node_id
        del self._queue_buckets[entry.transmits][node_id]
        entry.transmits += 1
        if entry.transmits >= limit:
            del self._queued[node_id]
            return
        if entry.transmits == len(self._queue_buckets):
            self._queue_buckets.append({})
        self._queue_buckets[entry.transmits][node_id] = entry


def _next_after(scheduled: float, interval_s: float, now: float) -> float:
    """Next firing of a periodic timer: keep the cadence, but never fire in the past."""
    following = scheduled + interval_s
    return following if following > now else now + interval_s
