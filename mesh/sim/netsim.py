"""An in-memory network for membership cores: virtual clock, latency, loss,
partitions, crashes and slow nodes, all driven by one seed.

It plays the gRPC adapter's part (`mesh.membership.service`) for many
`Membership` cores: every `Send` is a request delivered after `latency_s`, the
core's reply travels back after `latency_s`, and either leg may be lost
(`loss`) or blocked (`partition`). As with gRPC, a reply that reaches the
caller after the deadline the core gave the request (`Send.timeout_s`, or the
adapter's default) is lost: the call failed. A PingReq is relayed the way the
adapter does it: the relay pings the target with `relay_timeout_s`, relays the
target's Ack if it came in time, and otherwise answers with a Nack. Each core
is ticked at its `next_deadline()`. Nothing sleeps; a heap orders the events.

Slow nodes (`slow`) model a node whose event loop is blocked part of the time
(a CPU-bound inference, a GC pause, an overloaded device): the loop stalls for
`share` of the time, in stalls of about `stall_s` (uniform in 0.5-1.5 x
`stall_s`, exponentially distributed gaps, so stalls do not lock to the
protocol's periods). Anything due during a stall (a timer, a message) is
handled when the stall ends: due timers first, then messages in arrival order,
since in grpc.aio a received message takes more loop iterations to reach the
core than an expired timer does. The network itself (gRPC's C core) keeps
running: a slow node's outgoing call still succeeds if the reply arrived in
time, even if the node reads it late.

Nodes are keyed by name (the node id unless given), so one device can run a
core in each of two pools at two addresses (see `mesh.sim.membership`).

    net = Network(10, seed=7, config=config)
    net.join_all()
    assert net.run_until(net.all_alive, timeout_s=10) is not None
    net.crash("n03")
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mesh.membership.config import MembershipConfig
from mesh.membership.core import Membership
from mesh.membership.messages import (
    Ack,
    EventKind,
    Gossip,
    Labels,
    MemberEvent,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Send,
    State,
    UnknownMember,
    Update,
    WrongPool,
    WrongTarget,
)

__all__ = ["Network", "NetworkStats", "SimNode", "SlowLoop", "TraceEvent"]

# The gRPC adapter's deadline for a PushPull; the core leaves it to the adapter.
PUSH_PULL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TraceEvent:
    """A membership event as seen by `observer`."""

    at: float
    observer: str
    kind: EventKind
    node_id: str
    incarnation: int


class SlowLoop:
    """When a slow node's event loop is stalled: a lazily drawn sequence of stalls.

    Random (the default): stalls of 0.5-1.5 x `stall_s` with exponentially
    distributed gaps, `share` of the time on average. Periodic: a stall of
    exactly `stall_s` every `stall_s / share` seconds at a random phase (a loop
    "blocked for a share of each second" when `stall_s` is that share).
    """

    def __init__(self, share: float, stall_s: float, rng: random.Random, now: float, *,
                 periodic: bool = False, timers_on_time: bool = False) -> None:
        if not 0 < share < 1:
            raise ValueError(f"share {share} must be between 0 and 1 (exclusive)")
        if stall_s <= 0:
            raise ValueError(f"stall_s {stall_s} must be > 0")
        self.share = share
        self.stall_s = stall_s
        self.periodic = periodic
        self.timers_on_time = timers_on_time
        self._rng = rng
        self._mean_gap_s = stall_s * (1 - share) / share
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._drawn_to = now + (rng.uniform(0, self._mean_gap_s) if periodic
                                else rng.expovariate(1 / self._mean_gap_s))

    def free_at(self, t: float) -> float:
        """The first instant >= `t` at which the loop runs."""
        while self._drawn_to <= t:
            start = self._drawn_to
            end = start + (self.stall_s if self.periodic else self.stall_s * self._rng.uniform(0.5, 1.5))
            self._starts.append(start)
            self._ends.append(end)
            self._drawn_to = end + (self._mean_gap_s if self.periodic
                                    else self._rng.expovariate(1 / self._mean_gap_s))
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0 and t < self._ends[i]:
            return self._ends[i]
        return t

    def stalled_s(self, start: float, end: float) -> float:
        """Seconds of stall within [start, end), for checking the share."""
        self.free_at(end)
        return sum(max(0.0, min(e, end) - max(s, start))
                   for s, e in zip(self._starts, self._ends, strict=True))


@dataclass
class SimNode:
    name: str
    node_id: str
    address: str
    core: Membership
    crashed: bool = False
    left: bool = False
    slow: SlowLoop | None = None
    tick_at: float = math.inf  # the tick event currently scheduled; others are stale

    @property
    def running(self) -> bool:
        return not self.crashed and not self.left


@dataclass
class NetworkStats:
    messages_sent: int = 0
    messages_lost: int = 0
    replies_late: int = 0               # reached the caller after its deadline
    largest_piggyback_bytes: int = 0    # over every Ping, Ack, Nack, PingReq and Gossip
    largest_push_pull_bytes: int = 0    # estimated, over every PushPull page


@dataclass
class _RelayCall:
    """A relay's own Ping to the target on behalf of a PingReq."""

    requester: SimNode
    relay: SimNode
    req: PingReq
    caller_deadline: float
    answered: bool = False   # the target's ack reached the relay in time
    done: bool = False       # the relay has answered the requester


_Handler = Callable[[Membership, Any, float], object]
_TIMER, _MESSAGE = 0, 1


class Network:
    """Membership cores on a simulated network; `Network(n, ...)` starts n nodes
    named n00, n01, ... at "n00:1", ..."""

    def __init__(self, n_nodes: int = 0, *, seed: int, config: MembershipConfig, latency_s: float = 0.005,
                 loss: float = 0.0, record_trace: bool = True,
                 on_events: Callable[[SimNode, list[MemberEvent]], None] | None = None) -> None:
        """`on_events(node, events)` sees every core's events as they happen (the node's
        event subscription); `record_trace=False` keeps no trace (large simulations)."""
        self.seed = seed
        self.config = config
        self.latency_s = latency_s
        self.loss = loss
        self.record_trace = record_trace
        self.on_events = on_events
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.trace: list[TraceEvent] = []
        self.stats = NetworkStats()
        self._rng = random.Random(seed)
        self._by_address: dict[str, SimNode] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._events: list[tuple[float, int, int, Callable[..., None], tuple]] = []
        self._serial = itertools.count()
        for i in range(n_nodes):
            self.add_node(f"n{i:02d}")

    # -- building the cluster ------------------------------------------------

    def add_node(self, node_id: str, *, name: str | None = None, address: str | None = None,
                 config: MembershipConfig | None = None, labels: Labels = (),
                 known: Iterable[Update] = ()) -> SimNode:
        """Start a core. `known` seeds its table (an already converged pool)."""
        name = name or node_id
        address = address or f"{node_id}:1"
        if name in self.nodes or address in self._by_address:
            raise ValueError(f"a node named {name!r} or at {address!r} exists already")
        core = Membership(node_id, address, labels, config or self.config,
                          random.Random(f"{self.seed}:{name}"), self.now, known=known)
        node = SimNode(name, node_id, address, core)
        self.nodes[name] = node
        self._by_address[address] = node
        self._schedule_tick(node)
        return node

    def join_all(self, seed_id: str = "n00", spread_s: float = 0.5) -> None:
        """Every other node joins via `seed_id`, at random times within `spread_s`."""
        for node in self.nodes.values():
            if node.name != seed_id:
                self._at(self.now + self._rng.uniform(0, spread_s), self.join, node.name, [seed_id])

    def join(self, name: str, seed_names: Iterable[str]) -> None:
        node = self.nodes[name]
        sends = node.core.join([self.nodes[s].address for s in seed_names], self.now)
        self._deliver_all(node, sends)

    # -- faults --------------------------------------------------------------

    def crash(self, name: str) -> None:
        """The node stops: it neither ticks nor answers, and keeps no timers."""
        self.nodes[name].crashed = True

    def leave(self, name: str) -> None:
        """Graceful leave; the node keeps answering (it only stops ticking)."""
        node = self.nodes[name]
        node.left = True
        self._deliver_all(node, node.core.leave(self.now))

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Block every message between the two groups, both ways."""
        group_b = list(group_b)
        for a in group_a:
            for b in group_b:
                self._blocked.add((a, b))
                self._blocked.add((b, a))

    def isolate(self, name: str) -> None:
        self.partition([name], [other for other in self.nodes if other != name])

    def heal(self) -> None:
        self._blocked.clear()

    def slow(self, name: str, share: float, stall_s: float = 1.0, *, periodic: bool = False,
             timers_on_time: bool = False) -> SlowLoop:
        """From now on the node's loop is stalled `share` of the time, in stalls of about `stall_s`.

        `timers_on_time`: only message handling stalls, timers fire on time (memberlist's
        goroutines, the slow members of the Lifeguard paper) instead of one loop for both.
        """
        node = self.nodes[name]
        node.slow = SlowLoop(share, stall_s, random.Random(f"{self.seed}:slow:{name}"), self.now,
                             periodic=periodic, timers_on_time=timers_on_time)
        return node.slow

    # -- running -------------------------------------------------------------

    def run_for(self, duration_s: float) -> None:
        self._run_to(self.now + duration_s)

    def run_until(self, predicate: Callable[[], bool], timeout_s: float,
                  check_every_s: float = 0.1) -> float | None:
        """Run until `predicate()` holds (checked every `check_every_s` of virtual
        time); the virtual seconds it took, or None after `timeout_s`."""
        start = self.now
        while True:
            if predicate():
                return self.now - start
            if self.now - start >= timeout_s:
                return None
            self._run_to(min(self.now + check_every_s, start + timeout_s))

    # -- looking at the cluster ----------------------------------------------

    def running_ids(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.running]

    def views(self) -> dict[str, dict[str, tuple[State, int]]]:
        """observer -> member -> (state, incarnation), for running observers."""
        return {name: {m.node_id: (m.state, m.incarnation) for m in self.nodes[name].core.members()}
                for name in self.running_ids()}

    def state_seen(self, observer: str, node_id: str) -> State | None:
        seen = self.nodes[observer].core.member(node_id)
        return seen.state if seen else None

    def all_alive(self) -> bool:
        """Every running node sees every running node ALIVE."""
        running = self.running_ids()
        return all(self.state_seen(observer, node_id) is State.ALIVE
                   for observer in running for node_id in running)

    def disagreements(self, limit: int = 10) -> str:
        """Who sees a running node as other than ALIVE, for assertion messages."""
        running = self.running_ids()
        wrong = [f"{observer} sees {node_id} {state.name if state else 'nowhere'}"
                 for observer in running for node_id in running
                 if (state := self.state_seen(observer, node_id)) is not State.ALIVE]
        more = f" (and {len(wrong) - limit} more)" if len(wrong) > limit else ""
        return "; ".join(wrong[:limit]) + more if wrong else "none"

    def all_see(self, node_id: str, state: State) -> bool:
        """Every running node other than `node_id` sees it in `state`."""
        return all(self.state_seen(observer, node_id) is state
                   for observer in self.running_ids() if observer != node_id)

    def events(self, kind: EventKind | None = None, about: str | None = None) -> list[TraceEvent]:
        return [e for e in self.trace
                if (kind is None or e.kind is kind) and (about is None or e.node_id == about)]

    # -- the event loop ------------------------------------------------------

    def _at(self, at: float, action: Callable[..., None], *args: object, order: int = _TIMER) -> None:
        heapq.heappush(self._events, (at, order, next(self._serial), action, args))

    def _at_node(self, node: SimNode, at: float, order: int, action: Callable[..., None],
                 *args: object) -> None:
        """Schedule work on `node`'s loop: when it is stalled, at the stall's end."""
        if node.slow is not None and not (order == _TIMER and node.slow.timers_on_time):
            free = node.slow.free_at(at)
            if free > at:
                self._at(free, action, *args, order=order)
                return
        self._at(at, action, *args)

    def _run_to(self, end: float) -> None:
        events = self._events
        while events and events[0][0] <= end:
            at, _, _, action, args = heapq.heappop(events)
            self.now = at
            action(*args)
        self.now = end

    def _schedule_tick(self, node: SimNode) -> None:
        deadline = node.core.next_deadline()
        if deadline < node.tick_at:
            node.tick_at = deadline
            self._at_node(node, max(deadline, self.now), _TIMER, self._on_tick, node, deadline)

    def _on_tick(self, node: SimNode, deadline: float) -> None:
        if node.crashed or node.tick_at != deadline:
            return
        node.tick_at = math.inf
        sends = node.core.tick(self.now)
        self._after_call(node)
        self._deliver_all(node, sends)

    def _after_call(self, node: SimNode) -> None:
        """Record what the core said happened and re-arm its timer, as the adapter does."""
        events = node.core.drain_events()
        if events:
            if self.record_trace:
                for e in events:
                    self.trace.append(TraceEvent(e.at, node.name, e.kind, e.node_id, e.incarnation))
            if self.on_events is not None:
                self.on_events(node, events)
        self._schedule_tick(node)

    # -- delivery ------------------------------------------------------------

    def _leg(self, src: SimNode, dst: SimNode, message: Message, deadline: float | None,
             action: Callable[..., None], *args: object) -> bool:
        """One message on the wire: lost, blocked, too late for its caller, or handled
        by `dst` after `latency_s`. True if it arrives in time."""
        stats = self.stats
        stats.messages_sent += 1
        if isinstance(message, PushPull):
            size = sum(u.size_bytes() for u in message.members)
            if size > stats.largest_push_pull_bytes:
                stats.largest_push_pull_bytes = size
        else:
            size = sum(u.size_bytes() for u in message.updates)
            if size > stats.largest_piggyback_bytes:
                stats.largest_piggyback_bytes = size
        if (src.name, dst.name) in self._blocked or (self.loss and self._rng.random() < self.loss):
            stats.messages_lost += 1
            return False
        arrives = self.now + self.latency_s
        if deadline is not None and arrives > deadline:
            stats.replies_late += 1
            return False
        self._at_node(dst, arrives, _MESSAGE, action, *args)
        return True

    def _deadline(self, send: Send, src: SimNode) -> float:
        if send.timeout_s is not None:
            return self.now + send.timeout_s
        message, config = send.message, src.core.config
        if isinstance(message, Ping):
            return self.now + config.probe_timeout_s
        if isinstance(message, PingReq):
            return self.now + config.probe_interval_s - config.probe_timeout_s
        if isinstance(message, PushPull):
            return self.now + PUSH_PULL_TIMEOUT_S
        return self.now + config.probe_interval_s

    def _deliver_all(self, src: SimNode, sends: list[Send]) -> None:
        for send in sends:
            dst = self._by_address.get(send.address)
            if dst is not None:
                deadline = self._deadline(send, src)
                self._leg(src, dst, send.message, None, self._on_request, src, dst, send.message, deadline)

    def _on_request(self, src: SimNode, dst: SimNode, message: Message, deadline: float) -> None:
        if dst.crashed:
            return
        core, now = dst.core, self.now
        if isinstance(message, PingReq):
            self._relay(src, dst, message, deadline)
            return
        try:
            if isinstance(message, Ping):
                reply: Message = core.on_ping(message, now)
                handler: _Handler = Membership.on_ack
            elif isinstance(message, Gossip):
                reply, handler = core.on_gossip(message, now), Membership.on_gossip_reply
            elif isinstance(message, PushPull):
                reply, handler = core.on_push_pull(message, now), self._push_pull_reply_handler(src)
            else:
                raise TypeError(f"{type(message).__name__} is not a request")
        except (WrongTarget, WrongPool):
            return
        self._after_call(dst)
        self._leg(dst, src, reply, deadline, self._on_reply, src, reply, handler)

    def _push_pull_reply_handler(self, caller: SimNode) -> _Handler:
        def handle(core: Membership, reply: Message, now: float) -> None:
            assert isinstance(reply, PushPull)
            self._deliver_all(caller, core.on_push_pull_reply(reply, now))
        return handle

    def _on_reply(self, dst: SimNode, reply: Message, handler: _Handler) -> None:
        if dst.crashed:
            return
        handler(dst.core, reply, self.now)
        self._after_call(dst)

    def _relay(self, requester: SimNode, relay: SimNode, req: PingReq, caller_deadline: float) -> None:
        try:
            ping = relay.core.on_ping_req(req, self.now)
        except (UnknownMember, WrongPool):
            return
        self._after_call(relay)
        call = _RelayCall(requester, relay, req, caller_deadline)
        relay_deadline = self.now + relay.core.relay_timeout_s(caller_deadline - self.now)
        self._at_node(relay, relay_deadline, _TIMER, self._on_relay_timeout, call)
        target = self._by_address.get(req.target_address)
        if target is not None:
            self._leg(relay, target, ping, None, self._on_relayed_ping, call, target, ping, relay_deadline)

    def _on_relayed_ping(self, call: _RelayCall, target: SimNode, ping: Ping, relay_deadline: float) -> None:
        if target.crashed:
            return
        try:
            ack = target.core.on_ping(ping, self.now)
        except (WrongTarget, WrongPool):
            return
        self._after_call(target)
        # gRPC's core, not the relay's loop, decides whether the call succeeded.
        call.answered = self._leg(target, call.relay, ack, relay_deadline, self._on_relayed_ack, call, ack)

    def _on_relayed_ack(self, call: _RelayCall, ack: Ack) -> None:
        relay = call.relay
        if relay.crashed or call.done:
            return
        call.done = True
        relayed = relay.core.on_relayed_ack(call.req, ack, self.now)
        self._after_call(relay)
        self._leg(relay, call.requester, relayed, call.caller_deadline, self._on_reply, call.requester,
                  relayed,
                  Membership.on_ack)

    def _on_relay_timeout(self, call: _RelayCall) -> None:
        relay = call.relay
        if relay.crashed or call.done or call.answered:
            return
        call.done = True
        nack: Nack = relay.core.nack_for(call.req, self.now)
        self._after_call(relay)
        self._leg(relay, call.requester, nack, call.caller_deadline, self._on_reply, call.requester, nack,
                  Membership.on_nack)
