"""SWIM membership core: failure detection and gossip dissemination, without I/O.

Rules of this module (everything that decides what a node believes lives here):

- Pure. No sockets, clocks, threads or asyncio. Every method takes `now`
  (monotonic seconds) and all randomness comes from the injected
  `random.Random`. The adapter delivers the returned `Send`s, hands replies
  back (`on_ack`, `on_gossip_reply`, `on_push_pull_reply`) and calls
  `tick(now)` at `next_deadline()`. After `tick(now)`, `next_deadline() > now`.
- Member table: node id -> address, labels, incarnation, state. Self is in it
  and is always ALIVE, or LEFT after `leave()`.
- Precedence of a gossiped update over what we hold (`_OVERRIDES`, SWIM with
  memberlist's rules): ALIVE needs a newer incarnation; SUSPECT, DEAD and LEFT
  win at the same incarnation, in that order of strength (SUSPECT never
  replaces DEAD or LEFT, DEAD never replaces LEFT). Only ALIVE carries address
  and label changes. An update that changed the table is queued for
  re-broadcast; one that did not is dropped, which is what ends an epidemic.
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
- Probing: one probe per `probe_interval_s`, targets taken round-robin from a
  shuffled list of ALIVE/SUSPECT members (reshuffled, newcomers included, at
  the end of each round). No ack by `probe_timeout_s`: ask `indirect_checks`
  ALIVE relays. No ack by the end of the interval: the target is SUSPECT.
- Suspicion: whoever sees a member become SUSPECT starts its own timer of
  `suspicion_timeout_s(live_count)`; at expiry, still SUSPECT at the same
  incarnation means DEAD. Every probe interval we also tell up to
  `gossip_nodes` of our suspects that we suspect them, so each suspicion
  holder hears the refutation from the suspect itself.
- Dissemination: a queue of updates, one per node id, each sent at most
  `retransmit_limit(live_count)` times, fewest-sent first, piggybacked on every
  Ping, Ack, PingReq and Gossip up to `max_gossip_bytes`. A message to a member
  we suspect or think dead always carries that accusation first, so that the
  member can refute it even after the queue has forgotten it.
- Anti-entropy: every push-pull interval, a full-state exchange with one ALIVE
  and one DEAD member (the latter is how two sides of a healed partition find
  each other again). In a merged full state, DEAD about another node counts as
  SUSPECT: we give it a suspicion timeout to refute instead of believing a
  stale verdict (memberlist's mergeState does the same). While we know no
  other member at all, the push-pull round re-sends the join to the seeds.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.membership.messages import (
    Ack,
    EventKind,
    Gossip,
    Labels,
    MemberEvent,
    MembershipConfig,
    MemberView,
    Ping,
    PingReq,
    PushPull,
    Send,
    State,
    UnknownMember,
    Update,
    Updates,
    WrongTarget,
)

__all__ = ["Membership", "MembershipStats", "overrides", "push_pull_interval_s"]

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

# Metadata is for compact facts (model versions and chunk bitfields), not payloads.
MAX_META_BYTES = 4096

# No update is smaller than one with empty strings: below this budget, stop looking.
_SMALLEST_UPDATE_BYTES = Update("", "", 0, State.ALIVE).size_bytes()


def overrides(incoming_state: State, incoming_incarnation: int, held_state: State, held_incarnation: int) -> bool:
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


@dataclass
class MembershipStats:
    """Counters for metrics and tests; they only ever grow."""

    probes_sent: int = 0
    probes_failed: int = 0          # probe cycles that ended without any ack
    indirect_probes_sent: int = 0   # PingReqs sent (one per relay)
    pings_received: int = 0
    updates_applied: int = 0        # updates that changed the member table
    refutations: int = 0            # times we raised our incarnation to deny a rumour
    gossips_sent: int = 0
    push_pulls_sent: int = 0


@dataclass
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

    def as_update(self) -> Update:
        return Update(self.node_id, self.address, self.incarnation, self.state, self.labels,
                      self.meta_version, self.meta)

    def view(self) -> MemberView:
        return MemberView(self.node_id, self.address, self.labels, self.state, self.incarnation,
                          self.state_since, self.last_heard, self.meta_version, self.meta)


@dataclass
class _Broadcast:
    """A queued update and how many messages have carried it so far."""

    update: Update
    transmits: int = 0


@dataclass
class _Probe:
    """The one outstanding probe: direct Ping sent, relays asked at `indirect_at`,
    verdict at `ends_at`."""

    target_id: str
    seq: int
    indirect_at: float
    ends_at: float
    indirect_sent: bool = False


class Membership:
    """One node's SWIM state machine: feed it messages and time, deliver what it returns."""

    def __init__(self, node_id: str, address: str, labels: Labels, config: MembershipConfig,
                 rng: random.Random, now: float, *, incarnation: int = 0, meta_version: int = 0) -> None:
        """`incarnation` lets a restarted node resume where it was (if it kept it);
        a node that starts at 0 instead learns its old incarnation from peers and
        jumps above it."""
        self.node_id = node_id
        self.address = address
        self.labels = labels
        self.config = config
        self.stats = MembershipStats()
        self._rng = rng
        self._self = _Member(node_id, address, labels, incarnation, State.ALIVE, now,
                             meta_version=meta_version)
        self._members: dict[str, _Member] = {node_id: self._self}
        self._live_count = 1
        self._left = False
        self._events: list[MemberEvent] = []
        self._next_seq = 1
        self._seed_addresses: list[str] = []

        # The broadcast queue: one entry per node id, filed in buckets by
        # transmit count; within a bucket, insertion order is age (newest last).
        self._queued: dict[str, _Broadcast] = {}
        self._queue_buckets: list[dict[str, _Broadcast]] = [{}]
        # Announce ourselves as memberlist's setAlive does: a joiner's ALIVE then
        # spreads from the joiner as well as from its seed.
        self._enqueue(self._self.as_update())

        # Suspicion timers: node id -> (incarnation, deadline); the heap orders
        # them and may hold stale entries, which are skipped when popped.
        self._suspicions: dict[str, tuple[int, float]] = {}
        self._suspicion_heap: list[tuple[float, str, int]] = []

        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._probe_index = 0

        # Random phases, as memberlist staggers its tickers, so that nodes
        # started together do not probe and gossip in lockstep.
        self._next_probe_at = now + rng.uniform(0, config.probe_interval_s)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval_s)
        self._next_push_pull_at = now + rng.uniform(0, config.push_pull_interval_s)

    # -- queries -------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    def members(self) -> list[MemberView]:
        """Every known member including self, sorted by node id."""
        return [self._members[node_id].view() for node_id in sorted(self._members)]

    def member(self, node_id: str) -> MemberView | None:
        found = self._members.get(node_id)
        return found.view() if found else None

    def live_count(self) -> int:
        """Members ALIVE or SUSPECT, self included (unless we left)."""
        return self._live_count

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
        while heap and self._suspicions.get(heap[0][1]) != (heap[0][2], heap[0][0]):
            heapq.heappop(heap)
        if heap:
            deadline = min(deadline, heap[0][0])
        return deadline

    # -- lifecycle -----------------------------------------------------------

    def join(self, seed_addresses: Sequence[str], now: float) -> list[Send]:
        """Full-state exchange with each seed; their replies (`on_push_pull_reply`)
        fill our table and our ALIVE spreads from them. While we know no other
        member, every push-pull round repeats this (a lost join is retried)."""
        self._seed_addresses = list(dict.fromkeys(seed_addresses))
        state = self._full_state()
        sends = []
        for address in self._seed_addresses:
            if address != self.address:
                sends.append(Send(address, None, PushPull(self.node_id, state)))
                self.stats.push_pulls_sent += 1
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
        sends = [Send(m.address, m.node_id, Gossip(self.node_id, self._piggyback(m.node_id, first=(left,))))
                 for m in chosen]
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
            sends += self._ask_relays(probe)
        if probe is not None and now >= probe.ends_at:
            self._probe = None
            self._probe_failed(probe, now)
        if self._probe is None and now >= self._next_probe_at:
            sends += self._start_probe(now)
            sends += self._notify_suspects()
        return sends

    def _start_probe(self, now: float) -> list[Send]:
        interval_s = self.config.probe_interval_s
        self._next_probe_at = now + interval_s
        target = self._next_probe_target()
        if target is None:
            return []
        seq = self._new_seq()
        self._probe = _Probe(target.node_id, seq, now + self.config.probe_timeout_s, now + interval_s)
        self.stats.probes_sent += 1
        ping = Ping(self.node_id, target.node_id, seq, self._piggyback(target.node_id))
        return [Send(target.address, target.node_id, ping)]

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

    def _notify_suspects(self) -> list[Send]:
        """Once per probe interval, tell up to `gossip_nodes` members we suspect
        (other than the one just probed, whose Ping says it) that we do.

        Gossip spreads a refutation in well under a second and then forgets it;
        a node that missed it would declare the member dead when its timer runs
        out. The suspect's reply to this notice carries its refutation to us
        directly (Lifeguard's "buddy system", which memberlist applies to pings).
        """
        probed = self._probe.target_id if self._probe else None
        suspects = [m for m in self._members.values() if m.state is State.SUSPECT and m.node_id != probed]
        if not suspects:
            return []
        chosen = self._rng.sample(suspects, min(self.config.gossip_nodes, len(suspects)))
        self.stats.gossips_sent += len(chosen)
        return [Send(m.address, m.node_id, Gossip(self.node_id, self._piggyback(m.node_id))) for m in chosen]

    def _ask_relays(self, probe: _Probe) -> list[Send]:
        probe.indirect_sent = True
        target = self._members.get(probe.target_id)
        if target is None or target.state not in _LIVE_STATES:
            return []
        relays = [m for m in self._members.values()
                  if m.state is State.ALIVE and m is not self._self and m is not target]
        chosen = self._rng.sample(relays, min(self.config.indirect_checks, len(relays)))
        self.stats.indirect_probes_sent += len(chosen)
        return [Send(relay.address, relay.node_id,
                     PingReq(self.node_id, target.node_id, target.address, probe.seq,
                             self._piggyback(relay.node_id)))
                for relay in chosen]

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        self.stats.probes_failed += 1
        target = self._members.get(probe.target_id)
        if target is not None and target.state is State.ALIVE:
            self._apply(Update(target.node_id, target.address, target.incarnation, State.SUSPECT,
                               target.labels), now)

    def _expire_suspicions(self, now: float) -> None:
        heap = self._suspicion_heap
        while heap and heap[0][0] <= now:
            deadline, node_id, incarnation = heapq.heappop(heap)
            if self._suspicions.get(node_id) != (incarnation, deadline):
                continue  # superseded: refuted, re-suspected or already dead
            del self._suspicions[node_id]
            suspect = self._members[node_id]
            self._apply(Update(node_id, suspect.address, incarnation, State.DEAD, suspect.labels), now)

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
            sends.append(Send(m.address, m.node_id, Gossip(self.node_id, updates)))
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
        if not chosen:
            return []
        state = self._full_state()
        self.stats.push_pulls_sent += len(chosen)
        return [Send(m.address, m.node_id, PushPull(self.node_id, state)) for m in chosen]

    # -- incoming messages ---------------------------------------------------

    def on_ping(self, ping: Ping, now: float) -> Ack:
        if ping.target != self.node_id:
            raise WrongTarget(f"ping from {ping.sender!r} is for {ping.target!r} but reached {self.node_id!r} "
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

    def on_ping_req(self, req: PingReq, now: float) -> Ping:
        """Relay side of an indirect probe: the Ping to send to `req.target_address`."""
        if req.target not in self._members:
            raise UnknownMember(f"{req.sender!r} asked {self.node_id!r} to probe {req.target!r}, "
                                f"which {self.node_id!r} has never heard of")
        self._receive(req.sender, req.updates, now)
        return Ping(self.node_id, req.target, self._new_seq(), self._piggyback(req.target))

    def on_relayed_ack(self, req: PingReq, ack: Ack, now: float) -> Ack:
        """Relay side: the target answered our Ping; the Ack to return to `req.sender`."""
        if ack.sender != req.target:
            raise WrongTarget(f"relayed ping for {req.target!r} was answered by {ack.sender!r}")
        self.on_ack(ack, now)
        return Ack(req.target, req.seq, self._piggyback(req.sender))

    def on_gossip(self, gossip: Gossip, now: float) -> Gossip:
        self._receive(gossip.sender, gossip.updates, now)
        return Gossip(self.node_id, self._piggyback(gossip.sender))

    def on_gossip_reply(self, reply: Gossip, now: float) -> None:
        self._receive(reply.sender, reply.updates, now)

    def on_push_pull(self, pp: PushPull, now: float) -> PushPull:
        self._merge_full_state(pp, now)
        return PushPull(self.node_id, self._full_state())

    def on_push_pull_reply(self, pp: PushPull, now: float) -> None:
        self._merge_full_state(pp, now)

    def _receive(self, sender: str, updates: Iterable[Update], now: float) -> None:
        for update in updates:
            self._apply(update, now)
        # After the updates: a joining sender becomes known by its own ALIVE.
        known = self._members.get(sender)
        if known is not None and known is not self._self:
            known.last_heard = now

    def _merge_full_state(self, pp: PushPull, now: float) -> None:
        self._receive(pp.sender, (self._dead_as_suspect(u) for u in pp.members), now)

    def _dead_as_suspect(self, update: Update) -> Update:
        """In a full state, another node's DEAD may be a stale verdict (the other
        side of a partition): we suspect instead, and the member gets a timeout
        to refute. About ourselves, DEAD stays DEAD: we refute it either way."""
        if update.state is State.DEAD and update.node_id != self.node_id:
            return Update(update.node_id, update.address, update.incarnation, State.SUSPECT, update.labels,
                          update.meta_version, update.meta)
        return update

    # -- the member table ----------------------------------------------------

    def _apply(self, update: Update, now: float) -> bool:
        """Apply one update by the precedence rules; True if it changed the table."""
        if update.node_id == self.node_id:
            return self._apply_about_self(update)
        held = self._members.get(update.node_id)
        if held is None:
            if update.state is not State.ALIVE:
                return False
            held = _Member(update.node_id, update.address, update.labels, update.incarnation, State.ALIVE, now,
                           meta_version=update.meta_version, meta=update.meta)
            self._members[update.node_id] = held
            self._live_count += 1
            self._emit(EventKind.JOINED, held, now)
        elif (update.state is held.state and update.incarnation == held.incarnation
              and update.meta_version > held.meta_version):
            held.meta_version, held.meta = update.meta_version, update.meta
            self._emit(EventKind.META, held, now)
        else:
            if not overrides(update.state, update.incarnation, held.state, held.incarnation):
                return False
            if update.incarnation > held.incarnation or update.meta_version > held.meta_version:
                if (update.meta_version, update.meta) != (held.meta_version, held.meta):
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
            self._start_suspicion(held, now)
        else:
            self._suspicions.pop(held.node_id, None)
        self._enqueue(held.as_update())
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
        self.stats.refutations += 1
        return True

    def _set_state(self, member: _Member, state: State, now: float) -> None:
        self._live_count += (state in _LIVE_STATES) - (member.state in _LIVE_STATES)
        member.state = state
        member.state_since = now

    def _start_suspicion(self, member: _Member, now: float) -> None:
        deadline = now + self.config.suspicion_timeout_s(self._live_count)
        self._suspicions[member.node_id] = (member.incarnation, deadline)
        heapq.heappush(self._suspicion_heap, (deadline, member.node_id, member.incarnation))

    def _emit(self, kind: EventKind, member: _Member, now: float) -> None:
        self._events.append(MemberEvent(kind, member.node_id, member.incarnation, now))

    def _full_state(self) -> Updates:
        return tuple(m.as_update() for m in self._members.values())

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
        if recipient is not None and recipient is not self._self and recipient.state in (State.SUSPECT, State.DEAD):
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
