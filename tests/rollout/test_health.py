"""Gossiped health counters (bounded binary codec) and the wave gate's verdicts, at their boundaries."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.inference.health import ErrorKind, HealthCounters
from mesh.rollout.health import (
    ERROR_KINDS,
    LATENCY_BUCKET_COUNT,
    MAX_HEALTH_BYTES,
    MAX_HEALTH_ENTRIES,
    DeviceMarks,
    DeviceReport,
    FoldedEvidence,
    GateOutcome,
    GateVerdict,
    HealthFormatError,
    Mark,
    NodeHealth,
    RolloutSkip,
    SiteEvidence,
    Totals,
    VersionCounters,
    decode_node_health,
    encode_node_health,
    evaluate_gate,
    fold_evidence,
)
from mesh.rollout.plan import SkipKind
from mesh.rollout.state import GateResult, decode_command, encode_input
from tests.rollout.builders import T0, counters, make_plan, report, waves
from tests.strategies import json_values

PLAN = make_plan(plan_waves=waves(10_000, 100_000, 1_000_000, soak_s=60, min_requests=100))
START = T0 + 1000
AFTER_SOAK = START + 61


def gate(
    reports,
    *,
    cohort=None,
    now=AFTER_SOAK,
    marks=None,
    wave=1,
    plan=PLAN,
    remote=(),
    site="a",
    earlier=(),
):
    reports = list(reports)
    cohort = {r.node_id for r in reports if r.target is not None} if cohort is None else cohort
    return evaluate_gate(
        plan,
        wave,
        cohort=cohort,
        reports=reports,
        marks=marks or {},
        soak_started_at=START,
        now=now,
        remote=remote,
        site=site,
        earlier=earlier,
    )


# --- counters and their codec ------------------------------------------------------------------------


def test_counters_from_the_inference_runtime_keep_every_count():
    runtime = HealthCounters()
    for latency_s, error in [
        (0.0004, None),
        (0.003, ErrorKind.NON_FINITE),
        (0.2, ErrorKind.EXCEPTION),
        (9.0, ErrorKind.DEADLINE_EXCEEDED),
    ]:
        runtime.record("okay-nabu", "2.0", latency_s, error)
    (h,) = runtime.snapshot()
    c = VersionCounters.from_health(h, epoch=3, active_s=12.5, activation_failures=1)
    assert (c.requests, c.serving_errors, c.activation_failures, c.active_ms, c.epoch) == (4, 3, 1, 12_500, 3)
    assert c.errors_by_kind() == {
        "exception": 1,
        "non_finite": 1,
        "deadline_exceeded": 1,
        "activation_failed": 1,
    }
    assert sum(c.latency_buckets) == 4 and c.latency_quantile_s(0.5) == 0.005
    assert c.latency_quantile_s(1.0) == float("inf")
    assert decode_node_health(encode_node_health(NodeHealth((c,)))).versions == (c,)


def test_a_typical_node_health_is_small():
    health = NodeHealth(
        (counters(123_456, 789), counters(98_765, 4, version="1.0")),
        (RolloutSkip("other-rollout", SkipKind.LOW_DISK),),
    )
    blob = encode_node_health(health)
    assert len(blob) < 120  # two versions and a skip; the metadata budget is 2 KiB
    assert decode_node_health(blob) == health


def test_windows_survive_a_restart_of_the_node():
    before = counters(1000, 10, active_s=100)
    assert before.since(before.mark()).requests == 0
    later = counters(1500, 40, active_s=160)
    window = later.since(before.mark())
    assert (window.requests, window.errors, window.active_ms) == (500, 30, 60_000)
    # After a restart the counters start again from zero in a new epoch: the window is what came since.
    restarted = counters(20, 1, epoch=2, active_s=5)
    assert restarted.since(before.mark()).requests == 20
    # Counters below the mark in the same epoch can only mean a restart that kept the epoch: same rule.
    assert counters(5, 0).since(before.mark()).requests == 5


versions = st.builds(
    lambda model, version, epoch, buckets, errs, act, active, lat: VersionCounters(
        model,
        version,
        epoch,
        sum(buckets),
        tuple(min(e, sum(buckets) // 3) for e in errs) + (act,),
        active,
        tuple(buckets),
        lat,
    ),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3})?", fullmatch=True),
    st.integers(0, 2**40),
    st.lists(st.integers(0, 2**30), min_size=LATENCY_BUCKET_COUNT, max_size=LATENCY_BUCKET_COUNT),
    st.lists(st.integers(0, 2**20), min_size=len(ERROR_KINDS) - 1, max_size=len(ERROR_KINDS) - 1),
    st.integers(0, 1000),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(versions, max_size=6, unique_by=lambda c: c.key),
    st.lists(
        st.builds(RolloutSkip, st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), st.sampled_from(SkipKind)),
        max_size=3,
        unique_by=lambda s: s.rollout_id,
    ),
)
def test_node_health_round_trips_canonically(entries, skips):
    health = NodeHealth(tuple(entries), tuple(skips))
    try:
        blob = encode_node_health(health)
    except HealthFormatError:
        return  # too big for the metadata: refused at the sender
    assert len(blob) <= MAX_HEALTH_BYTES
    assert decode_node_health(blob) == health


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_are_refused_with_a_health_error(blob):
    try:
        health = decode_node_health(blob)
    except HealthFormatError:
        return
    assert encode_node_health(health) == blob


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_of_a_valid_blob_is_refused_or_decodes_canonically(data):
    blob = bytearray(encode_node_health(NodeHealth((counters(500, 7), counters(90, 0, version="1.0")))))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        health = decode_node_health(bytes(blob))
    except HealthFormatError:
        return
    assert encode_node_health(health) == bytes(blob)


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (b"", "truncated"),
        (b"\x02", "codec 2 is not known"),
        (b"\x01\x00\x00\x00", "after the last field"),
        (b"\x01\x80\x00\x00", "canonical"),  # a padded varint: two spellings of 0
        (b"\x01" + bytes([MAX_HEALTH_ENTRIES + 1]), "at most"),
        (b"\x01" + b"\xff" * 10 + b"\x01", "64 bits"),
        (b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "out of range"),
        (b"\x00" * (MAX_HEALTH_BYTES + 1), "at most"),
    ],
)
def test_malformed_blobs_say_what_is_wrong(blob, fragment):
    with pytest.raises(HealthFormatError, match=fragment):
        decode_node_health(blob)


def test_inconsistent_counters_are_refused():
    good = counters(10, 2)
    with pytest.raises(HealthFormatError, match="latency buckets hold"):
        VersionCounters("m", "1", 1, 11, good.errors, 0, good.latency_buckets, 0)
    with pytest.raises(HealthFormatError, match="serving errors"):
        VersionCounters("m", "1", 1, 10, (11, 0, 0, 0), 0, good.latency_buckets, 0)
    with pytest.raises(HealthFormatError, match="listed twice"):
        NodeHealth((good, good))
    with pytest.raises(HealthFormatError, match="fit the metadata"):
        encode_node_health(NodeHealth(tuple(counters(2**60, version=f"{i}" * 60) for i in range(10))))


# --- the gate ----------------------------------------------------------------------------------------


def test_pass_needs_the_whole_soak_enough_requests_and_a_rate_within_the_limit():
    devices = [report("c1", (60, 3)), report("c2", (40, 2))]  # exactly 5%: within the limit
    verdict = gate(devices)
    assert verdict.outcome is GateOutcome.PASS, verdict.reason
    assert verdict.soaked == Totals(100, 5, 2) and "5.00% errors in 100 requests" in verdict.reason
    during = gate(devices, now=START + 30)
    assert during.outcome is GateOutcome.INCONCLUSIVE and "soaking, 30 s of 60 s left" in during.reason


def test_fail_above_the_limit_with_enough_requests_even_during_the_soak():
    verdict = gate([report("c1", (60, 4)), report("c2", (41, 2))], now=START + 10)
    assert verdict.outcome is GateOutcome.FAIL and "5.94% errors in 101 requests" in verdict.reason


def test_a_high_rate_on_too_few_requests_is_inconclusive_not_a_failure():
    verdict = gate([report("c1", (99, 50))])
    assert verdict.outcome is GateOutcome.INCONCLUSIVE
    assert "not enough data" in verdict.reason and "100 requests needed" in verdict.reason


def test_a_failed_activation_fails_the_wave_at_once():
    verdict = gate([report("c1", activation_failures=1), report("c2", (500, 0))], now=START + 1)
    assert verdict.outcome is GateOutcome.FAIL
    assert verdict.failed_activation == ("c1",) and "c1 failed to activate 2.0" in verdict.reason


def test_no_data_is_its_own_state_and_past_the_deadline_it_asks_for_an_operator():
    devices = [report("c1"), report("c2"), report("o1", baseline=(1000, 0))]
    verdict = gate(devices, cohort={"c1", "c2"})
    assert verdict.outcome is GateOutcome.INCONCLUSIVE and "no data" in verdict.reason
    assert verdict.not_serving == ("c1", "c2") and not verdict.deadline_passed
    late = gate(devices, cohort={"c1", "c2"}, now=START + 120)  # deadline: twice the 60 s soak
    assert late.outcome is GateOutcome.INCONCLUSIVE and late.deadline_passed


def test_an_install_is_not_a_success_before_the_device_served_the_whole_soak():
    # hawkbit #3185: plenty of requests, but from devices that activated 10 s ago.
    fresh = [report("c1", (500, 0), active_s=10), report("c2", (500, 0), active_s=10)]
    verdict = gate(fresh)
    assert verdict.outcome is GateOutcome.INCONCLUSIVE and verdict.soaked.requests == 0
    assert gate([report("c1", (500, 0), active_s=61)] + fresh[1:]).outcome is GateOutcome.PASS


def test_unreachable_devices_are_listed_not_counted_as_healthy_but_their_errors_count():
    good_then_gone = [report("c1", (1000, 0), reachable=False), report("c2", (50, 0))]
    verdict = gate(good_then_gone)
    assert verdict.outcome is GateOutcome.INCONCLUSIVE and verdict.unreachable == ("c1",)
    assert verdict.soaked == Totals(50, 0, 1) and "1 unreachable" in verdict.reason


def test_errors_of_an_unreachable_device_fail_the_wave():
    # c2 alone looks healthy; with what c1 reported before it went silent, the cohort is at 5.7%.
    verdict = gate([report("c1", (200, 40), reachable=False), report("c2", (500, 0))])
    assert verdict.outcome is GateOutcome.FAIL and "the cohort measured" in verdict.reason
    assert verdict.measured == Totals(700, 40, 2) and verdict.unreachable == ("c1",)


def test_a_cohort_device_never_heard_from_is_unreachable_and_skips_are_listed_apart():
    devices = [report("c1", (150, 1)), report("c3", skipped=SkipKind.OLD_RUNTIME)]
    verdict = gate(devices, cohort={"c1", "c2", "c3"})
    assert verdict.outcome is GateOutcome.PASS
    assert verdict.unreachable == ("c2",) and verdict.skipped == ("c3",) and verdict.cohort_size == 3


def test_enough_requests_from_a_few_devices_while_most_are_silent_is_not_a_pass():
    # One busy device carries the request count; four of the five are unreachable.
    devices = [report("c1", (1000, 0))] + [report(f"c{i}", (10, 0), reachable=False) for i in range(2, 6)]
    cohort = {f"c{i}" for i in range(1, 6)}
    verdict = gate(devices, cohort=cohort)
    assert verdict.outcome is GateOutcome.INCONCLUSIVE, verdict.reason
    assert (
        "too few devices heard from: 1 served the target for the whole soak while 4 cohort devices did not"
        in verdict.reason
        and "(4 unreachable)" in verdict.reason
    )
    late = gate(devices, cohort=cohort, now=START + 120)
    assert late.outcome is GateOutcome.INCONCLUSIVE and late.deadline_passed  # pauses for an operator
    # Three of five heard from over the whole soak, two silent: enough.
    devices[1:3] = [report("c2", (10, 0)), report("c3", (10, 0))]
    assert gate(devices, cohort=cohort).outcome is GateOutcome.PASS
    # Skips are not silent devices: one soaked and three skipping (one never heard of) passes.
    skips = [report(f"c{i}", skipped=SkipKind.OLD_RUNTIME) for i in range(3, 6)]
    assert gate([report("c1", (1000, 0)), *skips], cohort=cohort).outcome is GateOutcome.PASS
    # Reachable but never on the target (stuck fetching, still on the baseline): not evidence either.
    stuck = [report("c1", (1000, 0))] + [report(f"c{i}", baseline=(50, 0)) for i in range(2, 6)]
    verdict = gate(stuck, cohort=cohort)
    assert verdict.outcome is GateOutcome.INCONCLUSIVE and "4 not serving the target" in verdict.reason
    # ... nor are devices on the target for less than the soak; a device on another model takes no part.
    late = [report("c1", (1000, 0)), report("c2", (10, 0), active_s=5), report("c3", (10, 0), active_s=5)]
    assert gate(late, cohort={"c1", "c2", "c3"}).outcome is GateOutcome.INCONCLUSIVE
    other_model = [report("c1", (1000, 0)), report("c2"), report("c3")]  # no counters for this model
    assert gate(other_model, cohort={"c1", "c2", "c3"}).outcome is GateOutcome.PASS
    # Other sites' devices count on both sides: this site's only cohort device is away, two elsewhere
    # served the whole soak and one there is unreachable: 2 heard from, 2 silent.
    away = [report("c1", (0, 0), reachable=False)]
    there = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 0, 2), Totals(300, 0, 2), unreachable=1)
    assert gate(away, cohort={"c1"}, remote=[there]).outcome is GateOutcome.PASS
    quiet = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 0, 1), Totals(300, 0, 1), unreachable=3)
    assert gate(away, cohort={"c1"}, remote=[quiet]).outcome is GateOutcome.INCONCLUSIVE
    # A site announces its last passed wave beside its current one, the same devices in both: they vouch
    # once. One device of b heard from twice is still one against this site's two silent ones.
    both_away = [report("c1", (0, 0), reachable=False), report("c2", (0, 0), reachable=False)]
    passed = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 0, 1), Totals(300, 0, 1), unreachable=0)
    current = SiteEvidence("b", PLAN.rollout_id, 2, Totals(200, 0, 1), Totals(200, 0, 1), unreachable=0)
    verdict = gate(both_away, cohort={"c1", "c2"}, remote=[passed, current])
    assert verdict.outcome is GateOutcome.INCONCLUSIVE, verdict.reason
    # The later wave vouches (a tie in devices); errors count from both.
    assert verdict.soaked == Totals(200, 0, 1) and verdict.measured == Totals(500, 0, 2)
    twice = dataclasses.replace(passed, site="c")
    assert gate(both_away, cohort={"c1", "c2"}, remote=[passed, twice]).outcome is GateOutcome.PASS
    # Its silent devices count by the entry that misses the most: the passed wave's snapshot (6 heard
    # from, none silent) does not hide the 10 its current wave misses now. (Choosing one entry whole by
    # its margin of heard-from over silent let the snapshot speak over the present silence: PASS.)
    five_away = [report(f"c{i}", (0, 0), reachable=False) for i in range(5)]
    snapshot = SiteEvidence("b", PLAN.rollout_id, 1, Totals(600, 0, 6), Totals(600, 0, 6), unreachable=0)
    now_missing = SiteEvidence("b", PLAN.rollout_id, 2, Totals(50, 0, 1), Totals(50, 0, 1), unreachable=10)
    verdict = gate(five_away, cohort={f"c{i}" for i in range(5)}, remote=[snapshot, now_missing])
    assert verdict.outcome is GateOutcome.INCONCLUSIVE and "while 15 cohort devices did not" in verdict.reason


def test_windows_start_at_the_marks():
    before = {"c1": DeviceMarks(target=counters(10_000, 0, active_s=100).mark())}
    # 10,000 clean requests before the window; 100 requests with 10 errors inside it.
    verdict = gate([report("c1", (10_100, 10), active_s=200)], marks=before)
    assert verdict.outcome is GateOutcome.FAIL and verdict.measured == Totals(100, 10, 1)
    assert verdict.marks_map()["c1"].target == counters(10_100, 10, active_s=200).mark()


def test_the_devices_new_in_a_wave_are_judged_alone_too():
    # Wave 1's device c1 served 100,000 clean requests while wave 2 waited overnight for its approval;
    # the four devices new in wave 2 fail 20% of theirs. Together: 0.2%, well within the limit.
    marks = {"c1": DeviceMarks(target=counters(1_000, 0, active_s=600).mark())}
    devices = [report("c1", (101_000, 0), active_s=40_000)]
    devices += [report(f"n{i}", (250, 50), active_s=61) for i in range(4)]
    verdict = gate(devices, wave=2, marks=marks, earlier={"c1"})
    assert verdict.outcome is GateOutcome.FAIL, verdict.reason
    assert "the devices new in wave 2 measured 20.00% errors in 1000 requests" in verdict.reason
    assert verdict.measured == Totals(101_000, 200, 5)
    # Judged as one cohort (what the gate did before) the breach is hidden.
    assert gate(devices, wave=2, marks=marks).outcome is GateOutcome.PASS
    # Newcomers within the limit: the wave passes; too few of their requests: no verdict from them alone.
    healthy = [devices[0]] + [report(f"n{i}", (250, 2), active_s=61) for i in range(4)]
    assert gate(healthy, wave=2, marks=marks, earlier={"c1"}).outcome is GateOutcome.PASS
    few = [devices[0]] + [report(f"n{i}", (20, 10), active_s=61) for i in range(4)]
    assert gate(few, wave=2, marks=marks, earlier={"c1"}).outcome is GateOutcome.PASS
    # Newcomers that served most of the requests are judged alone too: 8.8% on theirs, 4.6% together.
    most = [report("c1", (1_900, 0), active_s=40_000)]
    most += [report(f"n{i}", (250, 22), active_s=61) for i in range(4)]
    verdict = gate(most, wave=2, marks=marks, earlier={"c1"})
    assert verdict.outcome is GateOutcome.FAIL and "the devices new in wave 2 measured" in verdict.reason
    # A site with no device in wave 1 judges its newcomers alone too: other sites' evidence brings the
    # requests their wave-1 devices served while wave 2 waited.
    newcomers = devices[1:]
    there = SiteEvidence("b", PLAN.rollout_id, 2, Totals(100_000, 0, 3), Totals(100_000, 0, 3))
    verdict = gate(newcomers, wave=2, remote=[there])
    assert verdict.outcome is GateOutcome.FAIL and "the devices new in wave 2 measured" in verdict.reason
    assert "errors on n0, n1, n2, n3" in verdict.reason


def test_the_relative_gate_compares_with_the_baseline_outside_the_cohort():
    plan = make_plan(plan_waves=waves(10_000, 1_000_000, soak_s=60, min_requests=100, relative_margin=0.01))
    canary = [report("c1", (1000, 30))]  # 3%: within the 5% limit
    clean_baseline = [report(f"o{i}", baseline=(1000, 5)) for i in range(3)]  # 0.5%
    verdict = gate(canary + clean_baseline, cohort={"c1"}, plan=plan)
    assert verdict.outcome is GateOutcome.FAIL and "baseline" in verdict.reason
    noisy_baseline = [report(f"o{i}", baseline=(1000, 25)) for i in range(3)]  # 2.5%
    assert gate(canary + noisy_baseline, cohort={"c1"}, plan=plan).outcome is GateOutcome.PASS
    quiet = gate(canary + [report("o1", baseline=(10, 0))], cohort={"c1"}, plan=plan)
    assert quiet.outcome is GateOutcome.PASS and "relative gate not evaluated" in quiet.reason


def test_a_site_without_cohort_devices_judges_by_other_sites_evidence():
    remote_ok = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 3, 3), Totals(300, 3, 3))
    verdict = gate([report("o1", baseline=(100, 0))], cohort=set(), remote=[remote_ok])
    assert verdict.outcome is GateOutcome.PASS and verdict.soaked == Totals(300, 3, 3)
    alone = gate([report("o1", baseline=(100, 0))], cohort=set())
    assert alone.outcome is GateOutcome.INCONCLUSIVE and "no device of this site" in alone.reason
    remote_bad = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 60, 3), Totals(0, 0, 0))
    assert gate([], cohort=set(), remote=[remote_bad], now=START + 1).outcome is GateOutcome.FAIL
    # A site's own evidence coming back through the federation is not counted twice; nor another rollout's.
    mine = SiteEvidence("a", PLAN.rollout_id, 1, Totals(300, 3, 3), Totals(300, 3, 3))
    other = SiteEvidence("b", "other-rollout", 1, Totals(300, 3, 3), Totals(300, 3, 3))
    assert gate([], cohort=set(), remote=[mine, other]).outcome is GateOutcome.INCONCLUSIVE
    # Evidence of an earlier wave may fail a later one, never pass it.
    earlier = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 3, 3), Totals(300, 3, 3))
    assert gate([], cohort=set(), remote=[earlier], wave=2).outcome is GateOutcome.INCONCLUSIVE


_EVIDENCE = st.builds(
    lambda site, rollout, wave, measured, soaked, failures, unreachable: SiteEvidence(
        site,
        rollout,
        wave,
        Totals(measured[0], min(measured[1], measured[0]), measured[2]),
        Totals(soaked[0], min(soaked[1], soaked[0]), soaked[2]),
        failures,
        unreachable,
    ),
    st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from([PLAN.rollout_id, PLAN.rollout_id, "other-rollout"]),
    st.integers(1, 3),
    st.tuples(st.integers(0, 400), st.integers(0, 40), st.integers(0, 4)),
    st.tuples(st.integers(0, 400), st.integers(0, 40), st.integers(0, 4)),
    st.integers(0, 1),
    st.integers(0, 4),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_EVIDENCE, max_size=8),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20), st.booleans()), max_size=3),
    st.integers(1, 3),
    st.integers(0, 130),
)
def test_folded_evidence_judges_exactly_as_the_entries_it_folds(remote, devices, wave, elapsed_s):
    """What a site leader in sites mode receives (other sites' evidence folded by a representative, a size
    that does not grow with the sites) gives the very verdict the entries themselves would."""
    reports = [report(f"c{i}", (r, min(e, r)), reachable=up) for i, (r, e, up) in enumerate(devices)]
    cohort = {r.node_id for r in reports}
    folded = fold_evidence(PLAN.rollout_id, remote, besides="a")
    assert FoldedEvidence.from_dict(json.loads(json.dumps(folded.to_dict()))) == folded
    # The fold as the gate's rules say it: errors from every entry; per other site, the entry of this wave
    # or later that heard the most devices vouches, and the one that misses the most says who is silent.
    mine = [e for e in remote if e.rollout_id == PLAN.rollout_id and e.site != "a"]
    assert folded.measured == sum((e.measured for e in mine), Totals())
    assert folded.activation_failures == sum(e.activation_failures for e in mine)
    vouching = {}
    for e in mine:
        if e.wave >= wave and (e.site not in vouching or (e.soaked.devices, e.wave) > vouching[e.site][0]):
            vouching[e.site] = ((e.soaked.devices, e.wave), e.soaked)
    silent = {
        e.site: max(x.unreachable for x in mine if x.site == e.site and x.wave >= wave)
        for e in mine
        if e.wave >= wave
    }
    assert folded.at(wave) == (sum((t for _, t in vouching.values()), Totals()), sum(silent.values()))
    by_list = gate(reports, cohort=cohort, remote=remote, wave=wave, now=START + elapsed_s)
    by_fold = gate(reports, cohort=cohort, remote=folded, wave=wave, now=START + elapsed_s)
    assert by_fold == by_list
    # Folded for another rollout, it says nothing about this one.
    elsewhere = fold_evidence("other-rollout", remote, besides="a")
    alone = gate(reports, cohort=cohort, wave=wave, now=START + elapsed_s)
    assert gate(reports, cohort=cohort, remote=elsewhere, wave=wave, now=START + elapsed_s) == alone


def test_folded_evidence_is_bounded_by_the_waves_not_the_sites():
    many = [
        SiteEvidence(f"site-{k:05d}", PLAN.rollout_id, 1 + k % 3, Totals(100, 1, 2), Totals(100, 1, 2), 0, 1)
        for k in range(10_000)
    ]
    folded = fold_evidence(PLAN.rollout_id, many, besides="a")
    assert len(json.dumps(folded.to_dict())) < 400
    assert folded.measured == Totals(1_000_000, 10_000, 20_000)
    assert folded.at(1) == (Totals(1_000_000, 10_000, 20_000), 10_000)
    assert folded.at(3)[1] == 3333 and folded.at(4) == (Totals(), 0)
    assert fold_evidence(PLAN.rollout_id, []).empty and not folded.empty


def test_absurd_figures_from_peers_fail_the_wave_and_do_not_break_the_fold():
    """Each entry may say up to MAX_COUNT; sums past it saturate, so two of them still fail the wave (as
    before the fold existed) instead of making the gate raise on every step."""
    big = 2**62
    huge = [
        SiteEvidence("b", PLAN.rollout_id, 1, Totals(big, big, big), Totals(big, 0, big), big, big),
        SiteEvidence("c", PLAN.rollout_id, 1, Totals(big, big, big), Totals(big, 0, big), big, big),
    ]
    folded = fold_evidence(PLAN.rollout_id, huge)
    assert folded.activation_failures == big and folded.at(1)[1] == big
    assert FoldedEvidence.from_dict(json.loads(json.dumps(folded.to_dict()))) == folded
    assert gate([], cohort=set(), remote=huge).outcome is GateOutcome.FAIL
    # Without failures, absurd request counts beside this site's own: the verdict (a pass here) is one the
    # site's ledger can still record, on every replica.
    loud = [SiteEvidence("b", PLAN.rollout_id, 1, Totals(big, 0, 5), Totals(big, 0, 5))]
    verdict = gate([report("c1", (1000, 0))], remote=loud)
    assert verdict.outcome is GateOutcome.PASS and verdict.measured.requests == big
    decoded = decode_command(encode_input(PLAN.rollout_id, GateResult(verdict.evaluated_at, verdict)))
    assert decoded.event_input.verdict == verdict


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"rollout_id": "x", "measured": [0, 0, 0], "activation_failures": 0}, "vouch"),
        (
            {"rollout_id": "okay-nabu-2", "measured": [1, 2, 0], "activation_failures": 0, "vouch": []},
            "errors",
        ),
        (
            {
                "rollout_id": "okay-nabu-2",
                "measured": [0, 0, 0],
                "activation_failures": 0,
                "vouch": [[[0, 0, 0]]],
            },
            "soaked, silent",
        ),
        (
            {
                "rollout_id": "okay-nabu-2",
                "measured": [0, 0, 0],
                "activation_failures": 0,
                "vouch": [[[0, 0, 0], 0]] * 11,
            },
            "at most 10",
        ),
        (
            {"rollout_id": "okay-nabu-2", "measured": [0, 0, 0], "activation_failures": -1, "vouch": []},
            "activation",
        ),
    ],
)
def test_folded_evidence_parses_strictly(doc, fragment):
    with pytest.raises(HealthFormatError, match=fragment):
        FoldedEvidence.from_dict(doc)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 300), st.integers(0, 300), st.booleans(), st.integers(0, 120), st.integers(0, 1)
        ),
        max_size=8,
    ),
    st.integers(0, 200),
)
def test_the_gate_never_passes_on_too_little_and_never_misses_a_breach(devices, elapsed_s):
    reports = []
    for i, (requests, errors, reachable, active_s, failed) in enumerate(devices):
        errors = min(errors, requests)
        reports.append(
            report(
                f"c{i}",
                (requests, errors),
                reachable=reachable,
                active_s=active_s,
                activation_failures=failed,
            )
        )
    verdict = gate(reports, cohort={r.node_id for r in reports}, now=START + elapsed_s)
    soaked = [r.target for r in reports if r.reachable and r.target.active_ms >= 60_000 and r.target.requests]
    soaked_requests = sum(c.requests for c in soaked)
    all_requests = sum(r.target.requests for r in reports)
    all_errors = sum(r.target.serving_errors for r in reports)
    if verdict.outcome is GateOutcome.PASS:
        assert elapsed_s >= 60 and soaked_requests >= 100
        assert 2 * len(soaked) >= len(reports)  # every device here runs the model: half or more soaked
        assert sum(c.serving_errors for c in soaked) * 20 <= soaked_requests
        assert not any(r.target.activation_failures for r in reports)
    if any(r.target.activation_failures for r in reports) or (
        all_requests >= 100 and all_errors * 20 > all_requests
    ):
        assert verdict.outcome is GateOutcome.FAIL
    if verdict.outcome is GateOutcome.INCONCLUSIVE:
        assert verdict.deadline_passed == (elapsed_s >= 120)


def test_a_verdict_round_trips_through_its_document():
    before = {"c1": DeviceMarks(counters(10, 0).mark(), counters(5, 0, version="1.0").mark())}
    verdict = gate(
        [report("c1", (150, 1), baseline=(20, 0)), report("c2", reachable=False)],
        cohort={"c1", "c2"},
        marks=before,
    )
    again = GateVerdict.from_dict(json.loads(json.dumps(verdict.to_dict())))
    assert again == verdict
    evidence = verdict.evidence("a")
    assert SiteEvidence.from_dict(json.loads(json.dumps(evidence.to_dict()))) == evidence


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values())
def test_any_json_is_refused_as_a_verdict_or_evidence(doc):
    with pytest.raises(HealthFormatError):
        GateVerdict.from_dict(doc)
    with pytest.raises(HealthFormatError):
        SiteEvidence.from_dict(doc)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_verdict_field_replaced_is_refused_or_parses(data):
    doc = gate([report("c1", (150, 1))]).to_dict()
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(json_values(max_leaves=5))
    with contextlib.suppress(HealthFormatError):  # refused with the typed error, or parsed: never a crash
        GateVerdict.from_dict(doc)


def test_marks_parse_strictly():
    assert Mark.from_list([1, 2, 3, 4, 5], "m") == Mark(1, 2, 3, 4, 5)
    for bad in ([1, 2, 3, 4], [1, 2, 3, 4, -5], [1, 2, 3, 4, True], "12345"):
        with pytest.raises(HealthFormatError):
            Mark.from_list(bad, "m")
    assert DeviceReport.from_health("n1", True, None, PLAN) == DeviceReport("n1", True)


def test_entries_out_of_order_are_a_second_spelling_and_refused():
    first, second = counters(10, version="1.0"), counters(20, version="2.0")
    body = [encode_node_health(NodeHealth((c,)))[2:-1] for c in (first, second)]
    in_order = b"\x01\x02" + body[0] + body[1] + b"\x00"
    assert decode_node_health(in_order) == NodeHealth((first, second))
    with pytest.raises(HealthFormatError, match="out of order"):
        decode_node_health(b"\x01\x02" + body[1] + body[0] + b"\x00")


def test_a_site_tells_others_only_what_its_own_devices_measured():
    # Relaying what it heard would count site b again at every hop (the fleet simulation found this).
    heard = SiteEvidence("b", PLAN.rollout_id, 1, Totals(300, 3, 3), Totals(300, 3, 3))
    verdict = gate([report("c1", (150, 1))], remote=[heard])
    assert verdict.soaked == Totals(450, 4, 4)
    told = verdict.evidence("a")
    assert (told.measured, told.soaked) == (Totals(150, 1, 1), Totals(150, 1, 1))
