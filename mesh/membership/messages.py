"""Membership protocol vocabulary: member states, gossip updates, messages, events.

Everything here is plain data. The pure core (`core.py`) consumes and produces
these; the gRPC adapter (`service.py`) converts them to and from protobuf, and
the simulator can move them around in memory without any encoding at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    # SUSPECT only: the member whose probe failed (memberlist's suspect.From).
    # Lifeguard counts distinct accusers as independent confirmations; empty
    # (a peer that predates Lifeguard) starts a suspicion but confirms nothing.
    accuser: str = ""

    def size_bytes(self) -> int:
        """Upper estimate of this update's encoded size, used to bound piggyback payloads.

        Protobuf adds a tag and a length per field; 16 bytes of overhead per
        string field and 24 for the fixed fields over-estimates it safely.
        """
        text = len(self.node_id) + len(self.address) + len(self.accuser)
        text += sum(len(k) + len(v) + 8 for k, v in self.labels)
        return text + len(self.meta) + 24 + 16 * 4


Updates = tuple[Update, ...]


# Requests carry the name of the pool they belong to (`MembershipConfig.pool`;
# "" is the site pool), so that one gRPC service can serve several pools.


@dataclass(frozen=True)
class Ping:
    """Direct probe. `target` is the node id the sender expects to reach."""

    sender: str
    target: str
    seq: int
    updates: Updates = ()
    pool: str = ""


@dataclass(frozen=True)
class Ack:
    """Answer to a Ping (or, relayed, to a PingReq). `sender` is the probed node."""

    sender: str
    seq: int
    updates: Updates = ()


@dataclass(frozen=True)
class Nack:
    """A PingReq relay's answer when the target did not ack in time (Lifeguard).

    It tells the requester that the relay itself is alive and reachable, so a
    probe that fails with nacks says "the target is unreachable", one that
    fails without them says "maybe it is us": only the latter lowers the
    requester's local health. `sender` is the relay, `seq` the requester's.
    """

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
    pool: str = ""


@dataclass(frozen=True)
class Gossip:
    """Dissemination round outside of probes; the reply carries the receiver's gossip."""

    sender: str
    updates: Updates = ()
    pool: str = ""


@dataclass(frozen=True)
class PushPull:
    """State exchange (anti-entropy and join), one page at a time.

    `members` holds the sender's own entry, its entry about the recipient (so
    that a member we think dead hears it and refutes), and the sender's members
    whose ids sort after `page_after`, in id order, up to the sender's byte
    budget. `page_end` is the last id the range reached, or "" if it reached the
    end of the sender's table. A reply covers the range the request named.
    Paging keeps every message under the gRPC cap whatever the pool's size.
    """

    sender: str
    members: Updates = ()
    pool: str = ""
    page_after: str = ""
    page_end: str = ""


Message = Ping | Ack | Nack | PingReq | Gossip | PushPull


@dataclass(frozen=True)
class Send:
    """An instruction from the core to its adapter: deliver `message` to `address`.

    `target_id` is the node id expected at that address, when known (it is not
    known for seed addresses at join). The adapter uses it to check the peer's
    certificate. Pings, PingReqs, Gossips and PushPulls are requests: the
    adapter hands their replies back to the core (`on_ack`, `on_nack`,
    `on_gossip_reply`, `on_push_pull_reply`).
    """

    address: str
    target_id: str | None
    message: Message
    # How long the reply is worth waiting for (a probe's timeout, the rest of
    # the probe interval for a PingReq); None leaves it to the adapter.
    timeout_s: float | None = None


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


class WrongPool(MembershipError):
    """A message for another gossip pool reached this pool's core."""
