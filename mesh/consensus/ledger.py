"""The replicated state machine of a site's Raft group: routing, allocations, held decisions. Pure.

Rules of this module (everything a replica believes about its site lives here):

- State: routing table (stream id -> serving node), per-node allocations (max
  concurrent inference slots), decisions held for an operator, the outcome of
  finished decisions, used approval nonces, a bounded history, and the
  displacements: streams a reassignment took from their node, and where it put
  them (what a `return_streams` decision may give back, and only that).
- Input: only committed commands, as bytes (`DecisionLedger.apply`), in the
  form `mesh.consensus.commands` defines: canonical JSON with a `"now"`
  stamped by whoever submitted it. Apply reads no clock: the ledger's time is
  the largest `now` it has seen (so a stale stamp can never rewind it), and
  every replica applying the same log reaches the same `state_digest()`.
- The guard runs here, on every replica: a proposal within the policy's scope
  is applied at once; one above scope is HELD and applied only when an
  approval signed by a trusted OPERATOR key for exactly its digest is
  committed, whichever node proposed it. A denial finishes it unapplied; a
  hold past its TTL is dropped by an `expire` command (or by the first
  approval that arrives too late). Re-proposing a finished or held decision is
  a noop; a decision proposed more than the hold TTL ago is stale and refused,
  which is what lets the ledger forget old outcomes and nonces.
- A decision is held once: a proposal whose change (kind, moves, allocations)
  equals a held decision's is a noop, audited as `duplicate`, whatever its
  nonce, proposer or reason.
- A held decision whose premise is gone (the dead node it reassigns is alive
  again) is finished unapplied by a `withdraw` command, audited and shown as
  `withdrawn`; an approval that arrives afterwards is refused saying so. Like
  an expiry, a withdrawal only ever stops a decision, never applies one.
- A node can lie about `now`. Pushing the clock forward only expires holds and
  approvals (refusals, never applies); the guard's promise does not depend on
  any node's honesty, only on operator signatures.
- `apply` never raises on bad input: malformed commands, bad approvals and
  stale decisions come back as REFUSED with an audit event, so the Raft
  thread keeps running and every replica audits the same refusal.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from mesh.consensus.commands import (
    ApproveCommand,
    CommandError,
    DenyCommand,
    ExpireCommand,
    LedgerError,
    ProposeCommand,
    RemoveMemberCommand,
    SetRoutesCommand,
    WithdrawCommand,
    check_now,
    decode_command,
    strict_json,
    validate_set_routes,
)
from mesh.guard.approval import (
    Approval,
    ApprovalRefused,
    ReplayedApproval,
    verify_approval,
)
from mesh.guard.audit import AuditEvent
from mesh.guard.core import (
    NODE_ID_RE,
    Decision,
    DecisionError,
    DecisionKind,
    Policy,
    Scope,
    decide,
)
from mesh.identity.revocation import RevocationError, verify_revocation
from mesh.identity.signing import TrustedKeys, canonical_json

SNAPSHOT_FORMAT = 2
# Format 1 (no displacements, no finished details) is still restored: a replica that upgrades mid-log must
# read its own and its peers' older snapshots.
_READABLE_SNAPSHOT_FORMATS = (1, 2)
# Enough to show an operator the last few days of a busy site; older entries fall off the front.
MAX_HISTORY_ENTRIES = 4096
APPROVE_HINT = "mesh admin approve {decision_id}"

guard_log = logging.getLogger("mesh.guard")


class SnapshotError(LedgerError):
    """A snapshot cannot be restored (wrong format, wrong group, or damaged)."""


class Outcome(enum.Enum):
    APPLIED = "applied"
    HELD = "held"
    DENIED = "denied"
    REFUSED = "refused"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"
    NOOP = "noop"



@dataclass(frozen=True)
class HeldDecision:
    """A decision above the autonomous scope, waiting for an operator until `expires_at`."""

    decision: Decision
    held_at: float
    expires_at: float
    scope: Scope
    exceeded: tuple[str, ...]

    @property
    def decision_id(self) -> str:
        return self.decision.decision_id

    @property
    def waiting_for(self) -> str:
        """What unblocks it, for the admin table and the hold warning."""
        return f"an operator approval: {APPROVE_HINT.format(decision_id=self.decision_id)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.to_dict(),
            "held_at": self.held_at,
            "expires_at": self.expires_at,
            "scope": self.scope.to_dict(),
            "exceeded": list(self.exceeded),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> HeldDecision:
        scope = doc["scope"]
        return cls(
            decision=Decision.from_dict(doc["decision"]),
            held_at=float(doc["held_at"]),
            expires_at=float(doc["expires_at"]),
            scope=Scope(
                int(scope["nodes_affected"]), float(scope["fraction_of_group"]), int(scope["streams_moved"])
            ),
            exceeded=tuple(str(s) for s in doc["exceeded"]),
        )


@dataclass(frozen=True)
class Displacement:
    """Stream taken from `home` by reassignment `decision_id` (applied at `at`), now served by `holder`."""

    home: str
    holder: str
    decision_id: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"home": self.home, "holder": self.holder, "decision_id": self.decision_id, "at": self.at}

    @classmethod
    def from_dict(cls, doc: Any) -> Displacement:
        for key in ("home", "holder"):
            if not isinstance(doc[key], str) or not NODE_ID_RE.fullmatch(doc[key]):
                raise ValueError(f"displacement {key} {doc[key]!r} is not a node id")
        return cls(doc["home"], doc["holder"], str(doc["decision_id"]), float(doc["at"]))


@dataclass(frozen=True)
class HistoryEntry:
    """What became of a decision (or of an approval for one)."""

    decision_id: str | None
    outcome: str  # applied, denied, expired, refused, withdrawn, member_removed
    at: float
    detail: str
    key_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "outcome": self.outcome,
            "at": self.at,
            "detail": self.detail,
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> HistoryEntry:
        return cls(
            doc["decision_id"], str(doc["outcome"]), float(doc["at"]), str(doc["detail"]), doc["key_id"]
        )


@dataclass(frozen=True)
class ApplyResult:
    """What one command did, and the audit events every replica produces for it."""

    outcome: Outcome
    decision_id: str | None
    message: str
    audit: tuple[AuditEvent, ...] = ()


@dataclass(frozen=True)
class _Finished:
    outcome: str
    proposed_at: float
    finished_at: float
    detail: str = ""  # why, when that is worth telling a late approver (a withdrawal's reason)

    def forgettable(self, clock: float, ttl_s: float) -> bool:
        """Too old to be proposed again (stale) and finished at least a TTL ago (shown for that long)."""
        return max(self.proposed_at, self.finished_at) + ttl_s <= clock


class DecisionLedger:
    """One replica's copy of a site's routing table, allocations and guarded decisions.

    `policy`, `group_size` and `trusted` are configuration: every replica of the
    group must be built with the same values, or they will disagree.
    """

    def __init__(self, *, group: str, policy: Policy, group_size: int, trusted: TrustedKeys,
                 members: frozenset[str] | None = None) -> None:
        if not isinstance(group, str) or not NODE_ID_RE.fullmatch(group):
            raise ValueError(f"group name {group!r} is not valid (expected {NODE_ID_RE.pattern})")
        if group_size < 1:
            raise ValueError(f"group size must be at least 1, got {group_size}")
        self.group = group
        self.policy = policy
        self.group_size = group_size
        self.trusted = trusted
        self.members = members  # the configured members (None: not checked, for tests of other rules)
        self._reset()

    def _reset(self) -> None:
        self._clock = 0.0
        self._routes: dict[str, str] = {}
        self._allocations: dict[str, int] = {}
        self._pending: dict[str, HeldDecision] = {}
        self._finished: dict[str, _Finished] = {}
        self._used_nonces: dict[str, float] = {}
        self._history: list[HistoryEntry] = []
        self._displaced: dict[str, Displacement] = {}
        self._removed: dict[str, str] = {}  # member removed by a revocation -> that revocation's signature

    # --- views ---

    @property
    def clock(self) -> float:
        """The largest `now` of any applied command."""
        return self._clock

    def routes(self) -> dict[str, str]:
        return dict(self._routes)

    def allocations(self) -> dict[str, int]:
        return dict(self._allocations)

    def pending(self) -> tuple[HeldDecision, ...]:
        """Held decisions, oldest first."""
        return tuple(sorted(self._pending.values(), key=lambda h: (h.held_at, h.decision_id)))

    def history(self) -> tuple[HistoryEntry, ...]:
        return tuple(self._history)

    def displaced(self) -> dict[str, Displacement]:
        """Stream id -> the reassignment that took it from its node, for streams still where it put them."""
        return dict(self._displaced)

    def removed_members(self) -> dict[str, str]:
        """Members whose removal an operator's revocation authorised -> the revocation's signature."""
        return dict(self._removed)

    def outcome_of(self, decision_id: str) -> str | None:
        """'held', 'applied', 'denied', 'expired', 'refused', 'withdrawn', or None if unknown or forgotten."""
        if decision_id in self._pending:
            return "held"
        finished = self._finished.get(decision_id)
        return finished.outcome if finished else None

    # --- apply ---

    def apply(self, command: bytes) -> ApplyResult:
        """Apply one committed command; never raises on bad input (see the module rules)."""
        try:
            cmd = decode_command(command)
        except CommandError as exc:
            return self._refuse(None, "malformed_command", str(exc))
        self._clock = max(self._clock, cmd.now)
        if isinstance(cmd, ProposeCommand):
            return self._propose(cmd.decision)
        if isinstance(cmd, (ApproveCommand, DenyCommand)):
            return self._answer(cmd.approval)
        if isinstance(cmd, ExpireCommand):
            return self._expire()
        if isinstance(cmd, WithdrawCommand):
            return self._withdraw(cmd)
        if isinstance(cmd, RemoveMemberCommand):
            return self._remove_member(cmd)
        return self._set_routes(cmd)

    def _refuse(
        self,
        decision_id: str | None,
        reason: str,
        message: str,
        *,
        key_id: str | None = None,
        finish: bool = False,
    ) -> ApplyResult:
        if finish and decision_id is not None:
            self._pending.pop(decision_id, None)
        self._record(HistoryEntry(decision_id, "refused", self._clock, f"{reason}: {message}", key_id))
        payload = {"decision_id": decision_id, "reason": reason, "message": message, "at": self._clock}
        if key_id is not None:
            payload["key_id"] = key_id
        return ApplyResult(Outcome.REFUSED, decision_id, message, (AuditEvent("refused", payload),))

    def _record(self, entry: HistoryEntry) -> None:
        self._history.append(entry)
        if len(self._history) > MAX_HISTORY_ENTRIES:
            del self._history[: len(self._history) - MAX_HISTORY_ENTRIES]

    def _propose(self, decision: Decision) -> ApplyResult:
        decision_id = decision.decision_id
        held = self._pending.get(decision_id)
        if held is not None:
            if held.decision.digest() != decision.digest():
                return self._refuse(decision_id, "id_collision", "another decision with this id is held")
            return ApplyResult(Outcome.NOOP, decision_id, f"decision {decision_id} is already held")
        finished = self._finished.get(decision_id)
        if finished is not None:
            return ApplyResult(
                Outcome.NOOP, decision_id, f"decision {decision_id} was already {finished.outcome}"
            )
        if decision.group != self.group:
            return self._refuse(
                decision_id,
                "wrong_group",
                f"decision {decision_id} is for group {decision.group}, this is {self.group}",
            )
        if decision.proposed_at + self.policy.hold_ttl_s <= self._clock:
            return self._refuse(
                decision_id,
                "stale",
                f"decision {decision_id} was proposed at {decision.proposed_at:.0f}, more than "
                f"{self.policy.hold_ttl_s:.0f} s ago; propose it again",
            )
        twin = next((h for h in self._pending.values() if h.decision.change == decision.change), None)
        if twin is not None:
            # The same change proposed twice (two members noticing the same death, a retry with a new nonce):
            # an operator must see and answer it once.
            message = (
                f"decision {decision_id} changes exactly what held decision {twin.decision_id} changes; "
                f"not held twice (answer {twin.decision_id})"
            )
            duplicate = AuditEvent(
                "duplicate",
                {
                    "decision_id": decision_id,
                    "held_as": twin.decision_id,
                    "kind": decision.kind.value,
                    "proposer": decision.proposer,
                    "at": self._clock,
                },
            )
            return ApplyResult(Outcome.NOOP, decision_id, message, (duplicate,))
        problem = self._precondition(decision)
        if problem:
            return self._refuse(decision_id, "state_changed", f"decision {decision_id}: {problem}")
        verdict = decide(decision, self.policy, self.group_size)
        proposed = AuditEvent(
            "proposed",
            {
                "decision_id": decision_id,
                "digest": decision.digest(),
                "kind": decision.kind.value,
                "proposer": decision.proposer,
                "reason": decision.reason,
                "moves": [m.to_dict() for m in decision.moves],
                "allocations": [a.to_dict() for a in decision.allocations],
                "scope": verdict.scope.to_dict(),
                "at": self._clock,
            },
        )
        if verdict.allowed:
            applied = self._apply_decision(decision, approved_by=None)
            return ApplyResult(
                Outcome.APPLIED, decision_id, f"applied {decision.describe()}", (proposed, applied)
            )
        held = HeldDecision(
            decision, self._clock, self._clock + self.policy.hold_ttl_s, verdict.scope, verdict.exceeded
        )
        self._pending[decision_id] = held
        scope = verdict.scope
        guard_log.warning(
            "held decision %s: scope %d nodes (%.0f%% of %d), %d streams; %s; waiting for %s",
            decision.describe(),
            scope.nodes_affected,
            100 * scope.fraction_of_group,
            self.group_size,
            scope.streams_moved,
            "; ".join(verdict.exceeded),
            held.waiting_for,
        )
        held_event = AuditEvent(
            "held",
            {
                "decision_id": decision_id,
                "scope": scope.to_dict(),
                "limits": verdict.limits.to_dict(),
                "exceeded": list(verdict.exceeded),
                "expires_at": held.expires_at,
                "at": self._clock,
            },
        )
        message = f"held {decision_id}: " + "; ".join(verdict.exceeded)
        return ApplyResult(Outcome.HELD, decision_id, message, (proposed, held_event))

    def _precondition(self, decision: Decision) -> str | None:
        """Why `decision` no longer fits the current state, or None."""
        for move in decision.moves:
            serving = self._routes.get(move.stream)
            if serving != move.from_node:
                now_at = f"served by {serving}" if serving else "not routed"
                return f"stream {move.stream} is {now_at}, not by {move.from_node}"
        if decision.kind is DecisionKind.RETURN_STREAMS:
            # A return gives a node back what a reassignment took from it, nothing else: a general move
            # is a move_streams decision, under its own limits.
            for move in decision.moves:
                taken = self._displaced.get(move.stream)
                if taken is None or taken.home != move.to_node:
                    return f"stream {move.stream} was not taken from {move.to_node} by a reassignment"
        return None

    def _displace(self, decision: Decision) -> None:
        """Keep the displacements in step with an applied decision's moves."""
        for move in decision.moves:
            taken = self._displaced.pop(move.stream, None)
            if decision.kind is not DecisionKind.REASSIGN_STREAMS:
                continue  # returned, or moved on purpose: no longer where a reassignment put it
            home = taken.home if taken is not None and taken.holder == move.from_node else move.from_node
            if home != move.to_node:  # reassigned back to its own node: nothing left to return
                self._displaced[move.stream] = Displacement(
                    home, move.to_node, decision.decision_id, self._clock
                )

    def _apply_decision(self, decision: Decision, *, approved_by: str | None) -> AuditEvent:
        for move in decision.moves:
            self._routes[move.stream] = move.to_node
        for allocation in decision.allocations:
            self._allocations[allocation.node] = allocation.slots
        self._displace(decision)
        decision_id = decision.decision_id
        self._pending.pop(decision_id, None)
        self._finished[decision_id] = _Finished("applied", decision.proposed_at, self._clock)
        detail = decision.describe() + (f" (approved by {approved_by})" if approved_by else " (within scope)")
        self._record(HistoryEntry(decision_id, "applied", self._clock, detail, approved_by))
        return AuditEvent(
            "applied",
            {
                "decision_id": decision_id,
                "kind": decision.kind.value,
                "moves": [m.to_dict() for m in decision.moves],
                "allocations": [a.to_dict() for a in decision.allocations],
                "approved_by": approved_by,
                "at": self._clock,
            },
        )

    def _answer(self, approval: Approval) -> ApplyResult:
        decision_id = approval.decision_id
        verb = approval.verb
        held = self._pending.get(decision_id)
        if held is None:
            if approval.nonce in self._used_nonces:
                return self._refuse(
                    decision_id,
                    ReplayedApproval.reason,
                    f"{verb} nonce {approval.nonce} was already used",
                    key_id=approval.key_id,
                )
            finished = self._finished.get(decision_id)
            if finished is not None and finished.outcome == "withdrawn":
                return self._refuse(
                    decision_id,
                    "withdrawn",
                    f"{verb} for decision {decision_id}, which was withdrawn ({finished.detail}); nothing "
                    "was applied",
                    key_id=approval.key_id,
                )
            state = f"already {finished.outcome}" if finished else "not held (unknown or forgotten)"
            return self._refuse(
                decision_id,
                "not_pending",
                f"{verb} for decision {decision_id}, which is {state}",
                key_id=approval.key_id,
            )
        if held.expires_at <= self._clock:
            expired = self._expire_one(held)
            refused = self._refuse(
                decision_id,
                "decision_expired",
                f"{verb} arrived after decision {decision_id} expired at {held.expires_at:.0f}",
                key_id=approval.key_id,
            )
            return ApplyResult(Outcome.REFUSED, decision_id, refused.message, (expired, *refused.audit))
        try:
            key = verify_approval(
                approval, held.decision, self.trusted, now=self._clock, used_nonces=self._used_nonces
            )
        except ApprovalRefused as exc:
            # The hold stays: a bad approval (perhaps an attacker's) must not knock out a pending decision.
            return self._refuse(decision_id, exc.reason, str(exc), key_id=approval.key_id)
        self._used_nonces[approval.nonce] = approval.expires_at
        answered = AuditEvent(
            "approved" if approval.approve else "denied",
            {
                "decision_id": decision_id,
                "digest": approval.decision_digest,
                "key_id": key.key_id,
                "nonce": approval.nonce,
                "reason": approval.reason,
                "at": self._clock,
            },
        )
        if not approval.approve:
            self._pending.pop(decision_id)
            self._finished[decision_id] = _Finished("denied", held.decision.proposed_at, self._clock)
            self._record(
                HistoryEntry(
                    decision_id,
                    "denied",
                    self._clock,
                    f"{held.decision.describe()}: {approval.reason}",
                    key.key_id,
                )
            )
            return ApplyResult(
                Outcome.DENIED, decision_id, f"denied {decision_id} by {key.key_id}", (answered,)
            )
        problem = self._precondition(held.decision)
        if problem:
            self._finished[decision_id] = _Finished("refused", held.decision.proposed_at, self._clock)
            refused = self._refuse(
                decision_id, "state_changed", f"approved, but {problem}", key_id=key.key_id, finish=True
            )
            return ApplyResult(Outcome.REFUSED, decision_id, refused.message, (answered, *refused.audit))
        applied = self._apply_decision(held.decision, approved_by=key.key_id)
        return ApplyResult(
            Outcome.APPLIED,
            decision_id,
            f"applied {held.decision.describe()} approved by {key.key_id}",
            (answered, applied),
        )

    def _expire_one(self, held: HeldDecision) -> AuditEvent:
        decision_id = held.decision_id
        self._pending.pop(decision_id)
        self._finished[decision_id] = _Finished("expired", held.decision.proposed_at, self._clock)
        self._record(
            HistoryEntry(
                decision_id,
                "expired",
                self._clock,
                f"{held.decision.describe()}: no operator answer by {held.expires_at:.0f}",
            )
        )
        return AuditEvent(
            "expired",
            {
                "decision_id": decision_id,
                "held_at": held.held_at,
                "expires_at": held.expires_at,
                "at": self._clock,
            },
        )

    def _withdraw(self, cmd: WithdrawCommand) -> ApplyResult:
        decision_id = cmd.decision_id
        held = self._pending.pop(decision_id, None)
        if held is None:
            finished = self._finished.get(decision_id)
            if finished is not None:
                return ApplyResult(
                    Outcome.NOOP, decision_id, f"decision {decision_id} was already {finished.outcome}"
                )
            return self._refuse(
                decision_id, "not_pending", f"withdraw of decision {decision_id}, which is not held"
            )
        self._finished[decision_id] = _Finished(
            "withdrawn", held.decision.proposed_at, self._clock, cmd.reason
        )
        self._record(
            HistoryEntry(decision_id, "withdrawn", self._clock, f"{held.decision.describe()}: {cmd.reason}")
        )
        guard_log.warning("withdrew held decision %s: %s", held.decision.describe(), cmd.reason)
        event = AuditEvent(
            "withdrawn",
            {
                "decision_id": decision_id,
                "kind": held.decision.kind.value,
                "reason": cmd.reason,
                "held_at": held.held_at,
                "at": self._clock,
            },
        )
        return ApplyResult(Outcome.WITHDRAWN, decision_id, f"withdrew {decision_id}: {cmd.reason}", (event,))

    def _remove_member(self, cmd: RemoveMemberCommand) -> ApplyResult:
        """The guard's rule for a membership change: only an operator's signed revocation takes a
        member out of the group (no node decides that on its own). The change itself is the Raft
        membership entry the proposer submits once this one applied; this entry is its authority,
        on the record of every replica."""
        revocation = cmd.revocation
        node_id = revocation.node_id
        try:
            verify_revocation(revocation, self.trusted)
        except RevocationError as exc:
            return self._refuse(None, "unsigned_revocation", f"removal of member {node_id} refused: {exc}")
        if revocation.serial:
            return self._refuse(None, "serial_revocation",
                                f"removal of member {node_id} refused: the revocation names one certificate "
                                f"({revocation.serial}), not the node")
        if self.members is not None and node_id not in self.members:
            return self._refuse(None, "not_a_member", f"removal of {node_id} refused: not a member of group "
                                                      f"{self.group}")
        if node_id in self._removed:  # a leader retrying after a failover: on the record once
            return ApplyResult(Outcome.NOOP, None, f"the removal of member {node_id} is already authorised")
        self._removed[node_id] = revocation.signature
        detail = f"removal of member {node_id} from the group authorised: {revocation.describe()}"
        self._record(HistoryEntry(None, "member_removed", self._clock, detail, revocation.key_id))
        guard_log.warning("%s", detail)
        event = AuditEvent("member_removed", {
            "node_id": revocation.node_id, "reason": revocation.reason, "revoked_at": revocation.revoked_at,
            "serial": revocation.serial, "key_id": revocation.key_id, "at": self._clock})
        return ApplyResult(Outcome.APPLIED, None, detail, (event,))

    def _expire(self) -> ApplyResult:
        due = sorted(
            (h for h in self._pending.values() if h.expires_at <= self._clock),
            key=lambda h: (h.expires_at, h.decision_id),
        )
        events = tuple(self._expire_one(h) for h in due)
        # Forget what can no longer matter: outcomes of decisions too old to be proposed again, and
        # nonces of approvals that have expired (an expired approval is refused before its nonce is checked).
        ttl_s = self.policy.hold_ttl_s
        self._finished = {k: v for k, v in self._finished.items() if not v.forgettable(self._clock, ttl_s)}
        self._used_nonces = {k: v for k, v in self._used_nonces.items() if v > self._clock}
        if not events:
            return ApplyResult(Outcome.NOOP, None, "no held decision is due to expire")
        ids = ", ".join(h.decision_id for h in due)
        return ApplyResult(Outcome.EXPIRED, None, f"expired {ids}", events)

    def _set_routes(self, cmd: SetRoutesCommand) -> ApplyResult:
        taken = sorted(s for s in cmd.routes if s in self._routes and self._routes[s] != cmd.routes[s])
        if taken:
            return self._refuse(
                None,
                "already_routed",
                f"stream(s) {', '.join(taken[:5])} already have a serving node; moving a stream is "
                "a decision (propose move_streams)",
            )
        set_ = sorted(
            n
            for n in cmd.allocations
            if n in self._allocations and self._allocations[n] != cmd.allocations[n]
        )
        if set_:
            return self._refuse(
                None,
                "already_allocated",
                f"node(s) {', '.join(set_[:5])} already have an allocation; changing it is a decision "
                "(propose set_allocation)",
            )
        new_routes = {s: n for s, n in cmd.routes.items() if s not in self._routes}
        new_allocations = {n: v for n, v in cmd.allocations.items() if n not in self._allocations}
        if not new_routes and not new_allocations:
            return ApplyResult(Outcome.NOOP, None, "every route and allocation is already in place")
        self._routes.update(new_routes)
        self._allocations.update(new_allocations)
        event = AuditEvent(
            "routes_assigned", {"routes": new_routes, "allocations": new_allocations, "at": self._clock}
        )
        return ApplyResult(
            Outcome.APPLIED,
            None,
            f"assigned {len(new_routes)} stream(s) and {len(new_allocations)} allocation(s)",
            (event,),
        )

    # --- snapshots ---

    def _state_doc(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "group": self.group,
            "clock": self._clock,
            "routes": dict(self._routes),
            "allocations": dict(self._allocations),
            "pending": [h.to_dict() for h in sorted(self._pending.values(), key=lambda h: h.decision_id)],
            "finished": {
                k: {
                    "outcome": v.outcome,
                    "proposed_at": v.proposed_at,
                    "finished_at": v.finished_at,
                    "detail": v.detail,
                }
                for k, v in self._finished.items()
            },
            "used_nonces": dict(self._used_nonces),
            "history": [e.to_dict() for e in self._history],
            "displaced": {k: v.to_dict() for k, v in self._displaced.items()},
            # Only once a member was removed: a ledger that never removed one keeps its earlier bytes.
            **({"removed": dict(sorted(self._removed.items()))} if self._removed else {}),
        }

    def snapshot(self) -> bytes:
        """Deterministic bytes of the whole replicated state (for Raft log compaction)."""
        return canonical_json(self._state_doc())

    def state_digest(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()

    def restore(self, snapshot: bytes) -> None:
        """Replace the state with `snapshot`; on error the current state is kept."""
        doc = strict_json(snapshot, "snapshot", SnapshotError, 1 << 30)
        try:
            fmt = doc.get("format") if isinstance(doc, dict) else None
            if type(fmt) is not int or fmt not in _READABLE_SNAPSHOT_FORMATS:
                raise SnapshotError(
                    f"snapshot: unsupported format {fmt!r}; this node restores formats "
                    f"{', '.join(map(str, _READABLE_SNAPSHOT_FORMATS))}"
                )
            if doc["group"] != self.group:
                raise SnapshotError(f"snapshot is of group {doc['group']!r}, this ledger is {self.group!r}")
            clock = check_now(doc["clock"], SnapshotError, "snapshot.clock")
            routes = dict(doc["routes"])
            allocations = dict(doc["allocations"])
            validate_set_routes(SetRoutesCommand(clock, routes, allocations))
            pending = {h.decision_id: h for h in map(HeldDecision.from_dict, doc["pending"])}
            finished = {
                str(k): _Finished(
                    str(v["outcome"]),
                    float(v["proposed_at"]),
                    float(v["finished_at"]),
                    str(v["detail"]) if fmt >= 2 else "",
                )
                for k, v in doc["finished"].items()
            }
            used_nonces = {str(k): float(v) for k, v in doc["used_nonces"].items()}
            history = [HistoryEntry.from_dict(e) for e in doc["history"]]
            displaced = (
                {str(k): Displacement.from_dict(v) for k, v in doc["displaced"].items()} if fmt >= 2 else {}
            )
            removed = dict(doc.get("removed", {}))
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in removed.items()):
                raise SnapshotError("snapshot.removed: expected node id -> revocation signature")
        except SnapshotError:
            raise
        except (
            CommandError,
            DecisionError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            OverflowError,
        ) as exc:
            raise SnapshotError(f"snapshot is damaged: {type(exc).__name__}: {exc}") from None
        self._clock, self._routes, self._allocations = clock, routes, allocations
        self._pending, self._finished, self._used_nonces, self._history, self._displaced = (
            pending,
            finished,
            used_nonces,
            history,
            displaced,
        )
        self._removed = removed
