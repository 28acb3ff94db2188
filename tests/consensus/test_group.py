"""Real site groups over loopback: the guard inside every replica's apply, approvals, failover,
partitions, restarts without duplicated audit records, and a tamper-evident audit log."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from mesh.consensus.config import GuardTable, RaftSection, policy_from_table
from mesh.consensus.group import SiteGroup
from mesh.consensus.ledger import Outcome
from mesh.consensus.raft import NoLeaderError, ProposalTimeout, RaftTimings
from mesh.guard.approval import sign_approval
from mesh.guard.audit import read_audit, verify_audit
from mesh.guard.core import Allocation, Decision, DecisionKind
from mesh.identity.signing import SigningKey
from mesh.node.local import wait_for
from tests.consensus.harness import GROUP, NODE_KEY, ROUTES, big, move, small


def approval(key: SigningKey, decision: Decision, *, approve: bool = True, nonce: str = "appr-00001",
             now: float | None = None, ttl_s: float = 300.0):
    return sign_approval(key, decision, now=time.time() if now is None else now, ttl_s=ttl_s, nonce=nonce,
                         approve=approve, reason="checked the cameras")


def audit_kinds(group: SiteGroup, decision_id: str) -> list[str]:
    return [r.kind for r in group.audit_records() if r.payload.get("decision_id") == decision_id]


def refusals(group: SiteGroup) -> list[str]:
    return [r.payload["reason"] for r in group.audit_records() if r.kind == "refused"]


# --- configuration -----------------------------------------------------------------------------


def test_raft_section_is_strict_and_names_the_field():
    ok = RaftSection(members=["cam-01", "cam-02"])
    assert ok.group_id("berlin-1") == "berlin-1" and ok.timings() == RaftTimings()
    cases = {
        "raft.listen is no longer used": {"listen": "10.0.0.1:7400", "members": ["cam-01"]},
        "an address: list node ids": {"members": ["10.0.0.1:7400"]},
        "more than once": {"members": ["cam-01", "cam-01"]},
        "3 x append_period_s": {"members": ["cam-01"], "election_min_s": 0.1},
        "Extra inputs": {"members": ["cam-01"], "electon_min_s": 0.3},
        "at least 1 item": {"members": []},
    }
    for message, fields in cases.items():
        with pytest.raises(ValidationError, match=message):
            RaftSection(**fields)
    with pytest.raises(ValueError, match="no `site` label"):
        ok.group_id(None)


def test_guard_table_is_parsed_with_the_policy_parser():
    from pydantic import TypeAdapter

    adapter = TypeAdapter(GuardTable)
    table = {"hold_ttl_s": 120, "move_streams": {"max_nodes": 3}}
    assert adapter.validate_python(table) == table
    assert policy_from_table(table).limits_for(DecisionKind.MOVE_STREAMS).max_nodes == 3
    with pytest.raises(ValidationError, match="guard.move_streams.max_nodez"):
        adapter.validate_python({"move_streams": {"max_nodez": 3}})


# --- the guard on every replica ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("n", [3, 5])
async def test_within_scope_applies_and_above_scope_waits_for_an_operator_on_every_replica(
    site, operator_key, n, caplog
):
    s = await site(n)
    groups = s.start_all()
    await s.wait_leader()
    assert (await groups[0].set_routes(ROUTES)).outcome is Outcome.APPLIED

    # Within scope, proposed on a follower (pysyncobj forwards it to the leader): applied on every replica.
    within = small()
    follower = next(g for g in groups if not g.raft.is_leader)
    result = await follower.propose(within)
    assert result.outcome is Outcome.APPLIED
    await s.converged()
    assert all(g.routes()["cam-0"] == "node-2" for g in groups)
    assert all(audit_kinds(g, within.decision_id) == ["proposed", "applied"] for g in groups)

    # Above scope: held on every replica, with a warning.
    held_decision = big()
    with caplog.at_level(logging.WARNING, logger="mesh.guard"):
        result = await groups[1].propose(held_decision)
    assert result.outcome is Outcome.HELD
    assert any("held decision" in r.getMessage() and held_decision.decision_id in r.getMessage()
               for r in caplog.records)
    await s.converged()
    for g in groups:
        assert [h.decision_id for h in g.pending()] == [held_decision.decision_id]
        assert g.routes()["cam-2"] == "node-1"
        assert audit_kinds(g, held_decision.decision_id) == ["proposed", "held"]

    # A valid operator approval: applied on all.
    result = await groups[2].approve(approval(operator_key, held_decision))
    assert result.outcome is Outcome.APPLIED
    await s.converged()
    for g in groups:
        assert g.pending() == ()
        assert [g.routes()[c] for c in ("cam-1", "cam-2", "cam-3", "cam-4")] == ["node-4"] * 4
        assert audit_kinds(g, held_decision.decision_id) == ["proposed", "held", "approved", "applied"]
        approved = next(r for r in g.audit_records() if r.kind == "approved")
        assert approved.payload["key_id"] == operator_key.key_id

    # Another one above scope, denied: applied on none.
    denied = move(("cam-6", "node-3", "node-1"), ("cam-7", "node-3", "node-2"), ("cam-8", "node-3", "node-4"),
                  nonce="big-000002")
    assert (await groups[0].propose(denied)).outcome is Outcome.HELD
    result = await groups[1].deny(approval(operator_key, denied, approve=False, nonce="deny-00001"))
    assert result.outcome is Outcome.DENIED
    await s.converged()
    for g in groups:
        assert g.pending() == () and g.outcome_of(denied.decision_id) == "denied"
        assert all(g.routes()[c] == "node-3" for c in ("cam-6", "cam-7", "cam-8"))
        assert audit_kinds(g, denied.decision_id) == ["proposed", "held", "denied"]
        assert g.verify_audit().ok


@pytest.mark.asyncio
@pytest.mark.parametrize("n", [3, 5])
async def test_forged_replayed_expired_and_node_signed_approvals_are_refused_and_audited_everywhere(
    site, operator_key, n
):
    s = await site(n)
    groups = s.start_all()
    await s.wait_leader()
    await groups[0].set_routes(ROUTES)
    decision = big()
    assert (await groups[0].propose(decision)).outcome is Outcome.HELD

    good = approval(operator_key, decision, nonce="appr-good1")
    signature = bytes.fromhex(good.signature)
    forged = dataclasses.replace(good, nonce="appr-forg1",
                                 signature=(bytes([signature[0] ^ 0xFF]) + signature[1:]).hex())
    expired = approval(operator_key, decision, nonce="appr-old01", now=time.time() - 1000, ttl_s=60)
    node_signed = approval(NODE_KEY, decision, nonce="appr-node1")
    for bad in (forged, expired, node_signed):
        result = await groups[1].approve(bad)
        assert result.outcome is Outcome.REFUSED, result
    await s.converged()
    for g in groups:  # the hold survives bad approvals
        assert [h.decision_id for h in g.pending()] == [decision.decision_id]

    assert (await groups[2 % n].approve(good)).outcome is Outcome.APPLIED
    replay = await groups[0].approve(good)
    assert replay.outcome is Outcome.REFUSED and "already used" in replay.message
    await s.converged()
    for g in groups:
        assert refusals(g) == ["forged", "expired", "not_operator_key", "replayed"], g.node_id
        keys = [r.payload.get("key_id") for r in g.audit_records() if r.kind == "refused"]
        assert keys == [operator_key.key_id, operator_key.key_id, NODE_KEY.key_id, operator_key.key_id]
        assert g.routes()["cam-2"] == "node-4"


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_held_decisions_survive_the_leader_and_a_restart_does_not_duplicate_audit_records(
    site, operator_key
):
    s = await site(3)
    s.start_all()
    leader = await s.wait_leader()
    await leader.set_routes(ROUTES)
    decision = big()
    assert (await leader.propose(decision)).outcome is Outcome.HELD
    await s.converged()
    old_term = leader.raft.raftCurrentTerm
    await leader.close()

    survivors = s.live()
    new = await s.wait_leader(survivors)
    assert new.node_id != leader.node_id and new.raft.raftCurrentTerm > old_term
    assert all([h.decision_id for h in g.pending()] == [decision.decision_id] for g in survivors)
    assert (await survivors[0].approve(approval(operator_key, decision))).outcome is Outcome.APPLIED
    await s.converged(survivors)

    # The old leader restarts from its data dir: its journal is replayed (apply runs again for
    # entries it had audited), then it catches up on the approval it missed.
    before = [(r.kind, r.payload.get("raft_index")) for r in read_audit(leader.audit_path)]
    restarted = s.start(int(leader.node_id.split("-")[1]))
    await s.converged()
    assert restarted.routes()["cam-2"] == "node-4" and restarted.pending() == ()
    records = restarted.audit_records()
    keys = [(r.payload["raft_index"], r.payload["raft_event"]) for r in records]
    assert len(keys) == len(set(keys)), "audit records duplicated by the journal replay"
    assert [(r.kind, r.payload.get("raft_index")) for r in records][: len(before)] == before
    assert audit_kinds(restarted, decision.decision_id) == ["proposed", "held", "approved", "applied"]
    assert restarted.verify_audit().ok
    # Every replica audited the same entries at the same Raft indexes.
    views = {tuple((r.kind, r.payload["raft_index"]) for r in g.audit_records()) for g in s.live()}
    assert len(views) == 1

    # Its Raft journal is wiped but its audit log kept: the reset is recorded, nothing is skipped.
    await restarted.close()
    for path in restarted.data_dir.glob("raft.journal*"):
        path.unlink()
    fresh = s.start(int(leader.node_id.split("-")[1]))
    await s.converged()
    kinds = [r.kind for r in fresh.audit_records()]
    assert "raft_journal_reset" in kinds and kinds[-4:] == ["proposed", "held", "approved", "applied"]
    assert fresh.verify_audit().ok and fresh.routes()["cam-2"] == "node-4"


@pytest.mark.asyncio
async def test_a_minority_partition_cannot_commit_while_the_majority_can(site):
    s = await site(5)
    groups = s.start_all()
    leader = await s.wait_leader()
    await leader.set_routes(ROUTES)
    await s.converged()
    minority = [leader, next(g for g in groups if g is not leader)]
    majority = [g for g in groups if g not in minority]
    for g in minority:
        g.raft.cut(*(m.node_id for m in majority))
    for g in majority:
        g.raft.cut(*(m.node_id for m in minority))

    await wait_for(lambda: not leader.raft.is_leader, 3.0, "the cut-off leader steps down")
    from_minority = small("small-minor")
    for g in minority:
        with pytest.raises((NoLeaderError, ProposalTimeout)):
            await g.propose(from_minority, timeout_s=1.0)
    assert (await majority[0].propose(small("small-major"))).outcome is Outcome.APPLIED
    await s.converged(majority)
    assert all(g.routes()["cam-0"] == "node-2" for g in majority)
    assert all(g.routes()["cam-0"] == "node-1" for g in minority)  # still serving the last committed table
    assert all(audit_kinds(g, from_minority.decision_id) == [] for g in groups)

    for g in groups:
        g.raft.heal()
    await s.converged(groups)
    assert all(g.routes()["cam-0"] == "node-2" for g in groups)


@pytest.mark.asyncio
async def test_a_replica_restored_from_a_snapshot_records_the_gap_and_never_duplicates(site):
    s = await site(3, RaftTimings(compaction_min_entries=4))
    groups = s.start_all()
    leader = await s.wait_leader()
    await leader.set_routes(ROUTES)
    await s.converged()
    lagging = next(g for g in groups if g is not leader)
    others = [g for g in groups if g is not lagging]
    lagging.raft.cut(*(g.node_id for g in others))
    for g in others:
        g.raft.cut(lagging.node_id)
    for slots in range(1, 9):  # one node's allocation at a time: within the set_allocation scope
        decision = last = Decision(
            kind=DecisionKind.SET_ALLOCATION, group=GROUP, proposer="node-0", reason="load",
            proposed_at=time.time(), nonce=f"alloc-{slots:04d}", allocations=(Allocation("node-1", slots),)
        )
        assert (await leader.propose(decision)).outcome is Outcome.APPLIED
    await wait_for(lambda: leader.raft.status()["log_entries"] < 8, 10.0, "the leader compacts its log")

    for g in groups:
        g.raft.heal()
    await s.converged()
    assert lagging.allocations() == {"node-1": 8}
    gap = [r for r in lagging.audit_records() if r.kind == "snapshot_installed"]
    assert len(gap) == 1 and gap[0].payload["from_index"] <= gap[0].payload["to_index"]
    assert lagging.verify_audit().ok

    # Restarting it restores its own snapshot and replays the rest: no second gap, no duplicates.
    await lagging.close()
    restarted = s.start(int(lagging.node_id.split("-")[1]))
    await s.converged()
    records = restarted.audit_records()
    assert [r.kind for r in records].count("snapshot_installed") == 1
    keys = [(r.payload["raft_index"], r.payload["raft_event"]) for r in records]
    assert len(keys) == len(set(keys)) and restarted.verify_audit().ok

    # The leader restarts from the snapshot it wrote itself: it applied those entries, no gap, even
    # when the snapshot ends past its last audited entry (an entry without audit events: a noop).
    snapshot = leader.data_dir / "raft.snapshot"
    written_ns = snapshot.stat().st_mtime_ns
    assert (await leader.propose(last)).outcome is Outcome.NOOP
    leader.raft.forceLogCompaction()
    await wait_for(lambda: snapshot.stat().st_mtime_ns != written_ns, 10.0, "a new leader snapshot")
    await leader.close()
    again = s.start(int(leader.node_id.split("-")[1]))
    await s.converged()
    records = again.audit_records()
    assert "snapshot_installed" not in [r.kind for r in records]
    keys = [(r.payload["raft_index"], r.payload["raft_event"]) for r in records]
    assert len(keys) == len(set(keys)) and again.verify_audit().ok and again.allocations() == {"node-1": 8}


# --- audit log tampering -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_editing_deleting_or_reordering_an_audit_record_is_detected(site, operator_key, tmp_path):
    s = await site(3)
    groups = s.start_all()
    await s.wait_leader()
    await groups[0].set_routes(ROUTES)
    decision = big()
    await groups[1].propose(decision)
    await groups[2].approve(approval(operator_key, decision))
    await s.converged()
    await s.close_all()
    source = groups[0].audit_path
    lines = source.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 5 and verify_audit(source).ok

    def tampered(name: str, new_lines: list[bytes]) -> Path:
        path = tmp_path / name / "audit.log"
        path.parent.mkdir()
        path.write_bytes(b"".join(new_lines))
        (path.parent / "audit.log.head").write_bytes((source.parent / "audit.log.head").read_bytes())
        return path

    edited = json.loads(lines[2])
    edited["payload"]["proposer"] = "node-9"
    v = verify_audit(tampered("edit", lines[:2] + [json.dumps(edited).encode() + b"\n"] + lines[3:]))
    assert (v.ok, v.first_bad_seq) == (False, 3) and "edited" in v.reason
    v = verify_audit(tampered("delete", lines[:1] + lines[2:]))
    assert (v.ok, v.first_bad_seq) == (False, 2) and "missing" in v.reason
    v = verify_audit(tampered("reorder", lines[:1] + [lines[2], lines[1]] + lines[3:]))
    assert (v.ok, v.first_bad_seq) == (False, 2)
    v = verify_audit(tampered("truncate", lines[:-1]))
    assert (v.ok, v.first_bad_seq) == (False, len(lines))
