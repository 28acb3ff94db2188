"""Every chaos checker passes a healthy run and fails a run doctored to break its invariant,
naming what broke and where. No root, no network: the records are built here."""

from __future__ import annotations

import copy
import json

import pytest

from chaos import checkers
from chaos.checkers import FAIL, PASS, SKIP
from chaos.history import (
    ACKNOWLEDGED,
    REFUSED,
    UNKNOWN,
    FaultEvent,
    NodeFinal,
    Op,
    RunRecord,
    RunSpec,
    Sample,
    read_outcome,
    write_outcome,
)
from mesh.rollout.cohort import MAX_SCORE, cohort_score

NODES = ("n01", "n02", "n03")
ROLLOUT = "wake-2-chaos"
OPERATOR_KEY = "0perat0rkey00001"
GUARD = {"move_streams": {"max_nodes": 2, "max_fraction": 1.0, "max_streams": 1}}


def _audit(decisions: list[dict]) -> list[dict]:
    """An audit log as a replica writes it: initial routes, then each decision's records."""
    records = [
        {
            "seq": 1,
            "kind": "routes_assigned",
            "payload": {"routes": {"s1": "n01", "s2": "n02", "s3": "n03"}, "raft_index": 2, "raft_event": 0},
        }
    ]
    for d in decisions:
        for kind, extra in d["records"]:
            records.append(
                {
                    "seq": len(records) + 1,
                    "kind": kind,
                    "payload": {
                        "decision_id": d["id"],
                        "raft_index": d["index"] + (kind in ("applied", "approved")),
                        "raft_event": 0,
                        **extra,
                    },
                }
            )
    return records


def _decisions() -> list[dict]:
    one_stream = [{"stream": "s1", "from": "n01", "to": "n02"}]
    two_streams = [{"stream": "s2", "from": "n02", "to": "n03"}, {"stream": "s3", "from": "n03", "to": "n01"}]
    return [
        {
            "id": "d1",
            "index": 10,
            "moves": one_stream,
            "records": [
                (
                    "proposed",
                    {
                        "kind": "move_streams",
                        "scope": {"nodes_affected": 2, "fraction_of_group": 0.67, "streams_moved": 1},
                    },
                ),
                ("applied", {"kind": "move_streams", "moves": one_stream, "approved_by": None}),
            ],
        },
        {
            "id": "d2",
            "index": 20,
            "moves": two_streams,
            "records": [
                (
                    "proposed",
                    {
                        "kind": "move_streams",
                        "scope": {"nodes_affected": 3, "fraction_of_group": 1.0, "streams_moved": 2},
                    },
                ),
                ("held", {"exceeded": ["moves 2 streams, policy allows 1"]}),
                ("approved", {"key_id": OPERATOR_KEY}),
                ("applied", {"kind": "move_streams", "moves": two_streams, "approved_by": OPERATOR_KEY}),
            ],
        },
    ]


FINAL_ROUTES = {"s1": "n02", "s2": "n03", "s3": "n01"}


def _score(node: str) -> int:
    return cohort_score(ROLLOUT, node)


def _rollout_doc(node: str, state: str, wave: int, thresholds: list[int | None]) -> dict:
    """What `rollout_documents` answers: the node's replica of its site's rollout state."""
    return {
        "node_id": node,
        "site": "ams",
        "has_plan": True,
        "site_state": {
            "state": state,
            "wave": wave,
            "reason": "",
            "waiting_for": "nothing (finished)" if state in ("completed", "aborted") else "the gate",
            "thresholds": [None if t is None else f"{t:064x}" for t in thresholds],
        },
        "device": None,
    }


SHA = {"1": "1a" * 32, "2": "2b" * 32}  # what each version's published file hashes to


def healthy() -> RunRecord:
    spec = RunSpec(
        scenario="unit",
        seed=7,
        sites=dict.fromkeys(NODES, "ams"),
        raft_addresses={f"10.0.0.{i}:7400": n for i, n in enumerate(NODES)},
        guard=GUARD,
        group_sizes={"ams": 3},
        operator_key_ids=[OPERATOR_KEY],
        model="wake",
        published=["1", "2"],
        published_sha256={"1": SHA["1"], "2": SHA["2"]},
        rogue=["9"],
        rollouts=[{"rollout_id": ROLLOUT, "target": "2", "baseline": "1"}],
        membership_bound_s=30.0,
    )
    record = RunRecord(spec=spec)
    ds = _decisions()
    record.ops = [
        Op(
            1,
            "move",
            "n01",
            "ams",
            5.0,
            5.1,
            ACKNOWLEDGED,
            {"decision_id": "d1", "outcome": "applied", "moves": ds[0]["moves"]},
        ),
        Op(
            2,
            "move",
            "n02",
            "ams",
            6.0,
            6.1,
            ACKNOWLEDGED,
            {"decision_id": "d2", "outcome": "held", "moves": ds[1]["moves"]},
        ),
        Op(
            3,
            "approve",
            "n03",
            "ams",
            7.0,
            7.1,
            ACKNOWLEDGED,
            {"decision_id": "d2", "outcome": "applied", "moves": ds[1]["moves"]},
        ),
        Op(4, "move", "n03", "ams", 12.0, 14.0, UNKNOWN, {"decision_id": "d3", "code": "DEADLINE_EXCEEDED"}),
        Op(5, "infer", "n01", "ams", 3.0, 3.1, ACKNOWLEDGED, {"version": "1"}),
        Op(6, "infer", "n02", "ams", 11.0, 11.2, REFUSED, {"code": "UNAVAILABLE"}),
        Op(7, "infer", "n03", "ams", 30.0, 30.1, ACKNOWLEDGED, {"version": "2"}),
        Op(
            8,
            "rollout-start",
            "n01",
            "ams",
            8.0,
            9.0,
            ACKNOWLEDGED,
            {"rollout_id": ROLLOUT, "outcome": "applied"},
        ),
        Op(9, "device-infer", "n02", "ams", 35.0, 35.1, ACKNOWLEDGED, {"version": "2"}),
    ]
    record.faults = [
        FaultEvent(10.0, "apply", "0-partition-one", "isolate n03", {"isolated": ["n03"]}),
        FaultEvent(20.0, "heal", "0-partition-one", "isolate n03", {}),
    ]
    record.samples = [Sample(2.0, n, "term", {"term": 3, "leader": "n01"}) for n in NODES]
    record.samples += [Sample(25.0, n, "term", {"term": 4, "leader": "n02"}) for n in NODES]
    record.samples += [
        Sample(2.0, n, "inference", {"active_version": "1", "active_sha256": SHA["1"]}) for n in NODES
    ]
    record.samples += [
        Sample(40.0, n, "inference", {"active_version": "2", "active_sha256": SHA["2"]}) for n in NODES
    ]
    members = [{"node_id": n, "state": "alive"} for n in NODES]
    for n in NODES:
        record.final[n] = NodeFinal(
            node=n,
            site="ams",
            running=True,
            status={"members": copy.deepcopy(members)},
            routes={
                "group": {"current": True, "leader": "10.0.0.1:7400"},
                "routes": dict(FINAL_ROUTES),
                "allocations": {},
            },
            audit={
                "verdict": {"ok": True, "records": 9, "first_bad_seq": None, "reason": ""},
                "records": _audit(ds),
            },
            inference={"active_version": "2", "active_sha256": SHA["2"]},
            rollouts={ROLLOUT: _rollout_doc(n, "completed", 3, [_score(NODES[0]), None, MAX_SCORE])},
        )
    record.healed_at_s = 20.0
    record.converged_at_s = 24.0
    record.settled_at_s = 45.0
    return record


def _check(name: str, record: RunRecord) -> checkers.CheckResult:
    return checkers.CHECKERS[name](record)


def _drop_record(record: RunRecord, node: str, kind: str, decision_id: str) -> None:
    audit = record.final[node].audit
    audit["records"] = [
        r
        for r in audit["records"]
        if not (r["kind"] == kind and r["payload"].get("decision_id") == decision_id)
    ]


def test_a_healthy_run_passes_every_checker():
    results = checkers.run_checkers(healthy())
    assert {r.name: r.status for r in results} == dict.fromkeys(checkers.CHECKERS, PASS), [
        r.summary for r in results if r.status != PASS
    ]


def test_the_record_survives_json():
    record = healthy()
    again = RunRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert [r.status for r in checkers.run_checkers(again)] == [PASS] * len(checkers.CHECKERS)


# -- each invariant broken on purpose ------------------------------------------------------------


def test_an_acknowledged_decision_missing_from_one_replicas_audit_log_fails():
    record = healthy()
    _drop_record(record, "n02", "applied", "d1")
    result = _check("acknowledged_decisions", record)
    assert result.status == FAIL
    assert "decision d1" in result.problems[0] and "n02's audit log" in result.problems[0]


def test_a_log_a_nemesis_truncated_is_left_to_the_audit_checker():
    record = healthy()
    _drop_record(record, "n02", "applied", "d2")
    record.spec.tampered_audit = ["n02"]
    assert _check("acknowledged_decisions", record).status == PASS
    record.spec.tampered_audit = []
    assert _check("acknowledged_decisions", record).status == FAIL


def test_an_acknowledged_decision_covered_by_an_installed_snapshot_is_not_lost():
    record = healthy()
    _drop_record(record, "n02", "applied", "d1")
    _drop_record(record, "n02", "proposed", "d1")
    record.final["n02"].audit["records"].append(
        {
            "seq": 99,
            "kind": "snapshot_installed",
            "payload": {"from_index": 3, "to_index": 15, "raft_index": 15},
        }
    )
    assert _check("acknowledged_decisions", record).status == PASS


def test_a_replica_routing_a_moved_stream_elsewhere_fails_both_route_checkers():
    record = healthy()
    record.final["n03"].routes["routes"]["s1"] = "n01"  # as if d1 had been lost on n03
    lost = _check("acknowledged_decisions", record)
    assert lost.status == FAIL
    assert any("n03 routes s1 to n01" in p and "decision d1" in p for p in lost.problems)
    agree = _check("replicas_agree", record)
    assert agree.status == FAIL
    assert "route s1" in agree.problems[0] and "n03: n01" in agree.problems[0]


def test_a_later_decision_moving_the_stream_again_is_not_a_loss():
    record = healthy()
    later = [{"stream": "s1", "from": "n02", "to": "n03"}]
    for node in NODES:
        record.final[node].audit["records"].append(
            {
                "seq": 50,
                "kind": "applied",
                "payload": {
                    "decision_id": "d9",
                    "raft_index": 40,
                    "raft_event": 1,
                    "kind": "move_streams",
                    "moves": later,
                    "approved_by": None,
                },
            }
        )
        record.final[node].routes["routes"]["s1"] = "n03"
    assert _check("acknowledged_decisions", record).status == PASS


def test_a_replica_that_cannot_confirm_its_routes_are_current_fails():
    record = healthy()
    record.final["n01"].routes["group"] = {"current": False, "note": "no leader reachable"}
    result = _check("replicas_agree", record)
    assert result.status == FAIL and "n01 could not confirm" in result.problems[0]


def test_an_above_scope_decision_applied_without_approval_fails():
    record = healthy()
    for node in NODES:
        _drop_record(record, node, "held", "d2")
        _drop_record(record, node, "approved", "d2")
        for r in record.final[node].audit["records"]:
            if r["kind"] == "applied" and r["payload"]["decision_id"] == "d2":
                r["payload"]["approved_by"] = None
    result = _check("guard_scope", record)
    assert result.status == FAIL
    assert "applied d2" in result.problems[0] and "without an approval" in result.problems[0]
    assert "2 streams > 1" in result.problems[0]


def test_an_above_scope_apply_with_no_proposal_in_any_log_is_judged_by_its_own_moves():
    """A build that applies a decision without writing its `proposed` record (nor holding it) leaves
    nothing to judge it by but the applied record itself: its two moves exceed the policy's one."""
    record = healthy()
    for node in NODES:
        for kind in ("proposed", "held", "approved"):
            _drop_record(record, node, kind, "d2")
        for r in record.final[node].audit["records"]:
            if r["kind"] == "applied" and r["payload"]["decision_id"] == "d2":
                r["payload"]["approved_by"] = None
    result = _check("guard_scope", record)
    assert result.status == FAIL, result
    assert "applied d2" in result.problems[0] and "without an approval" in result.problems[0]
    assert "2 streams > 1" in result.problems[0]
    # Within scope by its own record (d1: one stream, two nodes of three), it passes.
    record = healthy()
    for node in NODES:
        _drop_record(record, node, "proposed", "d1")
    assert _check("guard_scope", record).status == PASS


def test_checkers_with_nothing_to_judge_skip_rather_than_pass():
    """No decision acknowledged as applied: nothing to look for in the replicas. No decision above
    scope proposed (the first decision only, within scope): the guard was not put to the test."""
    record = healthy()
    record.ops = [o for o in record.ops if o.kind not in ("move", "approve")]
    assert _check("acknowledged_decisions", record).status == SKIP
    record = healthy()
    for node in NODES:
        records = record.final[node].audit["records"]
        record.final[node].audit["records"] = [r for r in records if r["payload"].get("decision_id") != "d2"]
    result = _check("guard_scope", record)
    assert result.status == SKIP and "not put to the test" in result.summary, result
    assert _check("guard_scope", healthy()).figures["above_scope_proposed"] == 1


def test_an_approval_by_a_key_that_is_not_an_operators_fails():
    record = healthy()
    for r in record.final["n01"].audit["records"]:
        if r["payload"].get("decision_id") == "d2" and r["kind"] in ("approved", "applied"):
            r["payload"]["key_id" if r["kind"] == "approved" else "approved_by"] = "n0dek3y000000001"
    result = _check("guard_scope", record)
    assert (
        result.status == FAIL and "n01" in result.problems[0] and "not an operator key" in result.problems[0]
    )


def test_an_apply_before_its_approval_is_in_the_log_fails():
    record = healthy()
    _drop_record(record, "n03", "approved", "d2")
    result = _check("guard_scope", record)
    assert (
        result.status == FAIL
        and "n03" in result.problems[0]
        and "no approval by that key" in result.problems[0]
    )


def test_a_broken_audit_chain_fails_naming_the_node_and_record():
    record = healthy()
    record.final["n02"].audit["verdict"] = {"ok": False, "first_bad_seq": 4, "reason": "hash mismatch"}
    result = _check("audit_chains", record)
    assert result.status == FAIL and result.problems == [
        "n02's audit chain is broken at record 4: hash mismatch"
    ]


def test_tampering_that_still_verifies_fails_and_detected_tampering_passes():
    record = healthy()
    record.spec.tampered_audit = ["n03"]
    undetected = _check("audit_chains", record)
    assert (
        undetected.status == FAIL
        and "n03" in undetected.problems[0]
        and "undetected" in undetected.problems[0]
    )
    record.final["n03"].audit["verdict"] = {
        "ok": False,
        "first_bad_seq": 3,
        "reason": "record 3 does not parse",
    }
    assert _check("audit_chains", record).status == PASS


def test_a_rogue_version_ever_served_fails():
    record = healthy()
    record.samples.append(Sample(33.0, "n02", "inference", {"active_version": "9"}))
    result = _check("model_versions", record)
    assert result.status == FAIL
    assert "n02 activated wake 9" in result.problems[0] and "outside the fleet" in result.problems[0]


def test_a_node_that_activated_bytes_other_than_those_published_fails():
    """A node that skipped verification and loaded a corrupted (or substituted) file of a published
    version is caught by the sha256 of what its runtime loaded, whether sampled during the run or read
    at the end."""
    record = healthy()
    assert _check("model_versions", record).status == PASS
    wrong = {"active_version": "2", "active_sha256": "ff" * 32}
    record.samples.append(Sample(33.0, "n02", "inference", wrong))
    result = _check("model_versions", record)
    assert result.status == FAIL
    assert "n02 activated wake 2 from bytes with sha256 ffffffff" in result.problems[0]
    record = healthy()
    record.final["n03"].inference = {"active_version": "2", "active_sha256": SHA["1"]}
    result = _check("model_versions", record)
    assert result.status == FAIL and "n03 activated wake 2" in result.problems[0], result.problems


def test_a_version_nobody_published_answering_an_infer_fails():
    record = healthy()
    record.ops.append(Op(8, "infer", "n01", "ams", 31.0, 31.1, ACKNOWLEDGED, {"version": "5"}))
    result = _check("model_versions", record)
    assert result.status == FAIL and "wake 5, which nobody published" in result.problems[0]


def test_nodes_ending_on_different_versions_fail():
    record = healthy()
    record.spec.rollouts = []  # without a rollout, every node must end on one version
    for final in record.final.values():
        final.rollouts = None
    record.final["n03"].inference = {"active_version": "1"}
    result = _check("model_versions", record)
    assert (
        result.status == FAIL
        and "different versions" in result.problems[0]
        and "n03: 1" in result.problems[0]
    )


# -- rollouts --


def _abort_at_wave_one(record: RunRecord) -> tuple[str, str]:
    """Site ams aborted the rollout at wave 1, whose one device is the lowest-ranked node; every node
    is back on the baseline. Returns (the node in wave 1, a node outside it)."""
    ranked = sorted(NODES, key=_score)
    for n in NODES:
        record.final[n].rollouts = {ROLLOUT: _rollout_doc(n, "aborted", 1, [_score(ranked[0]), None, None])}
        record.final[n].inference = {"active_version": "1"}
    record.ops = [o for o in record.ops if o.kind != "device-infer"]
    record.samples = [s for s in record.samples if s.kind != "inference" or s.data["active_version"] == "1"]
    return ranked[0], ranked[-1]


def test_without_a_rollout_the_rollout_checker_skips():
    record = healthy()
    record.spec.rollouts = []
    assert _check("rollouts", record).status == SKIP


def test_a_bad_version_that_was_never_rolled_out_fails_the_rollout_checker():
    """A run meant to show a bad version rolled back, whose rollout never started (the publish was
    refused, or came too late), tested nothing: it fails, it does not skip."""
    record = healthy()
    record.spec.rollouts = []
    record.spec.bad = ["2"]
    result = _check("rollouts", record)
    assert result.status == FAIL and "no rollout was started" in result.problems[0], result


def test_a_bad_version_completed_anywhere_fails():
    record = healthy()
    record.spec.bad = ["2"]
    result = _check("rollouts", record)
    assert (
        result.status == FAIL and "completed rollout wake-2-chaos of the bad version 2" in result.problems[0]
    )


def test_a_device_outside_the_waves_an_aborted_site_reached_serving_the_target_fails():
    record = healthy()
    inside, outside = _abort_at_wave_one(record)
    record.samples.append(Sample(12.0, inside, "inference", {"active_version": "2"}))
    assert _check("rollouts", record).status == PASS, _check("rollouts", record).problems
    record.ops.append(Op(20, "device-infer", outside, "ams", 13.0, 13.1, ACKNOWLEDGED, {"version": "2"}))
    result = _check("rollouts", record)
    assert result.status == FAIL
    assert (
        f"{outside} served 2 of rollout wake-2-chaos, but site ams aborted it at wave 1" in result.problems[0]
    )


def test_a_node_left_on_the_target_of_an_aborted_rollout_fails():
    record = healthy()
    inside, _ = _abort_at_wave_one(record)
    record.final[inside].inference = {"active_version": "2"}
    result = _check("rollouts", record)
    assert result.status == FAIL
    assert (
        f"{inside} ends on wake 2, but site ams aborted rollout wake-2-chaos: it must serve 1"
        in result.problems
    )


def test_a_node_left_on_the_baseline_of_a_completed_rollout_fails():
    record = healthy()
    record.final["n03"].inference = {"active_version": "1"}
    result = _check("rollouts", record)
    assert (
        result.status == FAIL
        and "n03 ends on wake 1" in result.problems[0]
        and "must serve 2" in result.problems[0]
    )


def test_an_unfinished_rollout_or_replicas_that_disagree_fail():
    record = healthy()
    record.final["n02"].rollouts = {ROLLOUT: _rollout_doc("n02", "waiting_approval", 2, [1, 2, None])}
    result = _check("rollouts", record)
    assert result.status == FAIL and "n02 holds it waiting_approval at wave 2" in result.problems[0]
    record = healthy()
    record.final["n02"].rollouts = {ROLLOUT: _rollout_doc("n02", "aborted", 3, [1, 2, 3])}
    result = _check("rollouts", record)
    assert result.status == FAIL and "replicas end rollout wake-2-chaos differently" in result.problems[0]


def test_a_replica_that_cannot_be_read_fails_and_a_rollout_never_started_is_not_judged():
    record = healthy()
    record.final["n01"].rollouts = None
    result = _check("rollouts", record)
    assert result.status == FAIL and "cannot read rollout wake-2-chaos of n01" in result.problems[0]
    record = _never_started()
    assert _check("rollouts", record).status == PASS, _check("rollouts", record).problems


def _never_started() -> RunRecord:
    """Every start of the rollout was refused and no node holds its plan; every node on the baseline."""
    record = healthy()
    record.ops = [o for o in record.ops if o.kind != "rollout-start"]
    for n in NODES:
        record.final[n].rollouts = {ROLLOUT: {"has_plan": False, "site_state": None, "device": None}}
        record.final[n].inference = {"active_version": "1"}
    return record


def test_a_node_on_the_target_of_a_rollout_that_never_started_fails():
    record = _never_started()
    record.final["n02"].inference = {"active_version": "2"}
    result = _check("rollouts", record)
    assert result.status == FAIL
    assert "n02 ends on wake 2, but rollout wake-2-chaos never started: it must serve 1" in result.problems


def test_a_bad_version_must_be_started_and_aborted_by_every_site():
    record = _never_started()
    record.spec.bad = ["2"]
    result = _check("rollouts", record)
    assert result.status == FAIL
    assert "rollout wake-2-chaos of the bad version 2 never started" in result.problems[0]
    record = healthy()
    record.spec.bad = ["2"]
    _abort_at_wave_one(record)
    assert _check("rollouts", record).status == PASS, _check("rollouts", record).problems
    for n in NODES:
        record.final[n].rollouts = None  # nothing readable: the site has no outcome
    result = _check("rollouts", record)
    assert result.status == FAIL
    assert any("did not end aborted in ams" in p for p in result.problems), result.problems


def test_a_live_node_left_dead_fails():
    record = healthy()
    record.final["n01"].status["members"][2]["state"] = "dead"
    result = _check("membership", record)
    assert result.status == FAIL and result.problems[0].startswith("n01 sees n03 as dead")


def test_reconverging_slower_than_the_bound_fails_and_never_reconverging_too():
    record = healthy()
    record.converged_at_s = record.healed_at_s + 31.0
    slow = _check("membership", record)
    assert slow.status == FAIL and "31.0s to reconverge" in slow.problems[0]
    record.converged_at_s = None
    assert "never reconverged" in _check("membership", record).problems[0]


def test_two_leaders_in_one_term_fail_naming_the_term_and_who_said_so():
    record = healthy()
    record.samples.append(Sample(26.0, "n03", "term", {"term": 4, "leader": "n03"}))
    result = _check("one_leader_per_term", record)
    assert result.status == FAIL
    assert "term 4: 2 leaders" in result.problems[0] and "n03 (claimed at 26.0s)" in result.problems[0]


def test_a_follower_naming_another_leader_is_not_a_claim():
    record = healthy()
    record.samples.append(Sample(26.0, "n01", "term", {"term": 4, "leader": "n03"}))
    assert _check("one_leader_per_term", record).status == PASS


def test_without_any_term_the_leader_checker_skips_rather_than_passes():
    record = healthy()
    record.samples = [s for s in record.samples if s.kind != "term"]
    assert _check("one_leader_per_term", record).status == SKIP


def test_a_node_that_died_by_itself_fails():
    record = healthy()
    record.final["n02"].running = False
    record.final["n02"].errors = ["process exited with 1: disk full"]
    result = _check("nodes_running", record)
    assert (
        result.status == FAIL
        and "n02 is not running" in result.problems[0]
        and "disk full" in result.problems[0]
    )


def test_a_crashing_checker_is_reported_as_a_failure(monkeypatch):
    def broken(record):
        raise KeyError("moves")

    monkeypatch.setitem(checkers.CHECKERS, "replicas_agree", broken)
    results = {r.name: r for r in checkers.run_checkers(healthy())}
    assert results["replicas_agree"].status == FAIL
    assert "checker crashed: KeyError" in results["replicas_agree"].summary


# -- outcomes and availability -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "phase", "node_outcome", "expected"),
    [
        (None, "", "applied", ACKNOWLEDGED),
        (None, "", "held", ACKNOWLEDGED),
        (None, "", "refused", REFUSED),
        ("UNAVAILABLE", "propose", None, UNKNOWN),
        ("DEADLINE_EXCEEDED", "approve", None, UNKNOWN),
        ("FAILED_PRECONDITION", "propose", None, REFUSED),
        ("UNAVAILABLE", "routes", None, REFUSED),
        ("CLIENT", "propose", None, REFUSED),
    ],
)
def test_write_outcomes(code, phase, node_outcome, expected):
    assert write_outcome(code, phase, node_outcome) == expected


def test_read_outcomes():
    assert read_outcome(None) == ACKNOWLEDGED
    assert read_outcome("DEADLINE_EXCEEDED") == UNKNOWN
    assert read_outcome("UNAVAILABLE") == REFUSED


def test_availability_is_split_by_fault_phase():
    rows = checkers.availability(healthy())
    assert [r["phase"] for r in rows] == ["before faults", "during 0-partition-one", "after heal"]
    before, during, after = rows
    assert (before["infer"], before["infer_answered"], before["writes"], before["writes_acknowledged"]) == (
        1,
        1,
        3,
        3,
    )
    assert (during["infer"], during["infer_answered"], during["writes"]) == (1, 0, 1)
    assert (after["infer"], after["infer_answered"]) == (1, 1)
