"""The rollout state machine of one site, and what each device should serve under it. Pure.

Rules of this module (everything a site believes about a rollout lives here):

- States are named sentinels (`RolloutState`); what moves a rollout is an
  `Event`, and `TRANSITIONS` is the whole table of which event moves which
  state where (h11 style). An event not in the table for the current state
  changes nothing and says so.
- Inputs are frozen dataclasses (`Start`, `GateResult`, `OperatorInput`,
  `Expire`, `PeerAborted`), each carrying the `now` stamped by whoever
  proposed it. `apply` reads no clock and no randomness: every replica of a
  site's Raft group applying the same inputs reaches the same `SiteRollout`.
  `RolloutLedger` is that replicated machine over command bytes, with
  snapshots, for the site group to run beside its decision ledger.
- The guard's rule lives in `apply`, on every replica: rolling back (a
  failed gate, an abort, an expired plan, another site's abort) is always
  within scope; starting a wave above the autonomous scope (the plan's,
  narrowed by the site's own limit) waits in WAITING_APPROVAL until an
  operator's signed command naming this plan and that wave is committed. An
  approval may come early; it is remembered. A command's nonce is used up
  once its signature verifies, even if it changes nothing, so it cannot be
  replayed into a later state; the very same command sent again (a retry
  after a lost reply) is answered NOOP with what became of it the first
  time, changes nothing, and is audited (`rollout_command_repeated`).
- A failing gate aborts from any live state, paused or waiting included; a
  PASS or a stalled (inconclusive past its deadline) verdict counts only for
  the wave and soak it was measured in, so a stale one changes nothing.
- `desired_version` is what a device should serve now under a site's state:
  the target in an advanced wave's cohort or after completion, the baseline
  outside the cohort or after an abort, whatever it serves while paused; a
  device the skew rule excludes skips with its reason. A device returning
  from days offline computes the same function on the state its site holds
  now, so it never activates the target of a rollout that was aborted.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mesh.guard.audit import AuditEvent
from mesh.identity.signing import TrustedKeys, canonical_json
from mesh.rollout._json import expect_object, json_number, number, strict_json, text
from mesh.rollout.cohort import (
    CohortError,
    cohort_score,
    cohort_thresholds,
    in_wave,
    wave_over_scope,
    wave_size,
    wave_sizes,
)
from mesh.rollout.health import (
    DeviceMarks,
    GateOutcome,
    GateVerdict,
    HealthFormatError,
    Mark,
    covered,
)
from mesh.rollout.plan import (
    PPM,
    ROLLOUT_ID_RE,
    CommandAction,
    CommandRefused,
    DeviceFacts,
    MalformedCommand,
    PlanExpiredError,
    PlanFormatError,
    PlanSignatureError,
    PrefetchPolicy,
    ReplayedCommand,
    RolloutCommand,
    RolloutError,
    RolloutPlan,
    SignedPlan,
    Skip,
    SkipKind,
    format_share,
    skew_check,
    verify_command,
    verify_plan,
)

LEDGER_FORMAT = 1
# Which rules a command is applied under, written in its bytes so that a replica replaying an old journal
# after an upgrade applies each entry exactly as it was applied when it was committed. A command without
# `rules` is rules 1: wave scope judged by the plan's share alone, no gate coverage check, nothing
# remembered of a forgotten rollout. Rules 2: wave scope by real size too, a PASS needs coverage,
# forgotten rollouts leave their verdicts. Rules 3 (what this code proposes): a verified command whose
# nonce is used up is answered NOOP with its first outcome ("already applied") if it is the very command
# that used it, so a client that retries after a lost reply learns it took effect; another command under
# that nonce is refused.
LEDGER_RULES = 3
MAX_LEDGER_COMMAND_BYTES = 1024 * 1024
MAX_ELIGIBLE = 100_000
MAX_FLEET_ELIGIBLE = 1 << 38  # cohort.MAX_SITE_DEVICES: what apportioning can split
MAX_ROLLOUTS = 256
MAX_TOMBSTONES = 256  # aborted rollouts remembered after their plan is forgotten (newest kept)
# A finished rollout is kept this long after its plan expires (offline devices catch up on it until the plan
# itself is refused as expired), then forgotten.
RETAIN_AFTER_EXPIRY_S = 24 * 3600.0
APPROVE_HINT = "mesh rollout approve {rollout_id} --wave {wave}"
RESUME_HINT = "mesh rollout resume {rollout_id}"
_SITE_RE = ROLLOUT_ID_RE  # same grammar as node and group names


class RolloutStateError(RolloutError):
    """A rollout command's bytes or a snapshot are malformed (names the field)."""


class RolloutState(enum.Enum):
    """Where a site's rollout stands."""

    PENDING = "pending"  # plan accepted, no wave started yet
    SOAKING = "soaking"  # wave k's cohort runs the target while its gate watches
    WAITING_APPROVAL = "waiting_approval"  # wave k passed; wave k+1 is above scope and needs an operator
    PAUSED = "paused"  # an operator paused it, or its gate stayed inconclusive past the deadline
    ABORTED = "aborted"  # rolled back: every device serves the baseline (final)
    COMPLETED = "completed"  # every selected device serves the target (final)

    @property
    def final(self) -> bool:
        return self in (RolloutState.ABORTED, RolloutState.COMPLETED)


class Event(enum.Enum):
    """What happened, as the transition table sees it."""

    START = "start"
    START_HELD = "start_held"  # wave 1 itself is above scope and not approved: wait for an operator
    GATE_PASS = "gate_pass"  # next wave within scope, or approved: it starts
    GATE_PASS_HELD = "gate_pass_held"  # next wave above scope and not approved: wait for an operator
    GATE_PASS_LAST = "gate_pass_last"  # the last wave passed
    GATE_FAIL = "gate_fail"
    GATE_STALLED = "gate_stalled"  # inconclusive past the wave's deadline
    APPROVE_AHEAD = "approve_ahead"  # approval of a later wave, remembered
    APPROVE_HELD = "approve_held"  # approval of the wave being waited for: it starts
    PROMOTE = "promote"  # operator starts the next wave now
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    EXPIRE = "expire"
    PEER_ABORT = "peer_abort"


S, E = RolloutState, Event
_PREVIOUS = "previous"  # RESUME returns to the state the rollout was paused in
_ABORTS = {E.GATE_FAIL: S.ABORTED, E.ABORT: S.ABORTED, E.EXPIRE: S.ABORTED, E.PEER_ABORT: S.ABORTED}

TRANSITIONS: Mapping[RolloutState, Mapping[Event, RolloutState | str]] = {
    S.PENDING: {
        E.START: S.SOAKING,
        E.START_HELD: S.WAITING_APPROVAL,
        E.APPROVE_AHEAD: S.PENDING,
        E.PAUSE: S.PAUSED,
        **_ABORTS,
    },
    S.SOAKING: {
        E.GATE_PASS: S.SOAKING,
        E.GATE_PASS_HELD: S.WAITING_APPROVAL,
        E.GATE_PASS_LAST: S.COMPLETED,
        E.GATE_STALLED: S.PAUSED,
        E.APPROVE_AHEAD: S.SOAKING,
        E.PROMOTE: S.SOAKING,
        E.PAUSE: S.PAUSED,
        **_ABORTS,
    },
    S.WAITING_APPROVAL: {
        E.APPROVE_HELD: S.SOAKING,
        E.APPROVE_AHEAD: S.WAITING_APPROVAL,
        E.PROMOTE: S.SOAKING,
        E.PAUSE: S.PAUSED,
        **_ABORTS,
    },
    S.PAUSED: {E.RESUME: _PREVIOUS, E.APPROVE_AHEAD: S.PAUSED, E.PROMOTE: S.SOAKING, **_ABORTS},
    S.ABORTED: {},
    S.COMPLETED: {},
}


# --- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin wave 1 in this site. `eligible` are the site's selected devices that pass the skew rule as
    the proposer knows them; `sizes` is this site's device count per wave (from `site_wave_sizes` when
    the fleet is split into sites), or None to take the plan's shares of `eligible` here.
    `fleet_eligible` is the eligible count of the whole fleet the sizes were apportioned from (None: this
    site's); the guard judges a wave's real share of the selected devices by it."""

    now: float
    eligible: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    marks: tuple[tuple[str, DeviceMarks], ...] = ()
    fleet_eligible: int | None = None


@dataclass(frozen=True)
class GateResult:
    now: float
    verdict: GateVerdict


@dataclass(frozen=True)
class OperatorInput:
    now: float
    command: RolloutCommand


@dataclass(frozen=True)
class Expire:
    """Time passes: an unfinished rollout whose plan has expired is rolled back."""

    now: float


@dataclass(frozen=True)
class PeerAborted:
    """Another site aborted this rollout (learnt by gossip). Rolling back is the safe direction, so a
    peer's word is enough; what it can make us do is bounded to that."""

    now: float
    site: str
    reason: str


Input = Start | GateResult | OperatorInput | Expire | PeerAborted


# --- state -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRollout:
    """One site's replicated view of one rollout."""

    rollout_id: str
    plan_digest: str
    state: RolloutState = RolloutState.PENDING
    wave: int = 0  # current wave, from 1; 0 before the start
    soak_started_at: float | None = None
    thresholds: tuple[int | None, ...] = ()  # per wave: highest cohort score in it (None: nobody here)
    eligible_count: int = 0
    fleet_eligible_count: int = 0  # selected devices fleet-wide at the start (rules 2); 0: the share alone
    marks: tuple[tuple[str, DeviceMarks], ...] = ()  # where the current wave's window starts, per device
    approved: tuple[tuple[int, str], ...] = ()  # (wave, operator key id) of approvals received
    used_nonces: tuple[tuple[str, float], ...] = ()  # (nonce, expires_at) of verified commands
    # (nonce, command_fingerprint, first outcome "applied" or "noop") of commands verified under rules 3,
    # kept as long as their nonce
    applied_commands: tuple[tuple[str, str, str], ...] = ()
    paused_from: RolloutState | None = None
    reason: str = ""  # why it is paused, waiting, aborted or completed (one line)
    updated_at: float = 0.0

    @property
    def approved_waves(self) -> frozenset[int]:
        return frozenset(w for w, _ in self.approved)

    def marks_map(self) -> dict[str, DeviceMarks]:
        return dict(self.marks)

    def threshold(self, wave: int) -> int | None:
        return self.thresholds[wave - 1] if 1 <= wave <= len(self.thresholds) else None

    def in_cohort(self, node_id: str, wave: int | None = None) -> bool:
        """Is `node_id` in the cohort of `wave` (default: the current wave) in this site?"""
        return in_wave(
            cohort_score(self.rollout_id, node_id), self.threshold(self.wave if wave is None else wave)
        )

    def cohort(self, node_ids: Iterable[str], wave: int | None = None) -> frozenset[str]:
        return frozenset(n for n in node_ids if self.in_cohort(n, wave))

    def waiting_for(self, plan: RolloutPlan) -> str:
        """What would move it on, for `mesh rollout status` and `mesh admin pending`."""
        if self.state is RolloutState.PENDING:
            return "the site leader to start wave 1"
        if self.state is RolloutState.SOAKING:
            return f"the gate of wave {self.wave} ({plan.wave(self.wave).label})"
        if self.state is RolloutState.WAITING_APPROVAL:
            return (
                f"an operator approval: {APPROVE_HINT.format(rollout_id=self.rollout_id, wave=self.wave + 1)}"
            )
        if self.state is RolloutState.PAUSED:
            return f"an operator: {RESUME_HINT.format(rollout_id=self.rollout_id)} (or abort)"
        return "nothing (finished)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "plan_digest": self.plan_digest,
            "state": self.state.value,
            "wave": self.wave,
            "soak_started_at": None if self.soak_started_at is None else json_number(self.soak_started_at),
            "thresholds": [None if t is None else f"{t:064x}" for t in self.thresholds],
            "eligible_count": self.eligible_count,
            "marks": {
                node: [
                    None if m.target is None else m.target.to_list(),
                    None if m.baseline is None else m.baseline.to_list(),
                ]
                for node, m in self.marks
            },
            "approved": [[w, k] for w, k in self.approved],
            "used_nonces": {n: json_number(e) for n, e in self.used_nonces},
            "paused_from": None if self.paused_from is None else self.paused_from.value,
            "reason": self.reason,
            "updated_at": json_number(self.updated_at),
            # Rules 2 only: a state applied under rules 1 writes the bytes it always did.
            **({"fleet_eligible_count": self.fleet_eligible_count} if self.fleet_eligible_count else {}),
            # Rules 3 only, likewise.
            **(
                {"applied_commands": {n: [f, o] for n, f, o in self.applied_commands}}
                if self.applied_commands
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> SiteRollout:
        marks = tuple(
            (
                str(node),
                DeviceMarks(*(None if m is None else Mark.from_list(m, "snapshot mark") for m in pair)),
            )
            for node, pair in sorted(doc["marks"].items())
        )
        return cls(
            rollout_id=str(doc["rollout_id"]),
            plan_digest=str(doc["plan_digest"]),
            state=RolloutState(doc["state"]),
            wave=int(doc["wave"]),
            soak_started_at=None if doc["soak_started_at"] is None else float(doc["soak_started_at"]),
            thresholds=tuple(None if t is None else int(t, 16) for t in doc["thresholds"]),
            eligible_count=int(doc["eligible_count"]),
            fleet_eligible_count=int(doc.get("fleet_eligible_count", 0)),
            marks=marks,
            approved=tuple((int(w), str(k)) for w, k in doc["approved"]),
            used_nonces=tuple(sorted((str(n), float(e)) for n, e in doc["used_nonces"].items())),
            applied_commands=tuple(
                sorted((str(n), str(f), str(o)) for n, (f, o) in doc.get("applied_commands", {}).items())
            ),
            paused_from=None if doc["paused_from"] is None else RolloutState(doc["paused_from"]),
            reason=str(doc["reason"]),
            updated_at=float(doc["updated_at"]),
        )


def new_rollout(plan: RolloutPlan) -> SiteRollout:
    return SiteRollout(rollout_id=plan.rollout_id, plan_digest=plan.digest, updated_at=plan.created_at)


# --- outputs -----------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    APPLIED = "applied"  # the state changed
    NOOP = "noop"  # valid, nothing to change (a stale verdict, an approval already given)
    REFUSED = "refused"  # invalid input: audited, nothing changed


@dataclass(frozen=True)
class Transition:
    """What one input did: the state after it, the event it was, and the audit records of it."""

    outcome: Outcome
    before: SiteRollout
    after: SiteRollout
    event: Event | None
    message: str
    audit: tuple[AuditEvent, ...] = ()

    @property
    def changed(self) -> bool:
        return self.after.state is not self.before.state or self.after.wave != self.before.wave

    @property
    def rollback(self) -> bool:
        """Did this input order every device back to the baseline?"""
        return self.after.state is RolloutState.ABORTED and self.before.state is not RolloutState.ABORTED


def apply(
    plan: RolloutPlan,
    rollout: SiteRollout,
    event_input: Input,
    *,
    trusted: TrustedKeys,
    max_share_ppm: int | None = None,
    rules: int = LEDGER_RULES,
) -> Transition:
    """Apply one committed input to one site's rollout. Deterministic; never raises on bad input
    (a refusal comes back as REFUSED with an audit record, so every replica audits the same thing).

    `trusted` and `max_share_ppm` (the site guard's own limit on a wave's share) are configuration:
    every replica must use the same values. `rules` comes with the command (see LEDGER_RULES).
    """
    if rules < 2:
        max_share_ppm = None  # rules 1 knew no site limit (the group never passed one)
    if rollout.plan_digest != plan.digest or rollout.rollout_id != plan.rollout_id:
        return _refused(rollout, "wrong_plan", f"state of {rollout.rollout_id} is not for {plan.label}")
    now = event_input.now
    if not rollout.state.final and plan.expired(now) and not isinstance(event_input, Expire):
        return apply(plan, rollout, Expire(now), trusted=trusted, max_share_ppm=max_share_ppm, rules=rules)
    if isinstance(event_input, Start):
        return _start(plan, rollout, event_input, max_share_ppm, rules)
    if isinstance(event_input, GateResult):
        return _gate(plan, rollout, event_input, max_share_ppm, rules)
    if isinstance(event_input, OperatorInput):
        return _operator(plan, rollout, event_input, trusted, max_share_ppm, rules)
    if isinstance(event_input, Expire):
        if rollout.state.final or not plan.expired(now):
            return _noop(rollout, None, f"{plan.label} has not expired or is finished")
        return _move(
            plan,
            rollout,
            E.EXPIRE,
            now,
            reason=f"plan expired at {plan.expires_at:.0f} before the "
            "rollout completed; rolled back to the baseline",
        )
    if isinstance(event_input, PeerAborted):
        return _move(
            plan,
            rollout,
            E.PEER_ABORT,
            now,
            reason=f"site {event_input.site} aborted it: {event_input.reason}"[:512],
        )
    return _refused(rollout, "malformed_command", f"not a rollout input: {type(event_input).__name__}")


def _start(
    plan: RolloutPlan, rollout: SiteRollout, start: Start, max_share_ppm: int | None, rules: int
) -> Transition:
    eligible = sorted(set(start.eligible))
    shares = [w.share_ppm for w in plan.waves]
    sizes = wave_sizes(shares, len(eligible)) if start.sizes is None else tuple(start.sizes)
    if (
        len(sizes) != plan.wave_count
        or any(type(s) is not int for s in sizes)
        or (eligible and sizes[-1] != len(eligible))
    ):
        return _refused(
            rollout,
            "bad_start",
            f"start of {plan.label}: wave sizes {list(sizes)!r} do not fit "
            f"{len(eligible)} eligible devices and {plan.wave_count} waves",
        )
    # Rules 1 judged waves by the plan's share alone (fleet count 0); rules 2 by real size among the fleet's
    # eligible devices, which the proposer counts: a count that cannot be (below this site's, or too small
    # for the sizes asked of this site, or a fleet when the site sized its waves alone) is refused.
    fleet = 0
    if rules >= 2:
        fleet = len(eligible) if start.fleet_eligible is None else start.fleet_eligible
        problem = ""
        if type(fleet) is not int or fleet < len(eligible):
            problem = f"fleet_eligible {fleet!r} is below this site's {len(eligible)} eligible devices"
        elif start.sizes is None and fleet != len(eligible):
            problem = (
                f"fleet_eligible {fleet} with waves sized for this site alone ({len(eligible)} devices); "
                "a fleet-wide count comes with this site's apportioned sizes"
            )
        elif fleet and any(size > wave_size(share, fleet) for size, share in zip(sizes, shares, strict=True)):
            problem = (
                f"wave sizes {list(sizes)!r} are more than the fleet's waves of {fleet} devices "
                f"({list(wave_sizes(shares, fleet))!r})"
            )
        if problem:
            return _refused(rollout, "bad_start", f"start of {plan.label}: {problem}")
    try:
        thresholds = cohort_thresholds(plan.rollout_id, eligible, sizes, shares)
    except CohortError as exc:
        return _refused(rollout, "bad_start", f"start of {plan.label}: {exc}")
    if TRANSITIONS[rollout.state].get(E.START) is None:
        return _noop(rollout, E.START, f"{plan.label} is already {rollout.state.value}")
    started = dataclasses.replace(
        rollout,
        thresholds=thresholds,
        eligible_count=len(eligible),
        fleet_eligible_count=fleet,
        marks=tuple(sorted(start.marks)),
    )
    detail = {"eligible": len(eligible), "fleet_eligible": fleet, "sizes": list(sizes)}
    if wave_needs_approval(plan, started, 1, max_share_ppm) and 1 not in rollout.approved_waves:
        # The guard's rule holds for the first wave too: its cohort is drawn, nobody moves until approved.
        hint = APPROVE_HINT.format(rollout_id=plan.rollout_id, wave=1)
        return _move(
            plan,
            started,
            E.START_HELD,
            start.now,
            marks=started.marks,
            detail=detail,
            reason=f"{_wave_scope_label(plan, started, 1)} is above the autonomous scope of "
            f"{format_share(plan.scope_ppm(max_share_ppm))}; waiting for {hint}",
        )
    return _move(plan, started, E.START, start.now, next_wave=1, marks=started.marks, detail=detail)


def _gate(
    plan: RolloutPlan, rollout: SiteRollout, result: GateResult, max_share_ppm: int | None, rules: int
) -> Transition:
    v = result.verdict
    now = result.now
    if v.rollout_id != plan.rollout_id:
        return _refused(rollout, "wrong_rollout", f"verdict for {v.rollout_id} applied to {plan.label}")
    if v.evaluated_at > now:
        return _refused(rollout, "bad_verdict", f"verdict evaluated at {v.evaluated_at:.0f}, after {now:.0f}")
    if rollout.state.final:
        return _noop(rollout, None, f"{plan.label} is already {rollout.state.value}")
    if v.outcome is GateOutcome.FAIL:
        # Safe direction: a failure of this wave or an earlier one aborts, whatever the state.
        if not 1 <= v.wave <= rollout.wave:
            return _noop(rollout, None, f"failing verdict for wave {v.wave}, which has not started here")
        return _move(plan, rollout, E.GATE_FAIL, now, reason=f"gate failed: {v.reason}", verdict=v)
    if (v.wave, v.soak_started_at) != (
        rollout.wave,
        rollout.soak_started_at,
    ) or rollout.state is not S.SOAKING:
        return _noop(
            rollout,
            None,
            f"stale {v.outcome.value} verdict for wave {v.wave}; {plan.label} is "
            f"{rollout.state.value} at wave {rollout.wave}",
        )
    wave = plan.wave(v.wave)
    if v.outcome is GateOutcome.INCONCLUSIVE:
        if not v.deadline_passed:
            return _noop(rollout, None, f"wave {v.wave} inconclusive: {v.reason}")
        assert wave.deadline_s is not None
        if v.evaluated_at < v.soak_started_at + wave.deadline_s:
            return _refused(
                rollout,
                "bad_verdict",
                f"verdict claims the deadline of wave {v.wave} passed "
                f"before {v.soak_started_at + wave.deadline_s:.0f}",
            )
        return _move(
            plan,
            rollout,
            E.GATE_STALLED,
            now,
            verdict=v,
            reason=f"gate inconclusive past its deadline ({wave.deadline_s:g} s): {v.reason}",
        )
    # PASS: check the verdict against the plan, so a confused leader cannot advance on too little.
    rate = v.soaked.rate
    if (
        v.evaluated_at < v.soak_started_at + wave.soak_s
        or v.soaked.requests < wave.min_requests
        or (rate is None or rate > Fraction(wave.max_error_rate))
    ):
        return _refused(
            rollout,
            "bad_verdict",
            f"passing verdict for wave {v.wave} does not meet the plan: "
            f"{v.soaked.describe()} at {v.evaluated_at - v.soak_started_at:.0f} s "
            f"of a {wave.soak_s:g} s soak",
        )
    # Rules 2: as many cohort devices served the whole soak as this site's listed unreachable ones (the
    # gate also counts other sites' silent devices, which a replica cannot recount; a list cut at
    # MAX_LISTED only makes this check weaker than the gate's, never stricter).
    if rules >= 2 and not covered(v.soaked.devices, len(v.unreachable)):
        return _refused(
            rollout,
            "bad_verdict",
            f"passing verdict for wave {v.wave} does not cover its cohort: {v.soaked.describe()} "
            f"served the whole soak, {len(v.unreachable)} cohort devices of this site are unreachable",
        )
    if v.wave == plan.wave_count:
        return _move(plan, rollout, E.GATE_PASS_LAST, now, verdict=v, reason=f"completed: {v.reason}")
    nxt = v.wave + 1
    if wave_needs_approval(plan, rollout, nxt, max_share_ppm) and nxt not in rollout.approved_waves:
        hint = APPROVE_HINT.format(rollout_id=plan.rollout_id, wave=nxt)
        return _move(
            plan,
            rollout,
            E.GATE_PASS_HELD,
            now,
            verdict=v,
            marks=v.marks,
            reason=f"{_wave_scope_label(plan, rollout, nxt)} is above the autonomous scope of "
            f"{format_share(plan.scope_ppm(max_share_ppm))}; waiting for {hint}",
        )
    return _move(plan, rollout, E.GATE_PASS, now, verdict=v, next_wave=nxt, marks=v.marks)


def _operator(
    plan: RolloutPlan,
    rollout: SiteRollout,
    op: OperatorInput,
    trusted: TrustedKeys,
    max_share_ppm: int | None,
    rules: int,
) -> Transition:
    step = _operator_step(plan, rollout, op, trusted, max_share_ppm, rules)
    return dataclasses.replace(step, before=rollout)


def command_fingerprint(command: RolloutCommand) -> str:
    """What names one command in a site's state: sha256 of the bytes its operator signed (128 bits)."""
    return hashlib.sha256(command.signed_bytes()).hexdigest()[:32]


def _operator_step(
    plan: RolloutPlan,
    rollout: SiteRollout,
    op: OperatorInput,
    trusted: TrustedKeys,
    max_share_ppm: int | None,
    rules: int,
) -> Transition:
    command = op.command
    now = op.now
    try:
        key = verify_command(command, plan, trusted, now=now, used_nonces={n for n, _ in rollout.used_nonces})
    except ReplayedCommand as exc:
        # Verified in every other way. The very command that used the nonce, sent again (a client's retry
        # after a lost reply, or anyone's replay of what was gossiped), is answered with what became of it,
        # changes nothing and is audited; another command under a used nonce is refused, as before rules 3.
        first = next((e for e in rollout.applied_commands if e[0] == command.nonce), None)
        if rules >= 3 and first is not None and first[1] == command_fingerprint(command):
            return _repeated(rollout, command, first[2])
        return _refused(rollout, exc.reason, str(exc), key_id=command.key_id)
    except CommandRefused as exc:
        return _refused(
            rollout,
            exc.reason,
            str(exc),
            key_id=command.key_id if isinstance(command, RolloutCommand) else None,
        )
    # Used once verified, whatever it does: a command that meant nothing now cannot mean something later.
    nonces = tuple(
        sorted({(n, e) for n, e in rollout.used_nonces if e > now} | {(command.nonce, command.expires_at)})
    )
    kept = {n for n, _ in nonces}
    applied = tuple(e for e in rollout.applied_commands if e[0] in kept)
    rollout = dataclasses.replace(rollout, used_nonces=nonces, applied_commands=applied)
    step = _operator_action(plan, rollout, command, key.key_id, now, max_share_ppm)
    if rules < 3:
        return step
    entry = (
        command.nonce,
        command_fingerprint(command),
        "applied" if step.outcome is Outcome.APPLIED else "noop",
    )
    after = dataclasses.replace(
        step.after, applied_commands=tuple(sorted((*step.after.applied_commands, entry)))
    )
    return dataclasses.replace(step, after=after)


def _repeated(rollout: SiteRollout, command: RolloutCommand, first_outcome: str) -> Transition:
    if first_outcome == "applied":
        message = (
            f"{command.label} (nonce {command.nonce}) was already applied in this site; sending it again "
        )
        message += "changes nothing"
    else:
        message = f"{command.label} (nonce {command.nonce}) was already accepted in this site and changed "
        message += "nothing then; sending it again changes nothing either (sign a new command to act now)"
    payload = {
        "rollout_id": rollout.rollout_id,
        "action": command.action.value,
        "key_id": command.key_id,
        "nonce": command.nonce,
        "first_outcome": first_outcome,
    }
    return Transition(
        Outcome.NOOP, rollout, rollout, None, message, (AuditEvent("rollout_command_repeated", payload),)
    )


def _operator_action(
    plan: RolloutPlan,
    rollout: SiteRollout,
    command: RolloutCommand,
    key_id: str,
    now: float,
    max_share_ppm: int | None,
) -> Transition:
    who = {"key_id": key_id, "nonce": command.nonce, "command_reason": command.reason}
    action = command.action
    if action is CommandAction.ABORT:
        return _move(
            plan,
            rollout,
            E.ABORT,
            now,
            reason=f"aborted by operator {key_id}: {command.reason}",
            detail=who,
        )
    if action is CommandAction.PAUSE:
        reason = f"paused by operator {key_id}" + (f": {command.reason}" if command.reason else "")
        return _move(plan, rollout, E.PAUSE, now, reason=reason, detail=who)
    if action is CommandAction.RESUME:
        return _move(plan, rollout, E.RESUME, now, detail=who, max_share_ppm=max_share_ppm)
    assert command.wave is not None
    wave = command.wave
    approved = tuple(sorted(set(rollout.approved) | {(wave, key_id)}))
    if action is CommandAction.APPROVE:
        if wave <= rollout.wave:
            return _noop(rollout, None, f"wave {wave} of {plan.label} has already started")
        rollout = dataclasses.replace(rollout, approved=approved)
        if rollout.state is S.WAITING_APPROVAL and wave == rollout.wave + 1:
            return _move(plan, rollout, E.APPROVE_HELD, now, next_wave=wave, detail=who)
        return _move(plan, rollout, E.APPROVE_AHEAD, now, detail={**who, "wave": wave})
    # PROMOTE: start the next wave now; the operator's signature is its approval.
    if wave != rollout.wave + 1 or rollout.state is S.PENDING:
        return _noop(
            rollout,
            None,
            f"promote names wave {wave}, but {plan.label} is at wave {rollout.wave}; "
            "promote starts the next wave only",
        )
    rollout = dataclasses.replace(rollout, approved=approved)
    return _move(plan, rollout, E.PROMOTE, now, next_wave=wave, detail=who)


def wave_needs_approval(
    plan: RolloutPlan, rollout: SiteRollout, number_: int, max_share_ppm: int | None = None
) -> bool:
    """Does wave `number_` of a started rollout reach past the autonomous scope (the plan's, narrowed by
    the site guard's `max_share_ppm`)? By its share and by its real size among the selected devices
    fleet-wide, so rounding a small fleet's wave up to one device cannot carry it past the scope."""
    share = plan.wave(number_).share_ppm
    return wave_over_scope(share, plan.scope_ppm(max_share_ppm), rollout.fleet_eligible_count)


def _wave_scope_label(plan: RolloutPlan, rollout: SiteRollout, number_: int) -> str:
    wave = plan.wave(number_)
    fleet = rollout.fleet_eligible_count
    if fleet <= 0 or wave.share_ppm == PPM:
        return f"wave {number_} ({wave.label})"
    size = wave_size(wave.share_ppm, fleet)
    return f"wave {number_} ({wave.label}: {size} of {fleet} selected devices, {size / fleet:.0%})"


def _move(
    plan: RolloutPlan,
    rollout: SiteRollout,
    event: Event,
    now: float,
    *,
    reason: str = "",
    next_wave: int | None = None,
    marks: tuple[tuple[str, DeviceMarks], ...] | None = None,
    verdict: GateVerdict | None = None,
    detail: Mapping[str, Any] | None = None,
    max_share_ppm: int | None = None,
) -> Transition:
    """Look `event` up in the table for the current state and build the state after it."""
    target = TRANSITIONS[rollout.state].get(event)
    if target is None:
        return _noop(
            rollout, event, f"{event.value} does nothing while {plan.label} is {rollout.state.value}"
        )
    after = rollout
    if target == _PREVIOUS:
        previous = rollout.paused_from or S.PENDING
        after = dataclasses.replace(after, state=previous, paused_from=None, reason="")
        if previous is S.SOAKING:
            # A new soak: the time paused taught the gate nothing it can vouch for.
            after = dataclasses.replace(after, soak_started_at=now)
        elif previous is S.WAITING_APPROVAL and rollout.wave + 1 in rollout.approved_waves:
            next_wave = rollout.wave + 1
        elif previous is S.WAITING_APPROVAL:
            hint = APPROVE_HINT.format(rollout_id=plan.rollout_id, wave=rollout.wave + 1)
            after = dataclasses.replace(after, reason=f"wave {rollout.wave + 1} waits for {hint}")
    else:
        assert isinstance(target, RolloutState)
        after = dataclasses.replace(after, state=target, reason=reason or after.reason)
        if target is S.PAUSED and rollout.state is not S.PAUSED:
            after = dataclasses.replace(after, paused_from=rollout.state)
        elif target is not S.PAUSED:
            after = dataclasses.replace(after, paused_from=None)
    if marks is not None:
        after = dataclasses.replace(after, marks=marks)
    if next_wave is not None:
        after = dataclasses.replace(after, wave=next_wave, soak_started_at=now, state=S.SOAKING, reason="")
    if after.state.final:
        after = dataclasses.replace(after, marks=())  # windows are over; keep the snapshot small
    after = dataclasses.replace(after, updated_at=max(rollout.updated_at, now))
    audit = _audit(plan, rollout, after, event, now, verdict, detail or {})
    return Transition(Outcome.APPLIED, rollout, after, event, _describe(plan, rollout, after, event), audit)


def _describe(plan: RolloutPlan, before: SiteRollout, after: SiteRollout, event: Event) -> str:
    where = f"{plan.label}: {before.state.value}"
    if before.wave:
        where += f" wave {before.wave}"
    there = after.state.value + (f" wave {after.wave}" if after.wave and not after.state.final else "")
    why = f" ({after.reason})" if after.reason else ""
    return f"{where} -> {there} on {event.value}{why}"


_AUDIT_KIND = {
    E.START: "rollout_started",
    E.START_HELD: "rollout_started",
    E.GATE_PASS: "rollout_wave_started",
    E.APPROVE_HELD: "rollout_wave_started",
    E.PROMOTE: "rollout_wave_started",
    E.GATE_PASS_HELD: "rollout_held",
    E.GATE_PASS_LAST: "rollout_completed",
    E.GATE_FAIL: "rollout_aborted",
    E.ABORT: "rollout_aborted",
    E.EXPIRE: "rollout_aborted",
    E.PEER_ABORT: "rollout_aborted",
    E.GATE_STALLED: "rollout_paused",
    E.PAUSE: "rollout_paused",
    E.RESUME: "rollout_resumed",
    E.APPROVE_AHEAD: "rollout_approved",
}


def _audit(
    plan: RolloutPlan,
    before: SiteRollout,
    after: SiteRollout,
    event: Event,
    now: float,
    verdict: GateVerdict | None,
    detail: Mapping[str, Any],
) -> tuple[AuditEvent, ...]:
    payload: dict[str, Any] = {
        "rollout_id": plan.rollout_id,
        "plan_digest": plan.digest,
        "model": plan.model,
        "target_version": plan.target_version,
        "baseline_version": plan.baseline_version,
        "event": event.value,
        "from_state": before.state.value,
        "from_wave": before.wave,
        "state": after.state.value,
        "wave": after.wave,
        "reason": after.reason,
        "at": now,
        **detail,
    }
    if verdict is not None:
        rate = verdict.measured.rate
        payload["gate"] = {
            "wave": verdict.wave,
            "outcome": verdict.outcome.value,
            "reason": verdict.reason,
            "requests": verdict.measured.requests,
            "errors": verdict.measured.errors,
            "error_rate": None if rate is None else float(rate),
            "devices_measured": verdict.measured.devices,
            "cohort_size": verdict.cohort_size,
            "unreachable": list(verdict.unreachable),
            "failed_activation": list(verdict.failed_activation),
            "skipped": list(verdict.skipped),
            "evaluated_at": verdict.evaluated_at,
        }
    events = [AuditEvent(_AUDIT_KIND[event], payload)]
    if event in (E.APPROVE_HELD, E.PROMOTE) and "key_id" in detail:
        events.insert(
            0, AuditEvent("rollout_approved", {**payload, "event": event.value, "approved_wave": after.wave})
        )
    return tuple(events)


def _noop(rollout: SiteRollout, event: Event | None, message: str) -> Transition:
    return Transition(Outcome.NOOP, rollout, rollout, event, message)


def _refused(rollout: SiteRollout, reason: str, message: str, *, key_id: str | None = None) -> Transition:
    payload: dict[str, Any] = {"rollout_id": rollout.rollout_id, "reason": reason, "message": message}
    if key_id is not None:
        payload["key_id"] = key_id
    return Transition(
        Outcome.REFUSED, rollout, rollout, None, message, (AuditEvent("rollout_refused", payload),)
    )


# --- the leader's side: what to propose --------------------------------------------------------------


def proposals(
    plan: RolloutPlan,
    rollout: SiteRollout,
    verdict: GateVerdict | None,
    now: float,
    *,
    eligible: Iterable[str] | None = None,
    sizes: tuple[int, ...] | None = None,
    fleet_eligible: int | None = None,
) -> tuple[Input, ...]:
    """What the site leader should propose now, given the gate's latest verdict (it proposes exactly the
    inputs that would change the state, so a quiet rollout writes nothing to the Raft log).

    A PENDING rollout is started with the site's `eligible` devices (and this site's `sizes` per wave
    when the fleet is apportioned over sites), once the leader knows them.
    """
    if rollout.state.final:
        return ()
    if plan.expired(now):
        return (Expire(now),)
    if rollout.state is S.PENDING:
        if eligible is None:
            return ()
        return (Start(now, tuple(sorted(set(eligible))), sizes, fleet_eligible=fleet_eligible),)
    if verdict is None or verdict.rollout_id != plan.rollout_id:
        return ()
    if verdict.outcome is GateOutcome.FAIL and 1 <= verdict.wave <= rollout.wave:
        return (GateResult(now, verdict),)
    current = (verdict.wave, verdict.soak_started_at) == (rollout.wave, rollout.soak_started_at)
    if (
        rollout.state is S.SOAKING
        and current
        and (verdict.outcome is GateOutcome.PASS or verdict.deadline_passed)
    ):
        return (GateResult(now, verdict),)
    return ()


# --- the device's side: what to serve ----------------------------------------------------------------


class Prefetch(enum.Enum):
    """How a device should fetch the target's chunks."""

    NONE = "none"  # not at all (or drop them: the rollout is aborted)
    LOW = "low"  # in the background, below everything else (outside the current wave)
    NOW = "now"  # at normal priority: this device is to serve the target


@dataclass(frozen=True)
class Desired:
    """What a device should serve for one rollout, and why (one line, for status and logs).

    `version` None means the rollout asks nothing of this device: keep serving what it serves.
    `pinned` are the versions to keep on disk for the rollout's life (rollback needs the baseline).
    """

    version: str | None
    reason: str
    skip: Skip | None = None
    prefetch: Prefetch = Prefetch.NONE
    pinned: tuple[str, ...] = field(default=())

    @property
    def skipped(self) -> bool:
        return self.skip is not None


def desired_version(
    plan: RolloutPlan,
    rollout: SiteRollout,
    device: DeviceFacts,
    *,
    serving: str | None = None,
    aborted_elsewhere: str | None = None,
    now: float | None = None,
) -> Desired:
    """What `device` should serve now under `rollout` (its site's committed state) of `plan`.

    `serving` is the version it serves now (kept while paused); `aborted_elsewhere` the reason if an abort
    of this rollout is known from another site or an operator command not yet applied here (the baseline
    wins); `now` lets an expired, unfinished plan read as aborted even before the site applied the expiry.
    """
    both = (plan.baseline_version, plan.target_version)
    skip = skew_check(plan, device)
    if skip is not None and skip.kind is SkipKind.NOT_SELECTED:
        return Desired(None, skip.reason, skip)
    state = rollout.state
    expired = now is not None and plan.expired(now) and state is not S.COMPLETED
    if state is S.ABORTED or aborted_elsewhere is not None or expired:
        why = rollout.reason if state is S.ABORTED else (aborted_elsewhere or "its plan expired")
        return Desired(
            plan.baseline_version, f"{plan.label} was aborted: {why}", skip, pinned=(plan.baseline_version,)
        )
    if skip is not None:
        return Desired(
            plan.baseline_version, f"skips {plan.label}: {skip.reason}", skip, pinned=(plan.baseline_version,)
        )
    background = Prefetch.LOW if plan.prefetch is PrefetchPolicy.LOW else Prefetch.NONE
    if state is S.COMPLETED:
        return Desired(
            plan.target_version,
            f"{plan.label} completed",
            prefetch=Prefetch.NOW,
            pinned=(plan.target_version,),
        )
    if state is S.PENDING:
        return Desired(None, f"{plan.label} has not started", prefetch=background, pinned=both)
    if state is S.PAUSED:
        keep = serving if serving in both else None
        return Desired(keep, f"{plan.label} is paused: {rollout.reason}", prefetch=background, pinned=both)
    score = cohort_score(plan.rollout_id, device.node_id)
    if in_wave(score, rollout.threshold(rollout.wave)):
        return Desired(
            plan.target_version,
            f"in wave {rollout.wave} ({plan.wave(rollout.wave).label}) of {plan.label}",
            prefetch=Prefetch.NOW,
            pinned=both,
        )
    later = next(
        (k for k in range(rollout.wave + 1, plan.wave_count + 1) if in_wave(score, rollout.threshold(k))),
        None,
    )
    where = f"waits for wave {later} ({plan.wave(later).label})" if later else "is in no wave yet"
    return Desired(plan.baseline_version, f"{where} of {plan.label}", prefetch=background, pinned=both)


# --- the replicated machine over command bytes -------------------------------------------------------


def _command(cmd: str, now: float, **fields: Any) -> bytes:
    number(now, "command.now", RolloutStateError)
    return canonical_json(
        {"format": LEDGER_FORMAT, "cmd": cmd, "now": json_number(float(now)), "rules": LEDGER_RULES, **fields}
    )


def plan_command(signed: SignedPlan, *, now: float) -> bytes:
    """Register a publisher-signed plan with the site (verified on apply, on every replica)."""
    return _command(
        "rollout_plan",
        now,
        signed_plan={"plan": signed.plan.to_dict(), "publisher_signature": signed.publisher_signature.hex()},
    )


def encode_input(rollout_id: str, event_input: Input) -> bytes:
    """The command bytes a site leader proposes to its Raft group for `event_input`."""
    now = event_input.now
    if isinstance(event_input, Start):
        return _command(
            "rollout_start",
            now,
            rollout_id=rollout_id,
            eligible=sorted(set(event_input.eligible)),
            sizes=None if event_input.sizes is None else list(event_input.sizes),
            **({} if event_input.fleet_eligible is None else {"fleet_eligible": event_input.fleet_eligible}),
            marks={
                n: [
                    None if m.target is None else m.target.to_list(),
                    None if m.baseline is None else m.baseline.to_list(),
                ]
                for n, m in event_input.marks
            },
        )
    if isinstance(event_input, GateResult):
        return _command("rollout_gate", now, rollout_id=rollout_id, verdict=event_input.verdict.to_dict())
    if isinstance(event_input, OperatorInput):
        return _command("rollout_operator", now, rollout_id=rollout_id, command=event_input.command.to_dict())
    if isinstance(event_input, Expire):
        return _command("rollout_expire", now)
    if isinstance(event_input, PeerAborted):
        return _command(
            "rollout_peer_aborted",
            now,
            rollout_id=rollout_id,
            site=event_input.site,
            reason=event_input.reason,
        )
    raise RolloutStateError(f"not a rollout input: {type(event_input).__name__}")


_LEDGER_FIELDS = {
    "rollout_plan": frozenset({"signed_plan"}),
    "rollout_start": frozenset({"rollout_id", "eligible", "sizes", "marks"}),
    "rollout_gate": frozenset({"rollout_id", "verdict"}),
    "rollout_operator": frozenset({"rollout_id", "command"}),
    "rollout_expire": frozenset(),
    "rollout_peer_aborted": frozenset({"rollout_id", "site", "reason"}),
}
_LEDGER_OPTIONAL = {"rollout_start": frozenset({"fleet_eligible"})}
COMMAND_NAMES = frozenset(_LEDGER_FIELDS)


@dataclass(frozen=True)
class _Decoded:
    cmd: str
    now: float
    rollout_id: str | None = None
    signed_plan: SignedPlan | None = None
    event_input: Input | None = None
    rules: int = LEDGER_RULES


def decode_command(data: object) -> _Decoded:
    """Parse ledger command bytes strictly; raise RolloutStateError saying what is wrong."""
    doc = strict_json(data, "rollout command", RolloutStateError, MAX_LEDGER_COMMAND_BYTES)
    if not isinstance(doc, dict):
        raise RolloutStateError(f"rollout command: expected a JSON object, got {type(doc).__name__}")
    if type(doc.get("format")) is not int or doc.get("format") != LEDGER_FORMAT:
        raise RolloutStateError(
            f"rollout command.format: unsupported format {doc.get('format')!r}; this node "
            f"applies format {LEDGER_FORMAT}"
        )
    cmd = doc.get("cmd")
    if not isinstance(cmd, str) or cmd not in _LEDGER_FIELDS:
        raise RolloutStateError(
            f"rollout command.cmd: unknown command {str(cmd)[:40]!r}; expected one of "
            f"{', '.join(sorted(_LEDGER_FIELDS))}"
        )
    d = expect_object(
        doc,
        f"rollout command {cmd}",
        _LEDGER_FIELDS[cmd] | {"format", "cmd", "now"},
        RolloutStateError,
        _LEDGER_OPTIONAL.get(cmd, frozenset()) | {"rules"},
    )
    now = number(d["now"], f"{cmd}.now", RolloutStateError)
    rules = d.get("rules", 1)
    if type(rules) is not int or not 1 <= rules <= LEDGER_RULES:
        raise RolloutStateError(
            f"{cmd}.rules: this node applies rules 1 to {LEDGER_RULES}, not {str(rules)[:20]!r}; "
            "upgrade it to the version its site leader runs"
        )
    if rules < 2 and "fleet_eligible" in d:
        raise RolloutStateError(f"{cmd}.fleet_eligible: rules 1 has no fleet count; send rules 2 or later")
    decoded = _decode_body(cmd, d, now)
    return dataclasses.replace(decoded, rules=rules)


def _decode_body(cmd: str, d: dict[str, Any], now: float) -> _Decoded:
    rollout_id = d.get("rollout_id")
    if "rollout_id" in d and (not isinstance(rollout_id, str) or not ROLLOUT_ID_RE.fullmatch(rollout_id)):
        raise RolloutStateError(f"{cmd}.rollout_id: {str(rollout_id)[:80]!r} is not a rollout id")
    try:
        if cmd == "rollout_plan":
            signed = SignedPlan.from_json(canonical_json(d["signed_plan"]))
            return _Decoded(cmd, now, signed.plan.rollout_id, signed_plan=signed)
        if cmd == "rollout_expire":
            return _Decoded(cmd, now, event_input=Expire(now))
        if cmd == "rollout_start":
            eligible = d["eligible"]
            if (
                not isinstance(eligible, list)
                or len(eligible) > MAX_ELIGIBLE
                or not all(isinstance(n, str) and _SITE_RE.fullmatch(n) for n in eligible)
            ):
                raise RolloutStateError(f"rollout_start.eligible: expected at most {MAX_ELIGIBLE} node ids")
            sizes = d["sizes"]
            if sizes is not None and (
                not isinstance(sizes, list)
                or len(sizes) > 16
                or not all(type(s) is int and 0 <= s <= MAX_ELIGIBLE for s in sizes)
            ):
                raise RolloutStateError("rollout_start.sizes: expected null or a list of device counts")
            fleet = d.get("fleet_eligible")
            if fleet is not None and (type(fleet) is not int or not 0 <= fleet <= MAX_FLEET_ELIGIBLE):
                raise RolloutStateError(
                    f"rollout_start.fleet_eligible: expected null or a device count 0..{MAX_FLEET_ELIGIBLE}"
                )
            marks = _marks_from(d["marks"], "rollout_start.marks")
            return _Decoded(
                cmd,
                now,
                rollout_id,
                event_input=Start(
                    now, tuple(eligible), None if sizes is None else tuple(sizes), marks, fleet
                ),
            )
        if cmd == "rollout_gate":
            return _Decoded(
                cmd, now, rollout_id, event_input=GateResult(now, GateVerdict.from_dict(d["verdict"]))
            )
        if cmd == "rollout_operator":
            return _Decoded(
                cmd, now, rollout_id, event_input=OperatorInput(now, RolloutCommand.from_dict(d["command"]))
            )
        site = d["site"]
        if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
            raise RolloutStateError(f"rollout_peer_aborted.site: {str(site)[:80]!r} is not a site name")
        reason = text(d["reason"], "rollout_peer_aborted.reason", RolloutStateError, 512)
        return _Decoded(cmd, now, rollout_id, event_input=PeerAborted(now, site, reason))
    except (PlanFormatError, HealthFormatError, MalformedCommand) as exc:
        raise RolloutStateError(f"{cmd}: {exc}") from None
    except (TypeError, ValueError) as exc:  # canonical_json of a document with a lone surrogate
        raise RolloutStateError(f"{cmd}: {exc}") from None


def _marks_from(doc: object, where: str) -> tuple[tuple[str, DeviceMarks], ...]:
    if not isinstance(doc, dict) or len(doc) > MAX_ELIGIBLE:
        raise RolloutStateError(f"{where}: expected an object of node id -> [target mark, baseline mark]")
    out = []
    for node, pair in sorted(doc.items()):
        if not _SITE_RE.fullmatch(node) or not isinstance(pair, list) or len(pair) != 2:
            raise RolloutStateError(f"{where}: bad entry for {node[:64]!r}")
        try:
            out.append((node, DeviceMarks(*(None if m is None else Mark.from_list(m, where) for m in pair))))
        except HealthFormatError as exc:
            raise RolloutStateError(str(exc)) from None
    return tuple(out)


@dataclass(frozen=True)
class LedgerResult:
    """What one command did to the site's rollouts, and the audit records every replica produces."""

    outcome: Outcome
    rollout_id: str | None
    message: str
    audit: tuple[AuditEvent, ...] = ()
    transitions: tuple[Transition, ...] = ()


@dataclass(frozen=True)
class Tombstone:
    """What became of a version's last rollout once the site forgot its plan: `aborted` keeps a device
    away longer than the plan lived (or holding the target on disk) from serving the target again;
    `completed` (a later rollout of the same version that went through) lifts an older abort."""

    model: str
    target_version: str
    baseline_version: str
    outcome: str  # "aborted" | "completed"
    at: float
    rollout_id: str
    reason: str

    @property
    def aborted(self) -> bool:
        return self.outcome == "aborted"

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.target_version)

    @classmethod
    def of(cls, plan: RolloutPlan, rollout: SiteRollout) -> Tombstone:
        outcome = "aborted" if rollout.state is RolloutState.ABORTED else "completed"
        return cls(
            plan.model,
            plan.target_version,
            plan.baseline_version,
            outcome,
            rollout.updated_at,
            plan.rollout_id,
            rollout.reason[:512],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target_version": self.target_version,
            "baseline_version": self.baseline_version,
            "outcome": self.outcome,
            "at": json_number(self.at),
            "rollout_id": self.rollout_id,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> Tombstone:
        where = "rollout snapshot.tombstones"
        d = expect_object(
            doc,
            where,
            _TOMBSTONE_FIELDS,
            RolloutStateError,
        )
        texts = ("model", "target_version", "baseline_version", "rollout_id", "reason")
        if not all(isinstance(d[k], str) for k in texts) or d["outcome"] not in ("aborted", "completed"):
            raise RolloutStateError(f"{where}: malformed entry for {str(d.get('rollout_id'))[:80]!r}")
        at = number(d["at"], f"{where}.at", RolloutStateError)
        return cls(
            d["model"],
            d["target_version"],
            d["baseline_version"],
            d["outcome"],
            at,
            d["rollout_id"],
            d["reason"],
        )


_TOMBSTONE_FIELDS = frozenset(
    {"model", "target_version", "baseline_version", "outcome", "at", "rollout_id", "reason"}
)


class RolloutLedger:
    """One replica's copy of a site's rollouts: verified plans and their `SiteRollout`s.

    `site`, `trusted` and `max_share_ppm` are configuration: every replica of the group must be built
    with the same values, or they will disagree. `apply` takes committed command bytes, reads no clock
    (the ledger's time is the largest `now` it has seen) and never raises on bad input.
    """

    def __init__(self, *, site: str, trusted: TrustedKeys, max_share_ppm: int | None = None) -> None:
        if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
            raise ValueError(f"site name {site!r} is not valid (expected {_SITE_RE.pattern})")
        if max_share_ppm is not None and (type(max_share_ppm) is not int or not 0 <= max_share_ppm <= PPM):
            raise ValueError(f"max_share_ppm must be a whole number 0..{PPM}, got {max_share_ppm!r}")
        self.site = site
        self.trusted = trusted
        self.max_share_ppm = max_share_ppm
        self._clock = 0.0
        self._plans: dict[str, SignedPlan] = {}
        self._rollouts: dict[str, SiteRollout] = {}
        self._tombstones: dict[tuple[str, str], Tombstone] = {}
        self._rules_floor = 1  # the newest rules applied here; older commands are refused after it

    # --- views ---

    def tombstones(self) -> tuple[Tombstone, ...]:
        """Per (model, target version), how its newest forgotten rollout ended (newest `MAX_TOMBSTONES`),
        oldest first."""
        return tuple(sorted(self._tombstones.values(), key=lambda t: (t.at, t.model, t.target_version)))

    @property
    def clock(self) -> float:
        return self._clock

    def rollouts(self) -> tuple[tuple[RolloutPlan, SiteRollout], ...]:
        """Every known rollout, oldest plan first."""
        return tuple(
            sorted(
                ((self._plans[r].plan, s) for r, s in self._rollouts.items()),
                key=lambda p: (p[0].created_at, p[0].rollout_id),
            )
        )

    def get(self, rollout_id: str) -> tuple[RolloutPlan, SiteRollout] | None:
        if rollout_id not in self._rollouts:
            return None
        return self._plans[rollout_id].plan, self._rollouts[rollout_id]

    def signed_plan(self, rollout_id: str) -> SignedPlan | None:
        """The plan document as signed, for anti-entropy with a peer that missed it."""
        return self._plans.get(rollout_id)

    def active(self, model: str) -> tuple[RolloutPlan, SiteRollout] | None:
        """The unfinished rollout of `model` in this site, if any (there is at most one)."""
        for plan, rollout in self.rollouts():
            if plan.model == model and not rollout.state.final:
                return plan, rollout
        return None

    # --- apply ---

    def apply(self, data: bytes) -> LedgerResult:
        try:
            decoded = decode_command(data)
        except RolloutStateError as exc:
            return self._refuse(None, "malformed_command", str(exc))
        if decoded.rules < self._rules_floor:
            # Once a site applied newer rules it never goes back: a confused leader cannot skip the checks
            # they added by proposing old bytes.
            return self._refuse(
                decoded.rollout_id,
                "old_rules",
                f"{decoded.cmd} asks for rules {decoded.rules}; site {self.site} applies rules "
                f"{self._rules_floor} or later",
            )
        self._rules_floor = decoded.rules
        self._clock = max(self._clock, decoded.now)
        now = self._clock
        if decoded.signed_plan is not None:
            return self._register(decoded.signed_plan, now)
        event_input = decoded.event_input
        assert event_input is not None
        event_input = dataclasses.replace(event_input, now=now)  # a stale stamp never rewinds a rollout
        if isinstance(event_input, Expire):
            return self._expire(now, decoded.rules)
        assert decoded.rollout_id is not None
        known = self.get(decoded.rollout_id)
        if known is None:
            return self._refuse(
                decoded.rollout_id,
                "unknown_rollout",
                f"no plan for rollout {decoded.rollout_id} is registered in site {self.site}",
            )
        plan, rollout = known
        step = apply(
            plan,
            rollout,
            event_input,
            trusted=self.trusted,
            max_share_ppm=self.max_share_ppm,
            rules=decoded.rules,
        )
        self._rollouts[plan.rollout_id] = step.after
        return LedgerResult(step.outcome, plan.rollout_id, step.message, step.audit, (step,))

    def _register(self, signed: SignedPlan, now: float) -> LedgerResult:
        plan = signed.plan
        known = self._plans.get(plan.rollout_id)
        if known is not None:
            if known.digest == signed.digest:
                return LedgerResult(Outcome.NOOP, plan.rollout_id, f"{plan.label} is already registered")
            return self._refuse(
                plan.rollout_id,
                "id_collision",
                f"rollout id {plan.rollout_id} already names plan {known.digest[:16]}",
            )
        try:
            verify_plan(signed, self.trusted, now=now)
        except PlanSignatureError as exc:
            return self._refuse(plan.rollout_id, exc.reason, str(exc), key_id=exc.key_id)
        except PlanExpiredError as exc:
            return self._refuse(plan.rollout_id, "expired", str(exc))
        busy = self.active(plan.model)
        if busy is not None:
            return self._refuse(
                plan.rollout_id,
                "model_busy",
                f"{busy[0].label} is still {busy[1].state.value} in site {self.site}; at most "
                f"one rollout of {plan.model} runs at a time (abort it or let it finish)",
            )
        if len(self._plans) >= MAX_ROLLOUTS:
            return self._refuse(
                plan.rollout_id,
                "too_many",
                f"site {self.site} already holds {MAX_ROLLOUTS} rollouts; wait for old ones to be forgotten",
            )
        self._plans[plan.rollout_id] = signed
        self._rollouts[plan.rollout_id] = dataclasses.replace(new_rollout(plan), updated_at=now)
        event = AuditEvent(
            "rollout_plan",
            {
                "rollout_id": plan.rollout_id,
                "plan_digest": plan.digest,
                "model": plan.model,
                "target_version": plan.target_version,
                "baseline_version": plan.baseline_version,
                "waves": [w.label for w in plan.waves],
                "selector": plan.selector.to_dict(),
                "publisher_key_id": plan.publisher_key_id,
                "expires_at": plan.expires_at,
                "at": now,
            },
        )
        return LedgerResult(Outcome.APPLIED, plan.rollout_id, f"registered {plan.label}", (event,))

    def _expire(self, now: float, rules: int) -> LedgerResult:
        steps = []
        forgotten: list[AuditEvent] = []
        for plan, rollout in self.rollouts():
            step = apply(
                plan,
                rollout,
                Expire(now),
                trusted=self.trusted,
                max_share_ppm=self.max_share_ppm,
                rules=rules,
            )
            if step.outcome is Outcome.APPLIED:
                self._rollouts[plan.rollout_id] = step.after
                steps.append(step)
            elif rollout.state.final and now >= plan.expires_at + RETAIN_AFTER_EXPIRY_S:
                del self._rollouts[plan.rollout_id]
                del self._plans[plan.rollout_id]
                if rules >= 2:
                    # Forgotten, not forgiven: a device back after all this must still not serve an aborted
                    # target; the newest word on a version wins (a later completed rollout lifts an abort).
                    tomb = Tombstone.of(plan, rollout)
                    old = self._tombstones.get(tomb.key)
                    if old is None or (old.at, old.rollout_id) <= (tomb.at, tomb.rollout_id):
                        self._tombstones[tomb.key] = tomb
                    # Over the bound, completed words go first (they only lift an abort), then the oldest.
                    by_worth = sorted(self._tombstones.values(), key=lambda t: (t.aborted, t.at, t.key))
                    dropped = by_worth[: max(0, len(by_worth) - MAX_TOMBSTONES)]
                    for gone in dropped:
                        del self._tombstones[gone.key]
                    # On the record: what the site no longer holds, and which word on a version it keeps.
                    forgotten.append(
                        AuditEvent(
                            "rollout_forgotten",
                            {
                                "rollout_id": plan.rollout_id,
                                "model": plan.model,
                                "target_version": plan.target_version,
                                "state": rollout.state.value,
                                "remembered": "aborted" if tomb.aborted else "completed",
                                "tombstones_dropped": [f"{t.model} {t.target_version}" for t in dropped],
                                "at": now,
                            },
                        )
                    )
        if not steps and not forgotten:
            return LedgerResult(Outcome.NOOP, None, "no rollout is due to expire")
        audit = tuple(e for s in steps for e in s.audit) + tuple(forgotten)
        messages = [s.message for s in steps]
        messages += [f"forgot rollout {e.payload['rollout_id']}" for e in forgotten]
        return LedgerResult(Outcome.APPLIED, None, "; ".join(messages), audit, tuple(steps))

    def _refuse(
        self, rollout_id: str | None, reason: str, message: str, *, key_id: str | None = None
    ) -> LedgerResult:
        payload: dict[str, Any] = {
            "rollout_id": rollout_id,
            "reason": reason,
            "message": message,
            "at": self._clock,
        }
        if key_id is not None:
            payload["key_id"] = key_id
        return LedgerResult(Outcome.REFUSED, rollout_id, message, (AuditEvent("rollout_refused", payload),))

    # --- snapshots ---

    def snapshot(self) -> bytes:
        """Deterministic bytes of the whole replicated state (for Raft log compaction)."""
        return canonical_json(
            {
                "format": LEDGER_FORMAT,
                "site": self.site,
                "clock": json_number(self._clock),
                "plans": {
                    r: {"plan": s.plan.to_dict(), "publisher_signature": s.publisher_signature.hex()}
                    for r, s in self._plans.items()
                },
                "rollouts": {r: s.to_dict() for r, s in self._rollouts.items()},
                # Only when set: the bytes of a ledger that only ever applied rules 1 stay what they were.
                **({"rules": self._rules_floor} if self._rules_floor > 1 else {}),
                **({"tombstones": [t.to_dict() for t in self.tombstones()]} if self._tombstones else {}),
            }
        )

    def state_digest(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()

    def restore(self, snapshot: bytes) -> None:
        """Replace the state with `snapshot`; on error the current state is kept."""
        doc = strict_json(snapshot, "rollout snapshot", RolloutStateError, 1 << 30)
        try:
            if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
                raise RolloutStateError(
                    f"rollout snapshot: unsupported format; this node restores {LEDGER_FORMAT}"
                )
            if doc["site"] != self.site:
                raise RolloutStateError(
                    f"rollout snapshot is of site {doc['site']!r}, this ledger is {self.site!r}"
                )
            clock = number(doc["clock"], "rollout snapshot.clock", RolloutStateError)
            plans = {str(r): SignedPlan.from_json(canonical_json(p)) for r, p in doc["plans"].items()}
            rollouts = {str(r): SiteRollout.from_dict(s) for r, s in doc["rollouts"].items()}
            floor = doc.get("rules", 1)
            if type(floor) is not int or not 1 <= floor <= LEDGER_RULES:
                raise RolloutStateError(f"rollout snapshot.rules: expected 1..{LEDGER_RULES}, got {floor!r}")
            listed = doc.get("tombstones", [])
            if not isinstance(listed, list) or len(listed) > MAX_TOMBSTONES:
                raise RolloutStateError(
                    f"rollout snapshot.tombstones: expected a list of at most {MAX_TOMBSTONES} entries"
                )
            tombstones = {t.key: t for t in map(Tombstone.from_dict, listed)}
            if plans.keys() != rollouts.keys() or any(
                rollouts[r].plan_digest != plans[r].digest for r in plans
            ):
                raise RolloutStateError("rollout snapshot: plans and rollouts do not match")
        except RolloutStateError:
            raise
        except (
            PlanFormatError,
            HealthFormatError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
            OverflowError,
        ) as exc:
            raise RolloutStateError(f"rollout snapshot is damaged: {type(exc).__name__}: {exc}") from None
        self._clock, self._plans, self._rollouts = clock, plans, rollouts
        self._tombstones, self._rules_floor = tombstones, floor
