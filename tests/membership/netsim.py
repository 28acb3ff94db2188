"""An in-memory network for membership cores: virtual clock, latency, loss,
partitions and crashes, all driven by one seed.

It plays the adapter's part for N `Membership` cores: every `Send` is a
request delivered after `latency_s`, the core's reply travels back after
`latency_s`, and either leg may be lost (`loss`) or blocked (`partition`). A
PingReq is relayed the way the gRPC adapter does it: the relay's Ping goes to
the target, and the target's Ack comes back through `on_relayed_ack`. Each core
is ticked at its `next_deadline()`. Nothing sleeps; a heap orders the events.

    net = Network(10, seed=7, config=config)
    net.join_all()
    assert net.run_until(net.all_alive, timeout_s=10) is not None
    net.crash("n03")
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mesh.membership.core import Membership
from mesh.membership.messages import (
    Ack,
    EventKind,
    Gossip,
    MembershipConfig,
    Message,
    Ping,
    PingReq,
    PushPull,
    Send,
    State,
    UnknownMember,
    WrongTarget,
)


@dataclass(frozen=True)
class TraceEvent:
    """A membership event as seen by `observer`."""

    at: float
    observer: str
    kind: EventKind
    node_id: str
    incarnation: int


@dataclass
class SimNode:
    node_id: str
    address: str
    core: Membership
    crashed: bool = False
    left: bool = False
    tick_at: float = math.inf  # the tick event currently scheduled; others are stale

    @property
    def running(self) -> bool:
        return not self.crashed and not self.left


@dataclass
class NetworkStats:
    messages_sent: int = 0
    messages_lost: int = 0
    largest_piggyback_bytes: int = 0  # over every Ping, Ack, PingReq and Gossip


_Handler = Callable[[Membership, Message, float], object]


class Network:
    """N membership cores on a simulated network, named n00, n01, ... at "n00:1", ..."""

    def __init__(self, n_nodes: int, *, seed: int, config: MembershipConfig,
                 latency_s: float = 0.005, loss: float = 0.0) -> None:
        self.seed = seed
        self.config = config
        self.latency_s = latency_s
        self.loss = loss
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.trace: list[TraceEvent] = []
        self.stats = NetworkStats()
        self._rng = random.Random(seed)
        self._by_address: dict[str, SimNode] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._serial = itertools.count()
        for i in range(n_nodes):
            self.add_node(f"n{i:02d}")

    # -- building the cluster ------------------------------------------------

    def add_node(self, node_id: str) -> SimNode:
        address = f"{node_id}:1"
        core = Membership(node_id, address, (), self.config, random.Random(f"{self.seed}:{node_id}"), self.now)
        node = SimNode(node_id, address, core)
        self.nodes[node_id] = node
        self._by_address[address] = node
        self._schedule_tick(node)
        return node

    def join_all(self, seed_id: str = "n00", spread_s: float = 0.5) -> None:
        """Every other node joins via `seed_id`, at random times within `spread_s`."""
        for node in self.nodes.values():
            if node.node_id != seed_id:
                self._at(self.now + self._rng.uniform(0, spread_s), self.join, node.node_id, [seed_id])

    def join(self, node_id: str, seed_ids: Iterable[str]) -> None:
        node = self.nodes[node_id]
        sends = node.core.join([self.nodes[s].address for s in seed_ids], self.now)
        self._deliver_all(node, sends)

    # -- faults --------------------------------------------------------------

    def crash(self, node_id: str) -> None:
        """The node stops: it neither ticks nor answers, and keeps no timers."""
        self.nodes[node_id].crashed = True

    def leave(self, node_id: str) -> None:
        """Graceful leave; the node keeps answering (it only stops ticking)."""
        node = self.nodes[node_id]
        node.left = True
        self._deliver_all(node, node.core.leave(self.now))

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Block every message between the two groups, both ways."""
        group_b = list(group_b)
        for a in group_a:
            for b in group_b:
                self._blocked.add((a, b))
                self._blocked.add((b, a))

    def isolate(self, node_id: str) -> None:
        self.partition([node_id], [other for other in self.nodes if other != node_id])

    def heal(self) -> None:
        self._blocked.clear()

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
        return [node_id for node_id, node in self.nodes.items() if node.running]

    def views(self) -> dict[str, dict[str, tuple[State, int]]]:
        """observer -> member -> (state, incarnation), for running observers."""
        return {node_id: {m.node_id: (m.state, m.incarnation) for m in self.nodes[node_id].core.members()}
                for node_id in self.running_ids()}

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

    def _at(self, at: float, action: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._events, (at, next(self._serial), action, args))

    def _run_to(self, end: float) -> None:
        events = self._events
        while events and events[0][0] <= end:
            at, _, action, args = heapq.heappop(events)
            self.now = at
            action(*args)
        self.now = end

    def _schedule_tick(self, node: SimNode) -> None:
        deadline = node.core.next_deadline()
        if deadline < node.tick_at:
            node.tick_at = deadline
            self._at(max(deadline, self.now), self._on_tick, node, deadline)

    def _on_tick(self, node: SimNode, deadline: float) -> None:
        if node.crashed or node.tick_at != deadline:
            return
        node.tick_at = math.inf
        sends = node.core.tick(self.now)
        self._after_call(node)
        self._deliver_all(node, sends)

    def _after_call(self, node: SimNode) -> None:
        """Record what the core said happened and re-arm its timer, as the adapter does."""
        for e in node.core.drain_events():
            self.trace.append(TraceEvent(e.at, node.node_id, e.kind, e.node_id, e.incarnation))
        self._schedule_tick(node)

    # -- delivery ------------------------------------------------------------

    def _leg(self, src: SimNode, dst: SimNode, message: Message, action: Callable[..., None],
             *args: object) -> None:
        """One message on the wire: lost, blocked or delivered after `latency_s`."""
        self.stats.messages_sent += 1
        if not isinstance(message, PushPull):
            size = sum(u.size_bytes() for u in message.updates)
            if size > self.stats.largest_piggyback_bytes:
                self.stats.largest_piggyback_bytes = size
        if (src.node_id, dst.node_id) in self._blocked or (self.loss and self._rng.random() < self.loss):
            self.stats.messages_lost += 1
            return
        self._at(self.now + self.latency_s, action, *args)

    def _deliver_all(self, src: SimNode, sends: list[Send]) -> None:
        for send in sends:
            dst = self._by_address.get(send.address)
            if dst is not None:
                self._leg(src, dst, send.message, self._on_request, src, dst, send.message)

    def _on_request(self, src: SimNode, dst: SimNode, message: Message) -> None:
        if dst.crashed:
            return
        core, now = dst.core, self.now
        if isinstance(message, PingReq):
            self._relay(src, dst, message)
            return
        if isinstance(message, Ping):
            try:
                reply: Message = core.on_ping(message, now)
            except WrongTarget:
                return
            handler: _Handler = Membership.on_ack
        elif isinstance(message, Gossip):
            reply, handler = core.on_gossip(message, now), Membership.on_gossip_reply
        elif isinstance(message, PushPull):
            reply, handler = core.on_push_pull(message, now), Membership.on_push_pull_reply
        else:
            raise TypeError(f"{type(message).__name__} is not a request")
        self._after_call(dst)
        self._leg(dst, src, reply, self._on_reply, src, reply, handler)

    def _on_reply(self, dst: SimNode, reply: Message, handler: _Handler) -> None:
        if dst.crashed:
            return
        handler(dst.core, reply, self.now)
        self._after_call(dst)

    def _relay(self, requester: SimNode, relay: SimNode, req: PingReq) -> None:
        try:
            ping = relay.core.on_ping_req(req, self.now)
        except UnknownMember:
            return
        self._after_call(relay)
        target = self._by_address.get(req.target_address)
        if target is not None:
            self._leg(relay, target, ping, self._on_relayed_ping, requester, relay, target, req, ping)

    def _on_relayed_ping(self, requester: SimNode, relay: SimNode, target: SimNode, req: PingReq,
                         ping: Ping) -> None:
        if target.crashed:
            return
        try:
            ack = target.core.on_ping(ping, self.now)
        except WrongTarget:
            return
        self._after_call(target)
        self._leg(target, relay, ack, self._on_relayed_ack, requester, relay, req, ack)

    def _on_relayed_ack(self, requester: SimNode, relay: SimNode, req: PingReq, ack: Ack) -> None:
        if relay.crashed:
            return
        relayed = relay.core.on_relayed_ack(req, ack, self.now)
        self._after_call(relay)
        self._leg(relay, requester, relayed, self._on_reply, requester, relayed, Membership.on_ack)
