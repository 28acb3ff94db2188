"""Decisions, scope policy and the guard's verdict, without I/O.

Rules of this module:

- A `Decision` is what a node proposes to change in its site's replicated
  state: move streams off an overloaded node, reassign the streams of a dead
  node, return them once that node is back, or change per-node allocations.
  It is a frozen value; its identity is `digest()` (sha256 of its canonical
  JSON), which is what an operator's approval signs. A `nonce` makes two
  otherwise identical proposals distinct; `change` is what a decision does
  without who proposed it, why or when (two proposals with the same `change`
  are the same decision to an operator, and the ledger holds it once).
- `decide(decision, policy, group_size)` is a pure function: ALLOW when the
  decision's scope (nodes affected, fraction of the group, streams moved) is
  within the policy's limits for its kind, HOLD otherwise, with one human
  sentence per limit exceeded. It runs inside the replicated apply function,
  so every replica reaches the same verdict.
- Parsers (`Decision.from_dict`, `Policy.from_mapping`) are strict: unknown
  fields, wrong types and out-of-range values raise a typed error that names
  the field, never a KeyError or TypeError.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.identity.signing import canonical_json

DECISION_FORMAT = 1
DECISION_ID_HEX_CHARS = 16
MAX_REASON_CHARS = 512
# A site group is a handful to a few dozen devices; a decision touching more streams or
# allocations than this is a bug or an attack, not a plan.
MAX_MOVES = 1024
MAX_ALLOCATIONS = 256
MAX_SLOTS = 1_000_000

# Same grammar as membership node ids; stream ids may also hold ':' and '/' (e.g. "rtsp/cam-3").
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
STREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class GuardError(Exception):
    """Root of every error raised by `mesh.guard`."""


class DecisionError(GuardError):
    """A decision document is malformed or inconsistent (names the field and what is wrong)."""


class PolicyError(GuardError):
    """The [guard] policy configuration is invalid (names the field and the expected value)."""


class DecisionKind(enum.Enum):
    """What a decision changes."""

    MOVE_STREAMS = "move_streams"  # move streams off an overloaded node
    REASSIGN_STREAMS = "reassign_streams"  # serve the streams of a node membership marks dead elsewhere
    RETURN_STREAMS = "return_streams"  # give a node that is back the streams a reassignment took from it
    SET_ALLOCATION = "set_allocation"  # change per-node allocations (max concurrent inference slots)


@dataclass(frozen=True, order=True)
class StreamMove:
    """Stream `stream`, served by `from_node`, is to be served by `to_node`."""

    stream: str
    from_node: str
    to_node: str

    def to_dict(self) -> dict[str, str]:
        return {"stream": self.stream, "from": self.from_node, "to": self.to_node}


@dataclass(frozen=True, order=True)
class Allocation:
    """Node `node` may run at most `slots` concurrent inferences."""

    node: str
    slots: int

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "slots": self.slots}


@dataclass(frozen=True)
class Scope:
    """How much of a group a decision touches."""

    nodes_affected: int
    fraction_of_group: float
    streams_moved: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes_affected": self.nodes_affected,
            "fraction_of_group": self.fraction_of_group,
            "streams_moved": self.streams_moved,
        }


#: What a decision does, without who proposed it, why or when (`Decision.change`).
DecisionChange = tuple[DecisionKind, tuple[StreamMove, ...], tuple[Allocation, ...]]


@dataclass(frozen=True)
class Decision:
    """A proposed change to a site's replicated state.

    `moves` and `allocations` are kept sorted, so the same change has one
    digest whatever order the proposer listed it in.
    """

    kind: DecisionKind
    group: str
    proposer: str
    reason: str
    proposed_at: float
    nonce: str
    moves: tuple[StreamMove, ...] = ()
    allocations: tuple[Allocation, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)  # before sorting: sorting compares fields, which must be checked first
        object.__setattr__(self, "moves", tuple(sorted(self.moves)))
        object.__setattr__(self, "allocations", tuple(sorted(self.allocations)))

    @property
    def affected_nodes(self) -> frozenset[str]:
        """Every node whose load or allocation this decision changes (sources and destinations)."""
        nodes = {m.from_node for m in self.moves} | {m.to_node for m in self.moves}
        return frozenset(nodes | {a.node for a in self.allocations})

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(m.stream for m in self.moves)

    @property
    def change(self) -> DecisionChange:
        """What the decision does (kind, moves, allocations), without proposer, reason, time or nonce:
        two decisions with the same change differ only in who asked, why and when."""
        return (self.kind, self.moves, self.allocations)

    def scope(self, group_size: int) -> Scope:
        if group_size < 1:
            raise DecisionError(f"group size must be at least 1, got {group_size}")
        nodes = len(self.affected_nodes)
        return Scope(nodes, nodes / group_size, len(self.moves))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DECISION_FORMAT,
            "kind": self.kind.value,
            "group": self.group,
            "proposer": self.proposer,
            "reason": self.reason,
            "proposed_at": self.proposed_at,
            "nonce": self.nonce,
            "moves": [m.to_dict() for m in self.moves],
            "allocations": [a.to_dict() for a in self.allocations],
        }

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of `to_dict()`: what an approval signs. Computed once per
        (immutable) decision: every replica's apply, the audit and the answer all ask for it."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = hashlib.sha256(canonical_json(self.to_dict())).hexdigest()
            object.__setattr__(self, "_digest", cached)
        return cached

    @property
    def decision_id(self) -> str:
        """Short name for people and commands: the first 16 hex chars of the digest."""
        return self.digest()[:DECISION_ID_HEX_CHARS]

    def describe(self) -> str:
        """One line for logs and the admin table."""
        if self.kind is DecisionKind.SET_ALLOCATION:
            what = ", ".join(f"{a.node}={a.slots}" for a in self.allocations)
        else:
            what = ", ".join(f"{m.stream} {m.from_node}->{m.to_node}" for m in self.moves)
        return f"{self.kind.value} {self.decision_id} by {self.proposer} in {self.group}: {what}"

    @classmethod
    def from_dict(cls, doc: object) -> Decision:
        """Parse and validate a decision document; raise DecisionError naming the bad field."""
        d = expect_fields(doc, "decision", _DECISION_FIELDS, DecisionError)
        if type(d["format"]) is not int or d["format"] != DECISION_FORMAT:
            raise DecisionError(
                f"decision.format: unsupported format {d['format']!r}; this node reads format 1"
            )
        kind = d["kind"]
        try:
            kind = DecisionKind(kind)
        except (ValueError, TypeError):
            names = ", ".join(k.value for k in DecisionKind)
            raise DecisionError(f"decision.kind: unknown kind {kind!r}; expected one of {names}") from None
        moves_doc = _list(d["moves"], "decision.moves", MAX_MOVES)
        allocations_doc = _list(d["allocations"], "decision.allocations", MAX_ALLOCATIONS)
        moves = []
        for i, m in enumerate(moves_doc):
            f = expect_fields(m, f"decision.moves[{i}]", frozenset({"stream", "from", "to"}), DecisionError)
            moves.append(StreamMove(f["stream"], f["from"], f["to"]))
        allocations = []
        for i, a in enumerate(allocations_doc):
            f = expect_fields(a, f"decision.allocations[{i}]", frozenset({"node", "slots"}), DecisionError)
            allocations.append(Allocation(f["node"], f["slots"]))
        proposed_at = as_seconds(d["proposed_at"])
        if proposed_at is None:
            raise DecisionError(
                f"decision.proposed_at: expected seconds since the epoch >= 0, got {d['proposed_at']!r}"
            )
        return cls(
            kind=kind,
            group=d["group"],
            proposer=d["proposer"],
            reason=d["reason"],
            proposed_at=proposed_at,
            nonce=d["nonce"],
            moves=tuple(moves),
            allocations=tuple(allocations),
        )


_DECISION_FIELDS = frozenset(
    {"format", "kind", "group", "proposer", "reason", "proposed_at", "nonce", "moves", "allocations"}
)


def expect_fields(
    doc: object, where: str, expected: frozenset[str], error: type[Exception]
) -> dict[str, Any]:
    """Check that `doc` is an object with exactly the `expected` keys."""
    if not isinstance(doc, dict):
        raise error(f"{where}: expected an object, got {type(doc).__name__}")
    missing = sorted(expected - doc.keys())
    if missing:
        raise error(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in doc.keys() - expected)
    if unknown:
        raise error(
            f"{where}: unknown field(s) {', '.join(unknown)}; expected only {', '.join(sorted(expected))}"
        )
    return doc


def _list(value: object, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise DecisionError(f"{where}: expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise DecisionError(f"{where}: {len(value)} entries, at most {limit} allowed")
    return value


def _check_id(value: object, where: str, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise DecisionError(f"{where}: {value!r} is not a valid {what} (expected {pattern.pattern})")


def _validate(d: Decision) -> None:
    if not isinstance(d.kind, DecisionKind):
        raise DecisionError(f"decision.kind: expected a DecisionKind, got {d.kind!r}")
    _check_id(d.group, "decision.group", NODE_ID_RE, "group name")
    _check_id(d.proposer, "decision.proposer", NODE_ID_RE, "node id")
    _check_id(d.nonce, "decision.nonce", _NONCE_RE, "nonce")
    if not is_text(d.reason, MAX_REASON_CHARS):
        raise DecisionError(f"decision.reason: expected text of at most {MAX_REASON_CHARS} characters")
    if type(d.proposed_at) is not float or not math.isfinite(d.proposed_at) or d.proposed_at < 0:
        raise DecisionError(
            f"decision.proposed_at: expected seconds since the epoch >= 0, got {d.proposed_at!r}"
        )
    for name in ("moves", "allocations"):
        if not isinstance(getattr(d, name), (tuple, list)):
            raise DecisionError(
                f"decision.{name}: expected a sequence, got {type(getattr(d, name)).__name__}"
            )
    for i, m in enumerate(d.moves):
        if not isinstance(m, StreamMove):
            raise DecisionError(f"decision.moves[{i}]: expected a StreamMove, got {type(m).__name__}")
        _check_id(m.stream, f"decision.moves[{i}].stream", STREAM_ID_RE, "stream id")
        _check_id(m.from_node, f"decision.moves[{i}].from", NODE_ID_RE, "node id")
        _check_id(m.to_node, f"decision.moves[{i}].to", NODE_ID_RE, "node id")
        if m.from_node == m.to_node:
            raise DecisionError(f"decision.moves[{i}]: stream {m.stream} moves from {m.from_node} to itself")
    for i, a in enumerate(d.allocations):
        if not isinstance(a, Allocation):
            raise DecisionError(f"decision.allocations[{i}]: expected an Allocation, got {type(a).__name__}")
        _check_id(a.node, f"decision.allocations[{i}].node", NODE_ID_RE, "node id")
        if type(a.slots) is not int or not 0 <= a.slots <= MAX_SLOTS:
            raise DecisionError(
                f"decision.allocations[{i}].slots: expected an integer 0..{MAX_SLOTS}, got {a.slots!r}"
            )
    streams = [m.stream for m in d.moves]
    if len(set(streams)) != len(streams):
        raise DecisionError("decision.moves: a stream is listed twice; each stream moves at most once")
    nodes = [a.node for a in d.allocations]
    if len(set(nodes)) != len(nodes):
        raise DecisionError("decision.allocations: a node is listed twice; give each node one allocation")
    if d.kind is DecisionKind.SET_ALLOCATION:
        if not d.allocations or d.moves:
            raise DecisionError("decision: set_allocation needs at least one allocation and no moves")
    else:
        if not d.moves or d.allocations:
            raise DecisionError(f"decision: {d.kind.value} needs at least one move and no allocations")
    if d.kind is DecisionKind.REASSIGN_STREAMS and len({m.from_node for m in d.moves}) != 1:
        raise DecisionError(
            "decision: reassign_streams takes the streams of one dead node; every move needs the same 'from'"
        )
    if d.kind is DecisionKind.RETURN_STREAMS and len({m.to_node for m in d.moves}) != 1:
        raise DecisionError(
            "decision: return_streams gives streams back to one node; every move needs the same 'to'"
        )


# --- policy -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The autonomous scope of one decision kind: above any limit, the decision waits for an operator."""

    max_nodes: int
    max_fraction: float
    max_streams: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_nodes": self.max_nodes,
            "max_fraction": self.max_fraction,
            "max_streams": self.max_streams,
        }


# Defaults an operator would accept without reading them: a move between two nodes, a dead node's streams
# spread over two survivors (and given back to it from two), one node's allocation; never more than half the
# group at once.
DEFAULT_LIMITS: Mapping[DecisionKind, Limits] = {
    DecisionKind.MOVE_STREAMS: Limits(max_nodes=2, max_fraction=0.5, max_streams=5),
    DecisionKind.REASSIGN_STREAMS: Limits(max_nodes=3, max_fraction=0.5, max_streams=8),
    DecisionKind.RETURN_STREAMS: Limits(max_nodes=3, max_fraction=0.5, max_streams=8),
    DecisionKind.SET_ALLOCATION: Limits(max_nodes=1, max_fraction=0.5, max_streams=0),
}
DEFAULT_HOLD_TTL_S = 3600.0
MAX_HOLD_TTL_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class Policy:
    """Per-kind limits, how long a held decision waits for an operator before it expires, and the site's
    own limit on a rollout wave's share of the selected devices (None: the signed plan's scope alone;
    a site can narrow the publisher's scope, never widen it)."""

    limits: Mapping[DecisionKind, Limits] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    hold_ttl_s: float = DEFAULT_HOLD_TTL_S
    rollout_max_share: float | None = None

    def __post_init__(self) -> None:
        # Every kind present (defaults fill the gaps) and read-only, so two equal policies compare equal and
        # nobody changes a replica's policy under it.
        for kind, limits in self.limits.items():
            if not isinstance(kind, DecisionKind) or not isinstance(limits, Limits):
                raise PolicyError(f"guard: limits must map DecisionKind to Limits, got {kind!r}: {limits!r}")
        full = {kind: self.limits.get(kind, DEFAULT_LIMITS[kind]) for kind in DecisionKind}
        object.__setattr__(self, "limits", types.MappingProxyType(full))
        if not 0 < self.hold_ttl_s <= MAX_HOLD_TTL_S:
            raise PolicyError(
                f"guard.hold_ttl_s: expected seconds in (0, {MAX_HOLD_TTL_S:.0f}], got {self.hold_ttl_s!r}"
            )
        _check_rollout_share(self.rollout_max_share)

    @property
    def rollout_max_share_ppm(self) -> int | None:
        """`rollout_max_share` in parts per million (the nearest: 0.29 is 290000, not 289999), or None."""
        if self.rollout_max_share is None:
            return None
        return round(self.rollout_max_share * 1_000_000)

    def limits_for(self, kind: DecisionKind) -> Limits:
        return self.limits[kind]

    def to_mapping(self) -> dict[str, Any]:
        """The [guard] table this policy would be read from (round-trips through `from_mapping`)."""
        doc: dict[str, Any] = {"hold_ttl_s": self.hold_ttl_s}
        if self.rollout_max_share is not None:
            doc["rollout_max_share"] = self.rollout_max_share
        for kind in DecisionKind:
            doc[kind.value] = self.limits_for(kind).to_dict()
        return doc

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> Policy:
        """Read the node config's [guard] table; missing entries take the defaults.

        Example (TOML)::

            [guard]
            hold_ttl_s = 3600
            rollout_max_share = 0.05   # a rollout wave above 5% of the devices waits for an operator
            [guard.move_streams]
            max_nodes = 2
            max_fraction = 0.5
            max_streams = 5
        """
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise PolicyError(f"guard: expected a table, got {type(table).__name__}")
        known = {"hold_ttl_s", "rollout_max_share"} | {k.value for k in DecisionKind}
        for key in table:
            if key not in known:
                raise PolicyError(f"guard.{key}: unknown setting; expected one of {', '.join(sorted(known))}")
        hold_ttl_s = table.get("hold_ttl_s", DEFAULT_HOLD_TTL_S)
        if (
            isinstance(hold_ttl_s, bool)
            or not isinstance(hold_ttl_s, (int, float))
            or not (0 < hold_ttl_s <= MAX_HOLD_TTL_S)
        ):
            raise PolicyError(
                f"guard.hold_ttl_s: expected seconds in (0, {MAX_HOLD_TTL_S:.0f}], got {hold_ttl_s!r}"
            )
        limits = {}
        for kind in DecisionKind:
            limits[kind] = _limits_from(table.get(kind.value), kind)
        share = table.get("rollout_max_share")
        _check_rollout_share(share)
        return cls(
            limits=limits,
            hold_ttl_s=float(hold_ttl_s),
            rollout_max_share=None if share is None else float(share),
        )


def _check_rollout_share(share: object) -> None:
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise PolicyError(
            f"guard.rollout_max_share: expected a fraction between 0 and 1 (0.1 = a wave may reach 10% of "
            f"the selected devices before an operator approves), got {share!r}"
        )


def _limits_from(value: object, kind: DecisionKind) -> Limits:
    default = DEFAULT_LIMITS[kind]
    if value is None:
        return default
    where = f"guard.{kind.value}"
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: expected a table with max_nodes, max_fraction, max_streams")
    for key in value:
        if key not in ("max_nodes", "max_fraction", "max_streams"):
            raise PolicyError(
                f"{where}.{key}: unknown limit; expected max_nodes, max_fraction or max_streams"
            )
    out = {}
    for name in ("max_nodes", "max_streams"):
        v = value.get(name, getattr(default, name))
        if type(v) is not int or v < 0:
            raise PolicyError(f"{where}.{name}: expected a whole number >= 0, got {v!r}")
        out[name] = v
    fraction = value.get("max_fraction", default.max_fraction)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise PolicyError(f"{where}.max_fraction: expected a fraction between 0 and 1, got {fraction!r}")
    return Limits(max_nodes=out["max_nodes"], max_fraction=float(fraction), max_streams=out["max_streams"])


# --- verdict ------------------------------------------------------------------------------------------


class VerdictOutcome(enum.Enum):
    ALLOW = "allow"
    HOLD = "hold"


@dataclass(frozen=True)
class Verdict:
    """The guard's answer: ALLOW, or HOLD with one sentence per limit the decision exceeds."""

    outcome: VerdictOutcome
    scope: Scope
    limits: Limits
    exceeded: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome is VerdictOutcome.ALLOW


def decide(decision: Decision, policy: Policy, group_size: int) -> Verdict:
    """ALLOW if `decision` stays within `policy` for its kind in a group of `group_size` nodes, else HOLD."""
    scope = decision.scope(group_size)
    limits = policy.limits_for(decision.kind)
    kind = decision.kind.value
    exceeded = []
    if scope.streams_moved > limits.max_streams:
        exceeded.append(f"moves {scope.streams_moved} streams, policy allows {limits.max_streams} for {kind}")
    if scope.nodes_affected > limits.max_nodes:
        exceeded.append(f"affects {scope.nodes_affected} nodes, policy allows {limits.max_nodes} for {kind}")
    # Compare the count with max_fraction * group_size; the small tolerance keeps "2 of 6 nodes" within a
    # limit of 1/3 despite float rounding.
    if scope.nodes_affected > limits.max_fraction * group_size + 1e-9:
        exceeded.append(
            f"affects {scope.fraction_of_group:.0%} of the group "
            f"({scope.nodes_affected} of {group_size} nodes), "
            f"policy allows {limits.max_fraction:.0%} for {kind}"
        )
    outcome = VerdictOutcome.HOLD if exceeded else VerdictOutcome.ALLOW
    return Verdict(outcome, scope, limits, tuple(exceeded))


def as_seconds(value: object) -> float | None:
    """`value` as float seconds if it is a finite number >= 0 (not a bool), else None."""
    if type(value) is not int and type(value) is not float:  # exact types: bool is an int
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def is_text(value: object, max_chars: int) -> bool:
    """A string of at most `max_chars` that UTF-8 can encode (JSON lets a lone surrogate through)."""
    if not isinstance(value, str) or len(value) > max_chars:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None
