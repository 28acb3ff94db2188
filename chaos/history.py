"""What a chaos run saw: operations with their outcome, faults, samples, and the final state.

Everything the checkers judge is in a `RunRecord`, a plain value that can be written to
JSON and read back, so a checker can be run again on a saved run, and fed a doctored
record in a unit test to prove that it fails when its invariant is broken.

Times are seconds since the start of the run on the harness's monotonic clock (`t_s`).

Outcome of an operation, as a client saw it:
- acknowledged: the node answered that it did it (an Infer answered; a decision applied,
  held, or already known; a publish that wrote its version);
- refused: the node (or the client before sending) said it did not and will not;
- unknown: no answer (timeout, connection lost): a write may still take effect later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACKNOWLEDGED, REFUSED, UNKNOWN = "acknowledged", "refused", "unknown"
OUTCOMES = (ACKNOWLEDGED, REFUSED, UNKNOWN)

# gRPC codes after which a write may or may not have happened.
UNCERTAIN_CODES = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "CANCELLED", "INTERNAL", "AGENT"})
# Decision outcomes a node reports for a write it accepted.
ACCEPTED_DECISION_OUTCOMES = frozenset({"applied", "held", "noop", "denied"})


@dataclass
class Op:
    """One client operation. `detail` holds what the checkers need: decision_id, moves,
    the node's outcome and message, or the error code and message."""

    id: int
    kind: str  # infer | device-infer | move | approve | publish | publish-rogue | rollout-<action>
    node: str
    site: str
    start_s: float
    end_s: float | None = None
    outcome: str = UNKNOWN
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaultEvent:
    t_s: float
    action: str  # apply | heal
    nemesis: str
    description: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """A periodic observation of one node: kind `status` (membership view), `routes`
    (its group view and table), `inference` (active version) or `term` (Raft term)."""

    t_s: float
    node: str
    kind: str
    data: dict[str, Any]


@dataclass
class NodeFinal:
    """One node as seen after the run healed and settled (None where it did not answer)."""

    node: str
    site: str
    running: bool
    status: dict[str, Any] | None = None
    routes: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    inference: dict[str, Any] | None = None
    models: dict[str, Any] | None = None
    rollouts: dict[str, Any] | None = None  # rollout id -> what the node holds of it (rollout_documents)
    errors: list[str] = field(default_factory=list)


@dataclass
class RunSpec:
    """What the checkers must know about the cluster: who is where, the guard policy, keys,
    the model versions published (and the rogue ones, signed by a key outside the fleet)."""

    scenario: str
    seed: int
    sites: dict[str, str]  # node id -> site
    raft_addresses: dict[str, str]  # raft address (or any name a node gives its leader) -> node id
    guard: dict[str, dict[str, float]]  # decision kind -> limits
    group_sizes: dict[str, int]  # site -> members of its Raft group
    operator_key_ids: list[str]
    model: str
    published: list[str] = field(default_factory=list)  # versions published with the fleet's key
    rogue: list[str] = field(default_factory=list)  # versions signed by a key the fleet does not trust
    bad: list[str] = field(default_factory=list)  # published versions that answer wrongly (NaN) on purpose
    # version -> hex sha256 of the file published as it (fleet key only): what activating it must load
    published_sha256: dict[str, str] = field(default_factory=dict)
    # the workload's rollouts, in start order: {"rollout_id", "target", "baseline"}
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    tampered_audit: list[str] = field(default_factory=list)  # nodes whose audit log a nemesis altered
    membership_bound_s: float = 30.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RunRecord:
    spec: RunSpec
    ops: list[Op] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    final: dict[str, NodeFinal] = field(default_factory=dict)
    healed_at_s: float | None = None  # when the last fault healed
    settled_at_s: float | None = None  # when the settle phase ended
    converged_at_s: float | None = None  # first time every running node saw every running node alive
    measurements: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RunRecord:
        return cls(
            spec=RunSpec(**doc["spec"]),
            ops=[Op(**o) for o in doc.get("ops", [])],
            faults=[FaultEvent(**f) for f in doc.get("faults", [])],
            samples=[Sample(**s) for s in doc.get("samples", [])],
            final={k: NodeFinal(**v) for k, v in doc.get("final", {}).items()},
            healed_at_s=doc.get("healed_at_s"),
            settled_at_s=doc.get("settled_at_s"),
            converged_at_s=doc.get("converged_at_s"),
            measurements=doc.get("measurements", {}),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls.from_dict(json.loads(path.read_text()))


def write_outcome(error_code: str | None, phase: str, node_outcome: str | None) -> str:
    """The client-visible outcome of a decision write (move or approve).

    A failure before the write was sent (reading routes or the pending list) is a refusal;
    a failure of the write itself is unknown if the code leaves it open whether the group
    committed it, a refusal otherwise. An answered write is acknowledged unless the group
    refused it."""
    if error_code is None:
        return REFUSED if node_outcome == "refused" else ACKNOWLEDGED
    if phase in ("routes", "pending") or error_code == "CLIENT":
        return REFUSED
    return UNKNOWN if error_code in UNCERTAIN_CODES else REFUSED


def read_outcome(error_code: str | None) -> str:
    """Outcome of a read-only call (Infer): answered, refused by the node, or no answer."""
    if error_code is None:
        return ACKNOWLEDGED
    return UNKNOWN if error_code in ("DEADLINE_EXCEEDED", "AGENT", "CANCELLED") else REFUSED
