"""Group commit of a site's audit log: replicas write the audit records of a tick's entries with one sync,
and a proposer hears the outcome only once its decision's records are on disk."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from mesh.consensus.commands import propose_command, set_routes_command
from mesh.consensus.group import _AuditedLedger, _last_audited
from mesh.consensus.ledger import DecisionLedger
from mesh.consensus.raft import LeaderChangedError
from mesh.guard.audit import AuditLog, read_audit, verify_audit
from mesh.guard.core import Allocation, Decision, DecisionKind, Policy
from mesh.identity.signing import TrustedKeys
from mesh.rollout.state import RolloutLedger
from tests.consensus.harness import GROUP, ROUTES, small


@pytest.mark.asyncio
@pytest.mark.parametrize("proposers", [1, 16])
async def test_a_proposer_hears_the_outcome_after_its_audit_records_are_on_disk(site, proposers):
    s = await site(3)
    groups = s.start_all()
    leader = await s.wait_leader()
    await leader.set_routes(ROUTES)
    on_disk_when_answered: list[bool] = []
    decided: set[str] = set()

    async def propose(member, nonce: str) -> None:
        for _ in range(5):
            try:
                result = await member.propose(small(nonce))  # the first applied, the others refused (stale)
                break
            except LeaderChangedError:
                # A follower whose leader went quiet for an election timeout (16 proposers on a busy
                # machine) fails what it forwarded: outcome unknown, so ask again; a repeat is refused.
                continue
        else:
            raise AssertionError(f"{nonce}: the leader changed under every attempt")
        decided.add(result.decision_id)
        # Read the file itself (audit_records() would write what is queued first).
        on_disk = {r.payload.get("decision_id") for r in read_audit(member.audit_path)}
        on_disk_when_answered.append(result.decision_id in on_disk)

    # From the leader and from a follower (whose command pysyncobj forwards): each answers for its own log.
    follower = next(g for g in groups if g is not leader)
    await asyncio.gather(
        *(propose(leader if i % 2 else follower, f"gc-{i:06d}") for i in range(4 * proposers))
    )
    assert on_disk_when_answered == [True] * (4 * proposers)
    await s.converged()
    for g in groups:
        assert g.verify_audit().ok
        assert decided <= {r.payload.get("decision_id") for r in g.audit_records()}


@pytest.mark.asyncio
async def test_closing_a_member_writes_what_it_applied(site):
    s = await site(3)
    groups = s.start_all()
    leader = await s.wait_leader()
    await leader.set_routes(ROUTES)
    results = await asyncio.gather(*(leader.propose(small(f"close-{i:05d}")) for i in range(8)))
    await s.converged()
    await s.close_all()
    for g in groups:
        assert verify_audit(g.audit_path).ok
        assert {r.decision_id for r in results} <= {
            r.payload.get("decision_id") for r in read_audit(g.audit_path)
        }


# --- one entry carrying several decisions (RaftTimings.batch_proposals), on the state machine itself ---


NOW = time.time()  # one clock for every command, so that a replay applies the very same ones


def _state(tmp_path):
    path = tmp_path / "audit.log"
    audited = _last_audited(read_audit(path)) if path.exists() else (0, -1)
    trusted = TrustedKeys()
    state = _AuditedLedger(
        DecisionLedger(group=GROUP, policy=Policy(), group_size=3, trusted=trusted),
        RolloutLedger(site=GROUP, trusted=trusted),
        AuditLog(path),
        audited,
    )
    state.raft = types.SimpleNamespace(raftLastApplied=0, node_id="node-0")  # what apply reads of its group
    return state


def _allocation(i: int) -> bytes:
    decision = Decision(kind=DecisionKind.SET_ALLOCATION, group=GROUP, proposer="node-1", reason="load",
                        proposed_at=NOW, nonce=f"alloc-{i:04d}", allocations=(Allocation("node-1", 1 + i),))
    return propose_command(decision, now=NOW)


def test_an_entry_is_durable_only_once_every_decision_it_carries_is_on_disk(tmp_path):
    """The audit writer may run between two commands of one entry: it must not call the entry durable then,
    or the second command's proposer would be answered before its records are on disk."""
    state = _state(tmp_path)
    try:
        state.apply(set_routes_command(ROUTES, now=time.time()))
        state.raft.raftLastApplied = 1
        state.apply(_allocation(0))  # entry 2, the first of its two commands
        state.flush()  # the writer thread, between the two
        assert state.durable_index == 1
        state.apply(_allocation(1))  # entry 2, the second
        state.tick_ended()
        state.flush()
        assert state.durable_index == 2
        on_disk = [(r.kind, r.payload["raft_event"]) for r in read_audit(state.audit.path)
                   if r.payload.get("raft_index") == 2]
        assert on_disk == [("proposed", 0), ("applied", 1), ("proposed", 2), ("applied", 3)]
    finally:
        state.stop()


def _journal(state: _AuditedLedger) -> None:
    """Entry 1 the routes, entry 2 four decisions (the same entries on every call, as a journal replays)."""
    state.apply(set_routes_command(ROUTES, now=NOW))
    state.raft.raftLastApplied = 1
    for i in range(4):
        state.apply(_allocation(i))
    state.tick_ended()


def test_every_decision_of_an_entry_counts_and_a_replay_counts_none(tmp_path):
    first = _state(tmp_path)
    _journal(first)
    first.stop()
    assert first.counts.snapshot().verdicts == {("set_allocation", "allow"): 4}
    again = _state(tmp_path)  # a restart: the journal replayed over the audit log the first one wrote
    _journal(again)
    again.stop()
    assert again.counts.snapshot().verdicts == {}
    records = read_audit(tmp_path / "audit.log")
    assert len(records) == len({(r.payload["raft_index"], r.payload["raft_event"]) for r in records}) == 9
