"""Membership protocol vocabulary: member states, gossip updates, messages, timings.

Everything here is plain data. The pure core (`core.py`) consumes and produces
these; the gRPC adapter (`service.py`) converts them to and from protobuf, and
the simulator can move them around in memory without any encoding at all.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Union


class State(enum.IntEnum):
    """What one node believes about another. Values match `mesh.v1.MemberState`."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


Labels = tuple[tuple[str, str], ...]
"""Labels as a sorted tuple of (key, value) so that updates stay hashable."""


def labels_from_mapping(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


@dataclass(frozen=True)
class Update:
    """One fact about one member, as gossiped: "node X at incarnation I is in state S"."""

    node_id: str
    address: str
    incarnation: int
    state: State
    labels: Labels = ()
    # Application metadata the member publishes about itself (which model
    # versions and chunks it holds), opaque to membership. It changes far more
    # often than the member's state, so it has its own version: at the same
    # incarnation a higher meta_version wins; a newer incarnation always brings
    # its own metadata.
    meta_version: int = 0
    meta: bytes = b""

    def size_bytes(self) -> int:
        """Upper estimate of this update's encoded size, used to bound piggyback payloads.

        Protobuf adds a tag and a length per field; 16 bytes of overhead per
        string field and 24 for the fixed fields over-estimates it safely.
        """
        text = len(self.node_id) + len(self.address)
        text += sum(len(k) + len(v) + 8 for k, v in self.labels)
        return text + len(self.meta) + 24 + 16 * 3


Updates = tuple[Update, ...]


@dataclass(frozen=True)
class Ping:
    """Direct probe. `target` is the node id the sender expects to reach."""

    sender: str
    target: str
    seq: int
    updates: Updates = ()


@dataclass(frozen=True)
class Ack:
    """Answer to a Ping (or, relayed, to a PingReq). `sender` is the probed node."""

    sender: str
    seq: int
    updates: Updates = ()


@dataclass(frozen=True)
class PingReq:
    """Ask a relay to probe `target` on the sender's behalf (SWIM's indirect probe)."""

    sender: str
    target: str
    target_address: str
    seq: int
    updates: Updates = ()


@dataclass(frozen=True)
class Gossip:
    """Dissemination round outside of probes; the reply carries the receiver's gossip."""

    sender: str
    updates: Updates = ()


@dataclass(frozen=True)
class PushPull:
    """Full-state exchange (anti-entropy and join). `members` includes the sender itself."""

    sender: str
    members: Updates = ()


Message = Union[Ping, Ack, PingReq, Gossip, PushPull]


@dataclass(frozen=True)
class Send:
    """An instruction from the core to its adapter: deliver `message` to `address`.

    `target_id` is the node id expected at that address, when known (it is not
    known for seed addresses at join). The adapter uses it to check the peer's
    certificate. Pings, PingReqs, Gossips and PushPulls are requests: the
    adapter hands their replies back to the core (`on_ack`, `on_gossip_reply`,
    `on_push_pull_reply`).
    """

    address: str
    target_id: str | None
    message: Message


class EventKind(enum.Enum):
    JOINED = "joined"        # first heard of this member
    ALIVE = "alive"          # was suspect or dead, is alive again
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    UPDATED = "updated"      # same state, new address or labels
    META = "meta"            # new application metadata (see Update.meta)


@dataclass(frozen=True)
class MemberEvent:
    kind: EventKind
    node_id: str
    incarnation: int
    at: float


@dataclass(frozen=True)
class MemberView:
    """One row of a node's view of the fleet, for status displays and tests."""

    node_id: str
    address: str
    labels: Labels
    state: State
    incarnation: int
    state_since: float
    last_heard: float | None  # last direct message from this member, None if never
    meta_version: int = 0
    meta: bytes = b""


class MembershipError(Exception):
    """Base of errors the core raises on bad input; the adapter maps them to gRPC statuses."""


class WrongTarget(MembershipError):
    """A message addressed to another node id arrived here."""


class UnknownMember(MembershipError):
    """A message names a member this node has never heard of."""


@dataclass(frozen=True)
class MembershipConfig:
    """SWIM timings. Defaults follow hashicorp/memberlist's DefaultLANConfig.

    memberlist LAN defaults, for comparison: ProbeInterval 1 s, ProbeTimeout
    500 ms, IndirectChecks 3, GossipInterval 200 ms, GossipNodes 3,
    SuspicionMult 4, RetransmitMult 4, PushPullInterval 30 s,
    GossipToTheDeadTime 30 s. We keep all of them; the one difference is the
    piggyback budget: memberlist caps a UDP packet at 1400 bytes, our
    messages ride gRPC over TCP, so `max_gossip_bytes` is 8 KiB, which lets a
    join storm of a few dozen nodes clear in one round without fragmenting.
    """

    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    gossip_interval_s: float = 0.2
    gossip_nodes: int = 3
    suspicion_mult: int = 4
    retransmit_mult: int = 4
    push_pull_interval_s: float = 30.0
    gossip_to_dead_s: float = 30.0
    max_gossip_bytes: int = 8192

    def __post_init__(self) -> None:
        problems = []
        if self.probe_interval_s <= 0:
            problems.append("probe_interval_s must be > 0")
        if not 0 < self.probe_timeout_s < self.probe_interval_s:
            problems.append("probe_timeout_s must be > 0 and < probe_interval_s")
        if self.indirect_checks < 0:
            problems.append("indirect_checks must be >= 0")
        if self.gossip_interval_s <= 0:
            problems.append("gossip_interval_s must be > 0")
        if self.gossip_nodes < 1:
            problems.append("gossip_nodes must be >= 1")
        if self.suspicion_mult < 1:
            problems.append("suspicion_mult must be >= 1")
        if self.retransmit_mult < 1:
            problems.append("retransmit_mult must be >= 1")
        if self.push_pull_interval_s <= 0:
            problems.append("push_pull_interval_s must be > 0")
        if self.max_gossip_bytes < 512:
            problems.append("max_gossip_bytes must be >= 512")
        if problems:
            raise ValueError("; ".join(problems))

    # Derived quantities. Everything that tests and benchmarks call "the bound
    # the timings imply" comes from here, so there is one definition of it.

    def suspicion_timeout_s(self, n_members: int) -> float:
        """memberlist: SuspicionMult * max(1, log10(n)) * ProbeInterval."""
        return self.suspicion_mult * max(1.0, math.log10(max(1, n_members))) * self.probe_interval_s

    def retransmit_limit(self, n_members: int) -> int:
        """memberlist: RetransmitMult * ceil(log10(n + 1))."""
        return self.retransmit_mult * math.ceil(math.log10(n_members + 1))

    def dissemination_s(self, n_members: int) -> float:
        """Time for an update to reach everyone by gossip: fan-out `gossip_nodes`
        per round reaches n nodes in about log_fanout(n) rounds; we allow twice
        that plus one round for piggybacking delays."""
        rounds = 2 * math.ceil(math.log(max(2, n_members), max(2, self.gossip_nodes))) + 1
        return rounds * self.gossip_interval_s

    def expected_detection_s(self, n_members: int) -> float:
        """Expected time from a crash to every survivor marking the node dead.

        With n-1 probers each probing one random-order member per interval, the
        first probe of the dead node arrives after about e/(e-1) intervals
        (SWIM paper, section 3.1); the failed probe cycle then takes one
        interval, then the suspicion timeout runs at each node once the
        suspicion reached it.
        """
        first_probe = self.probe_interval_s * math.e / (math.e - 1)
        return first_probe + self.probe_interval_s + self.suspicion_timeout_s(n_members) \
            + self.dissemination_s(n_members) / 2

    def detection_bound_s(self, n_members: int) -> float:
        """Worst case from a crash to every survivor marking the node dead.

        Round-robin probing guarantees that each live node probes every other
        member at least once in 2(n-1) - 1 intervals; add the failed probe
        cycle, dissemination of the suspicion and the suspicion timeout.
        """
        rounds = max(1, 2 * (n_members - 1) - 1)
        return (rounds + 1) * self.probe_interval_s + self.dissemination_s(n_members) \
            + self.suspicion_timeout_s(n_members)
