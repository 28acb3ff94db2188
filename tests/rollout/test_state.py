"""The per-site rollout state machine: its table, the guard's rule on every replica, the ledger's bytes,
and what each device serves under each state."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.rollout.cohort import cohort_score, in_wave
from mesh.rollout.health import GateOutcome, GateVerdict, Totals, evaluate_gate
from mesh.rollout.plan import PPM, CommandAction, PrefetchPolicy, Selector, SignedPlan, SkipKind
from mesh.rollout.state import (
    MAX_TOMBSTONES,
    TRANSITIONS,
    Event,
    Expire,
    GateResult,
    OperatorInput,
    Outcome,
    PeerAborted,
    Prefetch,
    RolloutLedger,
    RolloutState,
    RolloutStateError,
    SiteRollout,
    Start,
    apply,
    decode_command,
    desired_version,
    encode_input,
    new_rollout,
    plan_command,
    proposals,
    wave_needs_approval,
)
from tests.rollout.builders import (
    NODE,
    OPERATOR,
    OTHER_SIGNATURE,
    PUBLISHER,
    ROGUE_OPERATOR,
    T0,
    TRUSTED,
    command,
    device,
    make_plan,
    report,
    signed,
)
from tests.strategies import json_values

S = RolloutState
PLAN = make_plan()  # 1%, 10%, 100%; soak 60 s, 100 requests, 5%; approval above 10%
NODES = [f"node-{i:03d}" for i in range(100)]
STARTED_AT = T0 + 10


def step(rollout: SiteRollout, event_input, plan=PLAN, **kw):
    return apply(plan, rollout, event_input, trusted=TRUSTED, **kw)


def started(plan=PLAN, nodes=NODES) -> SiteRollout:
    t = step(new_rollout(plan), Start(STARTED_AT, tuple(nodes)), plan)
    assert t.outcome is Outcome.APPLIED and t.after.state is S.SOAKING and t.after.wave == 1
    return t.after


def verdict(
    rollout: SiteRollout,
    outcome: GateOutcome,
    *,
    at: float | None = None,
    requests: int = 1000,
    errors: int = 0,
    deadline_passed: bool = False,
    wave: int | None = None,
) -> GateVerdict:
    soak = rollout.soak_started_at
    assert soak is not None
    return GateVerdict(
        rollout_id=PLAN.rollout_id,
        wave=wave or rollout.wave,
        outcome=outcome,
        reason=f"test {outcome.value}",
        evaluated_at=soak + 61 if at is None else at,
        soak_started_at=soak,
        measured=Totals(requests, errors, 3),
        soaked=Totals(requests, errors, 3),
        own_soaked=Totals(requests, errors, 3),
        cohort_size=3,
        deadline_passed=deadline_passed,
    )


def passed(rollout: SiteRollout, **kw) -> SiteRollout:
    v = verdict(rollout, GateOutcome.PASS)
    t = step(rollout, GateResult(v.evaluated_at, v), **kw)
    assert t.outcome is Outcome.APPLIED, t.message
    return t.after


def op(rollout: SiteRollout, action: CommandAction, *, now: float | None = None, **kw):
    now = (rollout.updated_at + 1) if now is None else now
    return step(rollout, OperatorInput(now, command(PLAN, action, now=now, **kw)))


# --- the table ---------------------------------------------------------------------------------------


def test_final_states_have_no_way_out_and_every_live_state_can_roll_back():
    for state, row in TRANSITIONS.items():
        if state.final:
            assert row == {}
        else:
            for event in (Event.ABORT, Event.GATE_FAIL, Event.EXPIRE, Event.PEER_ABORT):
                assert row[event] is S.ABORTED, (state, event)


def test_only_an_operator_or_a_gate_within_scope_starts_a_wave():
    # Into SOAKING (a new wave) only by START, a gate pass (the guard checks scope), an approval, a promote
    # (operator-signed), or a resume (back to where it was).
    into_soaking = {e for row in TRANSITIONS.values() for e, target in row.items() if target is S.SOAKING}
    assert into_soaking - {Event.APPROVE_AHEAD} == {
        Event.START,
        Event.GATE_PASS,
        Event.APPROVE_HELD,
        Event.PROMOTE,
    }


# --- a whole rollout ---------------------------------------------------------------------------------


def test_a_good_rollout_passes_each_wave_waits_for_approval_above_scope_and_completes():
    r = started()
    assert r.eligible_count == 100 and len(r.cohort(NODES)) == 1  # 1% of 100
    r = passed(r)
    assert (r.state, r.wave) == (S.SOAKING, 2) and len(r.cohort(NODES)) == 10
    v = verdict(r, GateOutcome.PASS)
    held = step(r, GateResult(v.evaluated_at, v))
    assert held.after.state is S.WAITING_APPROVAL and held.after.wave == 2
    assert "mesh rollout approve okay-nabu-2 --wave 3" in held.after.reason
    assert [e.kind for e in held.audit] == ["rollout_held"]
    assert "mesh rollout approve" in held.after.waiting_for(PLAN)
    # Another passing verdict or a forged approval changes nothing.
    assert step(held.after, GateResult(v.evaluated_at + 5, v)).outcome is Outcome.NOOP
    forged = op(held.after, CommandAction.APPROVE, wave=3, key=ROGUE_OPERATOR)
    assert forged.outcome is Outcome.REFUSED and forged.after.state is S.WAITING_APPROVAL
    assert forged.audit[0].kind == "rollout_refused" and forged.audit[0].payload["reason"] == "unknown_key"
    approved = op(held.after, CommandAction.APPROVE, wave=3)
    assert (approved.after.state, approved.after.wave) == (S.SOAKING, 3)
    assert [e.kind for e in approved.audit] == ["rollout_approved", "rollout_wave_started"]
    assert approved.audit[0].payload["key_id"] == OPERATOR.key_id
    assert approved.after.cohort(NODES) == frozenset(NODES)
    v = verdict(approved.after, GateOutcome.PASS)
    done = step(approved.after, GateResult(v.evaluated_at, v))
    assert done.after.state is S.COMPLETED and done.audit[0].kind == "rollout_completed"
    assert done.after.marks == ()


def test_an_early_approval_is_remembered_and_the_wave_does_not_wait():
    r = op(started(), CommandAction.APPROVE, wave=3).after
    assert r.state is S.SOAKING and r.approved_waves == {3}
    r = passed(passed(r))
    assert (r.state, r.wave) == (S.SOAKING, 3)


def test_the_site_guard_can_narrow_the_scope_but_not_widen_it():
    r = passed(started(), max_share_ppm=50_000)  # wave 2 is 10%, above this site's 5%
    assert r.state is S.WAITING_APPROVAL and r.wave == 1
    r = passed(passed(started(), max_share_ppm=PPM), max_share_ppm=PPM)
    assert r.state is S.WAITING_APPROVAL  # the plan's own 10% still holds the 100% wave


def test_a_wave_rounded_up_to_one_device_is_judged_by_its_real_share():
    # Four devices: the 1% wave is one device, 25% of them, above the plan's 10% scope (0.4 devices):
    # even wave 1 waits.
    t = step(new_rollout(PLAN), Start(STARTED_AT, tuple(NODES[:4])))
    assert t.after.state is S.WAITING_APPROVAL and t.after.fleet_eligible_count == 4, t.after
    assert "wave 1 (1%: 1 of 4 selected devices, 25%) is above the autonomous scope of 10%" in t.after.reason
    r = op(t.after, CommandAction.APPROVE, wave=1).after
    assert (r.state, r.wave) == (S.SOAKING, 1)
    # Twenty: one device is 5%, the 10% wave two devices, 10%: both within scope.
    r = passed(started(nodes=NODES[:20]))
    assert (r.state, r.wave) == (S.SOAKING, 2)
    # A site of 3 in a fleet of 20 is judged by the fleet's count its wave sizes were apportioned from.
    t = step(new_rollout(PLAN), Start(STARTED_AT, tuple(NODES[:3]), (1, 1, 3), fleet_eligible=20))
    assert (t.after.state, t.after.wave, t.after.fleet_eligible_count) == (S.SOAKING, 1, 20)
    assert wave_needs_approval(PLAN, t.after, 3) and not wave_needs_approval(PLAN, t.after, 2)
    # The same site alone would hold its wave: the count is what the guard judges by.
    assert step(new_rollout(PLAN), Start(STARTED_AT, tuple(NODES[:3]), (1, 1, 3))).after.state is (
        S.WAITING_APPROVAL
    )
    # A count that cannot be is a confused (or lying) proposer: refused, audited, nothing moves.
    for start, why in (
        (
            Start(STARTED_AT, tuple(NODES[:7]), (1, 1, 7), fleet_eligible=5),
            "fleet_eligible 5 is below this site's 7 eligible devices",
        ),
        (
            Start(STARTED_AT, tuple(NODES[:3]), None, fleet_eligible=1000),
            "with waves sized for this site alone",
        ),
        # 3 devices in wave 1 would be 3% of a fleet of 100, but the fleet's wave 1 is one device.
        (Start(STARTED_AT, tuple(NODES[:3]), (3, 3, 3), fleet_eligible=100), "more than the fleet's waves"),
    ):
        t = step(new_rollout(PLAN), start)
        assert t.outcome is Outcome.REFUSED and t.after.state is S.PENDING and why in t.message, t.message


def test_the_fleet_count_travels_in_the_ledger_bytes_and_old_starts_still_decode():
    start = Start(STARTED_AT, tuple(NODES[:7]), (1, 1, 7), fleet_eligible=20)
    assert decode_command(encode_input(PLAN.rollout_id, start)).event_input == start
    old = Start(STARTED_AT, tuple(NODES[:7]))
    data = encode_input(PLAN.rollout_id, old)
    assert b"fleet_eligible" not in data and decode_command(data).event_input == old
    doc = json.loads(encode_input(PLAN.rollout_id, start))
    for bad in (-1, 1.5, "20", 1 << 40):
        with pytest.raises(RolloutStateError, match="fleet_eligible"):
            decode_command(json.dumps({**doc, "fleet_eligible": bad}).encode())
    assert "fleet_eligible_count" in started().to_dict()


def old_rules(data: bytes) -> bytes:
    """`data` as a node before rules 2 wrote it (no `rules` field)."""
    doc = json.loads(data)
    del doc["rules"]
    return json.dumps(doc).encode()


def test_a_journal_written_under_rules_1_replays_as_it_was_applied():
    # Rules 1: the plan's share alone, no coverage check, no tombstones; the state's bytes are as before.
    site = ledger()
    site.apply(old_rules(plan_command(signed(PLAN), now=T0 + 1)))
    start = Start(STARTED_AT, tuple(NODES[:4]))  # 1% of 4 devices is one: held under rules 2
    assert site.apply(old_rules(encode_input(PLAN.rollout_id, start))).outcome is Outcome.APPLIED
    rollout = site.get(PLAN.rollout_id)[1]
    assert (rollout.state, rollout.fleet_eligible_count) == (S.SOAKING, 0)
    assert "fleet_eligible_count" not in rollout.to_dict()
    v = dataclasses.replace(
        verdict(rollout, GateOutcome.PASS), soaked=Totals(1000, 0, 1), unreachable=("a", "b")
    )
    data = encode_input(PLAN.rollout_id, GateResult(v.evaluated_at, v))
    copy = ledger()
    copy.restore(site.snapshot())
    assert copy.apply(data).outcome is Outcome.REFUSED  # rules 2: 1 heard from, 2 silent
    assert site.apply(old_rules(data)).outcome is Outcome.APPLIED  # rules 1 took it
    abort = OperatorInput(T0 + 100, command(PLAN, CommandAction.ABORT, now=T0 + 100))
    assert site.apply(old_rules(encode_input(PLAN.rollout_id, abort))).outcome is Outcome.APPLIED
    site.apply(old_rules(encode_input(PLAN.rollout_id, Expire(PLAN.expires_at + 25 * 3600))))
    assert site.get(PLAN.rollout_id) is None and site.tombstones() == ()
    with pytest.raises(RolloutStateError, match="applies rules 1 to 3"):
        decode_command(encode_input(PLAN.rollout_id, start).replace(b'"rules":3', b'"rules":4'))
    with pytest.raises(RolloutStateError, match="rules 1 has no fleet count"):
        decode_command(old_rules(encode_input(PLAN.rollout_id, dataclasses.replace(start, fleet_eligible=4))))


def test_rules_1_knew_no_site_limit_and_a_site_never_goes_back_to_rules_1():
    # Replayed after an upgrade on a site that now sets [guard] rollout_max_share = 5%: as it was applied.
    site = ledger(max_share_ppm=50_000)
    site.apply(old_rules(plan_command(signed(PLAN), now=T0 + 1)))
    site.apply(old_rules(encode_input(PLAN.rollout_id, Start(STARTED_AT, tuple(NODES)))))
    rollout = site.get(PLAN.rollout_id)[1]
    v = verdict(rollout, GateOutcome.PASS)
    assert site.apply(old_rules(encode_input(PLAN.rollout_id, GateResult(v.evaluated_at, v)))).outcome is (
        Outcome.APPLIED
    )
    assert (site.get(PLAN.rollout_id)[1].state, site.get(PLAN.rollout_id)[1].wave) == (S.SOAKING, 2)
    assert b'"rules"' not in site.snapshot()
    # The first rules-2 command raises the site's floor, in its snapshot too; old bytes are refused after.
    pause = OperatorInput(T0 + 200, command(PLAN, CommandAction.PAUSE, now=T0 + 200))
    assert site.apply(encode_input(PLAN.rollout_id, pause)).outcome is Outcome.APPLIED
    resume = OperatorInput(T0 + 201, command(PLAN, CommandAction.RESUME, now=T0 + 201))
    refused = site.apply(old_rules(encode_input(PLAN.rollout_id, resume)))
    assert refused.outcome is Outcome.REFUSED and "applies rules 3 or later" in refused.message
    copy = ledger(max_share_ppm=50_000)
    copy.restore(site.snapshot())
    assert copy.apply(old_rules(encode_input(PLAN.rollout_id, resume))).outcome is Outcome.REFUSED


def test_a_pass_from_too_few_of_the_cohort_is_refused_by_every_replica():
    r = started()
    v = dataclasses.replace(verdict(r, GateOutcome.PASS), soaked=Totals(1000, 0, 1), unreachable=("a", "b"))
    t = step(r, GateResult(v.evaluated_at, v))
    assert t.outcome is Outcome.REFUSED and "does not cover its cohort" in t.message, t.message
    assert "from 1 device served the whole soak, 2 cohort devices of this site are unreachable" in t.message
    v = dataclasses.replace(v, soaked=Totals(1000, 0, 2))
    assert step(r, GateResult(v.evaluated_at, v)).outcome is Outcome.APPLIED


def test_a_failing_gate_aborts_from_every_live_state_with_its_evidence_audited():
    for rollout in (started(), passed(passed(started())), op(started(), CommandAction.PAUSE).after):
        v = dataclasses.replace(
            verdict(rollout, GateOutcome.FAIL, requests=200, errors=40),
            wave=1,
            failed_activation=("node-007",),
        )
        t = step(rollout, GateResult(v.evaluated_at, v))
        assert t.after.state is S.ABORTED and t.rollback, rollout.state
        (event,) = t.audit
        assert event.kind == "rollout_aborted" and event.payload["gate"]["error_rate"] == 0.2
        assert event.payload["gate"]["failed_activation"] == ["node-007"]
        assert "gate failed" in t.after.reason


def test_stale_or_inconsistent_verdicts_change_nothing():
    r = started()
    v = verdict(r, GateOutcome.PASS)
    stale = dataclasses.replace(v, soak_started_at=r.soak_started_at - 100, evaluated_at=v.evaluated_at)
    assert step(r, GateResult(v.evaluated_at, stale)).outcome is Outcome.NOOP
    early = verdict(r, GateOutcome.PASS, at=r.soak_started_at + 30)
    assert step(r, GateResult(early.evaluated_at, early)).outcome is Outcome.REFUSED
    thin = verdict(r, GateOutcome.PASS, requests=50)
    assert step(r, GateResult(thin.evaluated_at, thin)).outcome is Outcome.REFUSED
    bad = verdict(r, GateOutcome.PASS, requests=100, errors=6)
    assert step(r, GateResult(bad.evaluated_at, bad)).outcome is Outcome.REFUSED
    future = verdict(r, GateOutcome.PASS)
    assert step(r, GateResult(future.evaluated_at - 1, future)).outcome is Outcome.REFUSED
    other = dataclasses.replace(v, rollout_id="another")
    assert step(r, GateResult(v.evaluated_at, other)).outcome is Outcome.REFUSED
    later_wave = verdict(r, GateOutcome.FAIL, wave=2)
    assert step(r, GateResult(later_wave.evaluated_at, later_wave)).outcome is Outcome.NOOP


def test_inconclusive_past_the_deadline_pauses_and_resume_starts_a_new_soak():
    r = started()
    quiet = verdict(r, GateOutcome.INCONCLUSIVE, requests=0)
    assert step(r, GateResult(quiet.evaluated_at, quiet)).outcome is Outcome.NOOP
    early = verdict(r, GateOutcome.INCONCLUSIVE, requests=0, deadline_passed=True, at=r.soak_started_at + 100)
    assert step(r, GateResult(early.evaluated_at, early)).outcome is Outcome.REFUSED  # deadline is 120 s
    late = verdict(r, GateOutcome.INCONCLUSIVE, requests=0, deadline_passed=True, at=r.soak_started_at + 121)
    paused = step(r, GateResult(late.evaluated_at, late)).after
    assert paused.state is S.PAUSED and "inconclusive past its deadline" in paused.reason
    assert "mesh rollout resume okay-nabu-2" in paused.waiting_for(PLAN)
    resumed = op(paused, CommandAction.RESUME, now=late.evaluated_at + 300)
    assert resumed.after.state is S.SOAKING and resumed.after.soak_started_at == late.evaluated_at + 300
    old = verdict(r, GateOutcome.PASS)  # measured in the old soak
    assert step(resumed.after, GateResult(late.evaluated_at + 400, old)).outcome is Outcome.NOOP


def test_pause_resume_returns_to_where_it_was_and_an_approval_while_paused_counts():
    waiting = passed(passed(started()))
    paused = op(waiting, CommandAction.PAUSE, reason="maintenance window").after
    assert paused.state is S.PAUSED and paused.paused_from is S.WAITING_APPROVAL
    assert "maintenance window" in paused.reason
    approved_while_paused = op(paused, CommandAction.APPROVE, wave=3).after
    assert approved_while_paused.state is S.PAUSED
    resumed = op(approved_while_paused, CommandAction.RESUME).after
    assert (resumed.state, resumed.wave) == (S.SOAKING, 3)
    back = op(op(waiting, CommandAction.PAUSE).after, CommandAction.RESUME).after
    assert back.state is S.WAITING_APPROVAL and "--wave 3" in back.reason


def test_promote_starts_the_next_wave_now_and_only_that_one():
    r = started()
    assert op(r, CommandAction.PROMOTE, wave=3).outcome is Outcome.NOOP
    t = op(r, CommandAction.PROMOTE, wave=2)
    assert (t.after.state, t.after.wave) == (S.SOAKING, 2)
    held = passed(t.after)
    assert held.state is S.WAITING_APPROVAL
    promoted = op(held, CommandAction.PROMOTE, wave=3).after
    assert (promoted.state, promoted.wave) == (S.SOAKING, 3) and 3 in promoted.approved_waves
    assert op(new_rollout(PLAN), CommandAction.PROMOTE, wave=1).outcome is Outcome.NOOP


def test_abort_expiry_and_a_peer_site_roll_back_and_are_final():
    r = passed(started())
    aborted = op(r, CommandAction.ABORT, reason="outputs look wrong on site b")
    assert aborted.after.state is S.ABORTED and "outputs look wrong" in aborted.after.reason
    assert aborted.audit[0].payload["key_id"] == OPERATOR.key_id
    assert op(aborted.after, CommandAction.RESUME).outcome is Outcome.NOOP
    expired = step(r, GateResult(PLAN.expires_at, verdict(r, GateOutcome.PASS)))
    assert expired.after.state is S.ABORTED and "plan expired" in expired.after.reason
    peer = step(r, PeerAborted(r.updated_at + 1, "site-b", "gate failed: 20% errors"))
    assert peer.after.state is S.ABORTED and "site site-b aborted it" in peer.after.reason
    completed = passed(op(passed(passed(started())), CommandAction.APPROVE, wave=3).after)
    assert step(completed, Expire(PLAN.expires_at + 1)).outcome is Outcome.NOOP  # completed stays completed


def test_commands_are_accepted_once_even_those_that_changed_nothing():
    r = started()
    resume = command(PLAN, CommandAction.RESUME, now=r.updated_at + 1)
    noop = step(r, OperatorInput(r.updated_at + 1, resume))  # nothing to resume yet...
    assert noop.outcome is Outcome.NOOP
    paused = op(noop.after, CommandAction.PAUSE).after
    replay = step(paused, OperatorInput(paused.updated_at + 1, resume))  # ...so it cannot resume later:
    assert replay.outcome is Outcome.NOOP and replay.after == paused  # sent again: what it did the first time
    assert "was already accepted in this site and changed nothing then" in replay.message, replay.message
    assert [(e.kind, e.payload["first_outcome"]) for e in replay.audit] == [
        ("rollout_command_repeated", "noop")
    ]
    pause = command(PLAN, CommandAction.PAUSE, now=paused.updated_at)
    first = step(paused, OperatorInput(paused.updated_at + 1, pause))  # (already paused: changes nothing)
    assert first.outcome is Outcome.NOOP
    resumed = op(first.after, CommandAction.RESUME).after
    sent = command(PLAN, CommandAction.PAUSE, now=resumed.updated_at + 1)
    applied = step(resumed, OperatorInput(resumed.updated_at + 1, sent))
    assert applied.outcome is Outcome.APPLIED and applied.after.state is S.PAUSED
    again = step(applied.after, OperatorInput(resumed.updated_at + 2, sent))
    assert again.outcome is Outcome.NOOP and again.after == applied.after
    assert "was already applied in this site; sending it again changes nothing" in again.message
    assert again.audit[0].payload["first_outcome"] == "applied"
    # Another command under a used nonce is refused and audited: only a retry of the same bytes is a no-op.
    reused = command(PLAN, CommandAction.RESUME, now=r.updated_at + 2, nonce=resume.nonce)
    refused = step(paused, OperatorInput(paused.updated_at + 1, reused))
    assert refused.outcome is Outcome.REFUSED and refused.audit[0].payload["reason"] == "replayed"
    assert refused.after.state is S.PAUSED


def test_under_rules_2_a_command_sent_again_is_refused_as_it_was():
    # A journal written before rules 3 replays as it was applied: the second copy was a refusal.
    abort = command(PLAN, CommandAction.ABORT, now=STARTED_AT + 1)
    first = step(started(), OperatorInput(STARTED_AT + 1, abort), rules=2)
    assert first.after.state is S.ABORTED and first.after.applied_commands == ()
    again = step(first.after, OperatorInput(STARTED_AT + 2, abort), rules=2)
    assert again.outcome is Outcome.REFUSED and again.audit[0].payload["reason"] == "replayed"
    assert "applied_commands" not in json.dumps(first.after.to_dict())
    # Applied under rules 2 and sent again after the upgrade: nothing says it was this command, so it is
    # refused as before.
    again3 = step(first.after, OperatorInput(STARTED_AT + 3, abort), rules=3)
    assert again3.outcome is Outcome.REFUSED and again3.audit[0].payload["reason"] == "replayed"


@pytest.mark.parametrize(
    ("key", "reason"),
    [(PUBLISHER, "not_operator_key"), (NODE, "not_operator_key"), (ROGUE_OPERATOR, "unknown_key")],
)
def test_commands_signed_by_other_keys_are_refused_and_audited(key, reason):
    t = op(started(), CommandAction.ABORT, key=key)
    assert t.outcome is Outcome.REFUSED and t.after.state is S.SOAKING
    assert t.audit[0].payload == {**t.audit[0].payload, "reason": reason, "key_id": key.key_id}


def test_an_expired_command_is_refused():
    r = started()
    stale = command(PLAN, CommandAction.ABORT, now=r.updated_at - 4000, ttl_s=3600)
    t = step(r, OperatorInput(r.updated_at + 1, stale))
    assert t.outcome is Outcome.REFUSED and t.audit[0].payload["reason"] == "expired"


# --- leader proposals --------------------------------------------------------------------------------


def test_the_leader_proposes_only_what_changes_the_state():
    pending = new_rollout(PLAN)
    assert proposals(PLAN, pending, None, STARTED_AT) == ()
    (start,) = proposals(PLAN, pending, None, STARTED_AT, eligible=reversed(NODES))
    assert start == Start(STARTED_AT, tuple(NODES))
    r = started()
    assert proposals(PLAN, r, None, r.updated_at) == ()
    assert proposals(PLAN, r, verdict(r, GateOutcome.INCONCLUSIVE), r.updated_at) == ()
    v = verdict(r, GateOutcome.PASS)
    assert proposals(PLAN, r, v, v.evaluated_at) == (GateResult(v.evaluated_at, v),)
    waiting = passed(passed(r))
    assert proposals(PLAN, waiting, verdict(waiting, GateOutcome.PASS), T0 + 500) == ()
    fail = verdict(waiting, GateOutcome.FAIL)
    assert proposals(PLAN, waiting, fail, T0 + 500) == (GateResult(T0 + 500, fail),)
    assert proposals(PLAN, waiting, None, PLAN.expires_at) == (Expire(PLAN.expires_at),)


# --- what devices serve ------------------------------------------------------------------------------


def facts(node_id: str, **kw):
    return device(node_id, **kw)


def test_devices_serve_the_target_in_the_current_wave_and_the_baseline_outside_it():
    r = started()
    canary = next(n for n in NODES if r.in_cohort(n))
    others = [n for n in NODES if n != canary]
    d = desired_version(PLAN, r, facts(canary))
    assert d.version == "2.0" and d.prefetch is Prefetch.NOW and "in wave 1 (1%)" in d.reason
    assert set(d.pinned) == {"1.0", "2.0"}
    outside = desired_version(PLAN, r, facts(others[0]))
    assert (
        outside.version == "1.0" and outside.prefetch is Prefetch.LOW and "waits for wave" in outside.reason
    )
    no_prefetch = make_plan(prefetch=PrefetchPolicy.OFF)
    quiet = desired_version(no_prefetch, started(no_prefetch), facts(others[0]))
    assert quiet.prefetch is Prefetch.NONE
    r2 = passed(r)
    assert desired_version(PLAN, r2, facts(canary)).version == "2.0"  # nested: still on the target
    on_target = [n for n in NODES if desired_version(PLAN, r2, facts(n)).version == "2.0"]
    assert len(on_target) == 10


def test_paused_keeps_what_each_device_serves_and_pending_asks_nothing():
    paused = op(started(), CommandAction.PAUSE).after
    assert desired_version(PLAN, paused, facts("node-001"), serving="2.0").version == "2.0"
    assert desired_version(PLAN, paused, facts("node-001"), serving="1.0").version == "1.0"
    assert desired_version(PLAN, paused, facts("node-001"), serving="0.9").version is None
    pending = desired_version(PLAN, new_rollout(PLAN), facts("node-001"))
    assert pending.version is None and "not started" in pending.reason


def test_after_an_abort_every_device_goes_back_to_the_baseline_and_unpins_the_target():
    r = op(passed(started()), CommandAction.ABORT, reason="bad").after
    for n in NODES:
        d = desired_version(PLAN, r, facts(n), serving="2.0")
        assert d.version == "1.0" and d.pinned == ("1.0",) and d.prefetch is Prefetch.NONE


def test_a_device_back_from_offline_converges_on_what_the_rollout_says_now():
    # Offline since before the start: it missed every wave. Whatever wave it would have been in...
    r = started()
    canary = next(n for n in NODES if r.in_cohort(n))
    aborted = step(
        r, GateResult(r.soak_started_at + 30, verdict(r, GateOutcome.FAIL, at=r.soak_started_at + 30))
    )
    # ...after an abort it never activates the target,
    assert desired_version(PLAN, aborted.after, facts(canary), serving="1.0").version == "1.0"
    # after completion it takes the target,
    done = passed(op(passed(passed(r)), CommandAction.APPROVE, wave=3).after)
    assert all(desired_version(PLAN, done, facts(n), serving="1.0").version == "2.0" for n in NODES)
    # and an abort heard elsewhere, or an expired plan, wins over a site state it has not caught up on.
    assert desired_version(PLAN, r, facts(canary), aborted_elsewhere="operator abort").version == "1.0"
    assert desired_version(PLAN, r, facts(canary), now=PLAN.expires_at).version == "1.0"


def test_skew_skips_keep_the_baseline_and_the_unselected_are_left_alone():
    plan = make_plan(selector=Selector.of(device_class="camera"))
    r = started(plan)
    node = NODES[0]
    old = desired_version(plan, r, facts(node, runtime="2.2"), serving="1.0")
    assert old.version == "1.0" and old.skipped and old.skip.kind is SkipKind.OLD_RUNTIME
    sig = desired_version(plan, r, facts(node, signature=OTHER_SIGNATURE))
    assert sig.version == "1.0" and sig.skip.kind is SkipKind.SIGNATURE_MISMATCH
    disk = desired_version(plan, r, facts(node, free_disk_bytes=5))
    assert disk.version == "1.0" and disk.skip.kind is SkipKind.LOW_DISK and disk.prefetch is Prefetch.NONE
    lite = desired_version(plan, r, facts(node, labels={"device_class": "camera-lite"}), serving="0.7-int8")
    assert lite.version is None and lite.skip.kind is SkipKind.NOT_SELECTED  # its own variant stays


def test_new_devices_join_the_last_wave():
    done = passed(op(passed(passed(started())), CommandAction.APPROVE, wave=3).after)
    assert desired_version(PLAN, done, facts("joined-later")).version == "2.0"
    r3 = op(passed(passed(started())), CommandAction.APPROVE, wave=3).after
    assert r3.wave == 3 and desired_version(PLAN, r3, facts("joined-later")).version == "2.0"


# --- the replicated ledger ---------------------------------------------------------------------------


def ledger(**kw) -> RolloutLedger:
    return RolloutLedger(site="site-a", trusted=TRUSTED, **kw)


def test_the_ledger_runs_a_rollout_from_command_bytes_and_replicas_agree():
    log = [
        plan_command(signed(PLAN), now=T0 + 1),
        encode_input(PLAN.rollout_id, Start(STARTED_AT, tuple(NODES))),
    ]
    a, b = ledger(), ledger()
    for data in log:
        assert a.apply(data).outcome is Outcome.APPLIED
        b.apply(data)
    plan, rollout = a.get(PLAN.rollout_id)
    v = verdict(rollout, GateOutcome.PASS)
    log.append(encode_input(PLAN.rollout_id, GateResult(v.evaluated_at, v)))
    log.append(
        encode_input(
            PLAN.rollout_id,
            OperatorInput(
                v.evaluated_at + 1, command(PLAN, CommandAction.APPROVE, wave=3, now=v.evaluated_at)
            ),
        )
    )
    for data in log[2:]:
        assert a.apply(data).outcome is Outcome.APPLIED
        b.apply(data)
    assert a.state_digest() == b.state_digest()
    assert a.get(PLAN.rollout_id)[1].wave == 2 and a.get(PLAN.rollout_id)[1].approved_waves == {3}
    restored = ledger()
    restored.restore(a.snapshot())
    assert restored.state_digest() == a.state_digest() and restored.get(PLAN.rollout_id) == a.get(
        PLAN.rollout_id
    )
    assert restored.active("okay-nabu")[0] == PLAN
    assert restored.signed_plan(PLAN.rollout_id) == signed(PLAN)


def test_a_plan_signed_by_the_wrong_key_is_refused_on_every_replica_and_audited():
    for key in (OPERATOR, NODE):
        plan = make_plan(key=key)
        bad = SignedPlan(plan, key.sign(plan.signed_bytes()))
        result = ledger().apply(plan_command(bad, now=T0 + 1))
        assert result.outcome is Outcome.REFUSED and result.audit[0].kind == "rollout_refused"
        assert result.audit[0].payload["key_id"] == key.key_id
        assert result.audit[0].payload["reason"] == "not_publisher_key"


def test_one_rollout_per_model_and_no_unknown_rollouts():
    site = ledger()
    assert site.apply(plan_command(signed(PLAN), now=T0 + 1)).outcome is Outcome.APPLIED
    assert site.apply(plan_command(signed(PLAN), now=T0 + 2)).outcome is Outcome.NOOP
    second = make_plan("okay-nabu-3", target="3.0")
    busy = site.apply(plan_command(signed(second), now=T0 + 3))
    assert busy.outcome is Outcome.REFUSED and "at most one rollout of okay-nabu" in busy.message
    unknown = site.apply(encode_input("nobody", Start(T0 + 4, ("n1",))))
    assert unknown.outcome is Outcome.REFUSED and "no plan for rollout nobody" in unknown.message
    expired = site.apply(
        plan_command(signed(make_plan("old", model="other", created_at=T0 - 10, ttl_s=5)), now=T0 + 5)
    )
    assert expired.outcome is Outcome.REFUSED and "expired" in expired.message


def test_the_ledger_expires_unfinished_rollouts_and_forgets_finished_ones_later():
    site = ledger()
    site.apply(plan_command(signed(PLAN), now=T0 + 1))
    site.apply(encode_input(PLAN.rollout_id, Start(STARTED_AT, tuple(NODES))))
    result = site.apply(encode_input(PLAN.rollout_id, Expire(PLAN.expires_at)))
    assert result.outcome is Outcome.APPLIED and site.get(PLAN.rollout_id)[1].state is S.ABORTED
    site.apply(encode_input(PLAN.rollout_id, Expire(PLAN.expires_at + 23 * 3600)))
    assert site.get(PLAN.rollout_id) is not None  # kept while offline devices may still hold the plan
    forgot = site.apply(encode_input(PLAN.rollout_id, Expire(PLAN.expires_at + 25 * 3600)))
    assert site.get(PLAN.rollout_id) is None
    assert forgot.outcome is Outcome.APPLIED and [e.kind for e in forgot.audit] == ["rollout_forgotten"]
    assert (forgot.audit[0].payload["remembered"], forgot.audit[0].payload["state"]) == ("aborted", "aborted")
    # Forgotten, not forgiven: the aborted target is remembered, in the snapshot too.
    (tomb,) = site.tombstones()
    assert (tomb.rollout_id, tomb.target_version, tomb.baseline_version) == (PLAN.rollout_id, "2.0", "1.0")
    assert tomb.aborted and "expired" in tomb.reason
    copy = ledger()
    copy.restore(site.snapshot())
    assert copy.tombstones() == (tomb,) and copy.state_digest() == site.state_digest()
    # A ledger that never forgot an abort writes the bytes it always did.
    assert b"tombstones" not in ledger().snapshot()


def test_tombstones_are_bounded_and_the_oldest_go_first():
    site = ledger()
    for i in range(MAX_TOMBSTONES + 3):
        # One after the other: each is forgotten before the next is published (the ledger's clock moves on).
        created = T0 + i * 100_000
        plan = make_plan(f"okay-nabu-{i}", target=f"2.{i}", created_at=created, ttl_s=3600)
        assert site.apply(plan_command(signed(plan), now=created)).outcome is Outcome.APPLIED
        site.apply(encode_input(plan.rollout_id, Expire(plan.expires_at)))  # aborted: it expired
        site.apply(encode_input(plan.rollout_id, Expire(plan.expires_at + 25 * 3600)))  # forgotten
    kept = site.tombstones()
    assert len(kept) == MAX_TOMBSTONES and kept[0].rollout_id == "okay-nabu-3"  # the oldest went first


def test_completed_words_make_room_before_any_abort_is_forgotten():
    site = ledger()
    created = T0
    for i in range(MAX_TOMBSTONES + 1):
        plan = make_plan(f"okay-nabu-{i}", target=f"2.{i}", created_at=created, ttl_s=3600)
        site.apply(plan_command(signed(plan), now=created))
        if i:  # the first is aborted (it expires); every later one completes
            site._rollouts[plan.rollout_id] = dataclasses.replace(
                site.get(plan.rollout_id)[1], state=S.COMPLETED, updated_at=created + 10
            )
        site.apply(encode_input(plan.rollout_id, Expire(plan.expires_at + 25 * 3600)))
        created += 100_000
    kept = site.tombstones()
    assert len(kept) == MAX_TOMBSTONES and [t.rollout_id for t in kept if t.aborted] == ["okay-nabu-0"]


def test_the_newest_word_on_a_version_wins_and_a_completed_rollout_lifts_an_abort():
    site = ledger()
    first = make_plan("okay-nabu-a", created_at=T0, ttl_s=3600)
    site.apply(plan_command(signed(first), now=T0))
    site.apply(encode_input(first.rollout_id, Expire(first.expires_at)))  # aborted
    again = make_plan("okay-nabu-b", created_at=first.expires_at + 10, ttl_s=3600)  # the same 1.0 -> 2.0
    site.apply(plan_command(signed(again), now=again.created_at))
    site.apply(encode_input(first.rollout_id, Expire(first.expires_at + 25 * 3600)))  # the abort forgotten
    (tomb,) = site.tombstones()
    assert tomb.aborted and tomb.rollout_id == "okay-nabu-a"
    # The second one completes (its state is set here; the table's path to it is tested above), then is
    # forgotten too: its word on 2.0 is newer and lifts the abort.
    site._rollouts[again.rollout_id] = dataclasses.replace(
        site.get(again.rollout_id)[1], state=S.COMPLETED, updated_at=again.created_at + 100
    )
    site.apply(encode_input(again.rollout_id, Expire(again.expires_at + 25 * 3600)))
    (tomb,) = site.tombstones()
    assert not tomb.aborted and tomb.rollout_id == "okay-nabu-b"


def test_an_older_abort_forgotten_after_a_newer_completion_does_not_bring_the_block_back():
    site = ledger()
    slow = make_plan("okay-nabu-a", created_at=T0, ttl_s=30 * 24 * 3600)  # aborted early, lives long
    site.apply(plan_command(signed(slow), now=T0))
    site.apply(
        encode_input(slow.rollout_id, OperatorInput(T0 + 5, command(slow, CommandAction.ABORT, now=T0 + 5)))
    )
    quick = make_plan("okay-nabu-b", created_at=T0 + 10, ttl_s=3600)  # 1.0 -> 2.0 again; completes
    site.apply(plan_command(signed(quick), now=T0 + 10))
    site._rollouts[quick.rollout_id] = dataclasses.replace(
        site.get(quick.rollout_id)[1], state=S.COMPLETED, updated_at=T0 + 100
    )
    site.apply(encode_input(quick.rollout_id, Expire(quick.expires_at + 25 * 3600)))  # completion forgotten
    site.apply(encode_input(slow.rollout_id, Expire(slow.expires_at + 25 * 3600)))  # then the abort
    (tomb,) = site.tombstones()
    assert not tomb.aborted and tomb.rollout_id == "okay-nabu-b"


def test_a_stale_stamp_never_rewinds_the_ledger_clock():
    site = ledger()
    site.apply(plan_command(signed(PLAN), now=T0 + 1000))
    site.apply(encode_input(PLAN.rollout_id, Start(T0 + 5, tuple(NODES))))
    assert site.get(PLAN.rollout_id)[1].soak_started_at == T0 + 1000


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), json_values().map(lambda d: json.dumps(d).encode())))
def test_apply_never_raises_on_garbage(data):
    site = ledger()
    site.apply(plan_command(signed(PLAN), now=T0 + 1))
    before = site.state_digest()
    result = site.apply(data)
    assert result.outcome is Outcome.REFUSED and site.state_digest() == before


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_field_of_a_valid_command_replaced_is_refused_or_decodes(data):
    r = started()
    raw = [
        plan_command(signed(PLAN), now=T0),
        encode_input(PLAN.rollout_id, Start(T0, ("a", "b"))),
        encode_input(PLAN.rollout_id, GateResult(T0 + 100, verdict(r, GateOutcome.PASS))),
        encode_input(PLAN.rollout_id, OperatorInput(T0, command(PLAN, CommandAction.PAUSE))),
        encode_input(PLAN.rollout_id, PeerAborted(T0, "site-b", "bad")),
    ]
    doc = json.loads(data.draw(st.sampled_from(raw)))
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(json_values(max_leaves=5))
    site = ledger()
    site.apply(plan_command(signed(PLAN), now=T0))
    site.apply(json.dumps(doc).encode())  # never raises
    try:
        decode_command(json.dumps(doc).encode())
    except Exception as exc:  # noqa: BLE001 - the point: only the typed error
        assert type(exc).__name__ == "RolloutStateError"


# --- the guard's promise under any sequence of inputs ------------------------------------------------


inputs = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "pass",
                "pass",
                "pass",
                "fail",
                "stall",
                "inconclusive",
                "approve",
                "promote",
                "pause",
                "resume",
                "abort",
                "peer",
                "expire",
                "start",
                "start",
            ]
        ),
        st.integers(1, 3),
        st.integers(0, 200),
    ),
    max_size=25,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
def test_no_sequence_of_inputs_starts_an_above_scope_wave_without_an_operator(sequence):
    """Every replica applies the same random log; whatever it holds, wave 3 (100%) is never entered
    without an operator's approval or promotion of it, and a finished rollout stays finished."""
    a, b = ledger(), ledger()
    a.apply(plan_command(signed(PLAN), now=T0))
    b.apply(plan_command(signed(PLAN), now=T0))
    now = T0
    for kind, wave, dt in sequence:
        now += dt
        _, r = a.get(PLAN.rollout_id)
        soak = r.soak_started_at or now
        if kind in ("pass", "fail", "stall", "inconclusive"):
            outcome = {
                "pass": GateOutcome.PASS,
                "fail": GateOutcome.FAIL,
                "stall": GateOutcome.INCONCLUSIVE,
                "inconclusive": GateOutcome.INCONCLUSIVE,
            }[kind]
            # Verdicts mostly of the current wave (those are the ones that move it), sometimes of any.
            gate_wave = wave if kind == "fail" or dt % 7 == 0 else max(r.wave, 1)
            v = GateVerdict(
                PLAN.rollout_id,
                gate_wave,
                outcome,
                kind,
                now,
                soak,
                measured=Totals(500, 5, 2),
                soaked=Totals(500, 5, 2),
                deadline_passed=kind == "stall",
            )
            event_input = GateResult(now, v)
        elif kind in ("approve", "promote"):
            event_input = OperatorInput(now, command(PLAN, CommandAction(kind), wave=wave, now=now))
        elif kind in ("pause", "resume", "abort"):
            event_input = OperatorInput(now, command(PLAN, CommandAction(kind), now=now))
        elif kind == "peer":
            event_input = PeerAborted(now, "site-b", "failed")
        elif kind == "expire":
            event_input = Expire(now)
        else:
            event_input = Start(now, tuple(NODES))
        data = encode_input(PLAN.rollout_id, event_input)
        result = a.apply(data)
        b.apply(data)
        _, after = a.get(PLAN.rollout_id)
        for t in result.transitions:
            entered = t.after.wave > t.before.wave and t.after.state is S.SOAKING
            if entered and wave_needs_approval(PLAN, t.after, t.after.wave):
                assert t.after.wave in t.after.approved_waves, (t.before, t.after, t.event)
            if t.before.state.final:
                assert t.after.state is t.before.state
        assert after.wave <= PLAN.wave_count
    assert a.state_digest() == b.state_digest()


def test_a_cohort_device_is_in_every_later_wave_of_the_state():
    r = started()
    for n in NODES:
        score = cohort_score(PLAN.rollout_id, n)
        memberships = [in_wave(score, r.threshold(k)) for k in (1, 2, 3)]
        assert memberships == sorted(memberships)  # False... then True...: nested


def test_the_gate_feeds_the_state_machine_end_to_end():
    r = started()
    cohort = r.cohort(NODES)
    reports = [report(n, (150, 1), active_s=61) for n in cohort]
    reports += [report(n, baseline=(150, 0)) for n in NODES if n not in cohort]
    v = evaluate_gate(
        PLAN,
        1,
        cohort=cohort,
        reports=reports,
        marks=r.marks_map(),
        soak_started_at=r.soak_started_at,
        now=r.soak_started_at + 61,
    )
    assert v.outcome is GateOutcome.PASS
    (proposal,) = proposals(PLAN, r, v, v.evaluated_at)
    after = step(r, proposal).after
    assert after.wave == 2 and after.marks_map()[NODES[0]].baseline is not None
