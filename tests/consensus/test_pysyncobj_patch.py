"""What fleetmesh patches in pysyncobj (mesh/consensus/_pysyncobj_patch.py): each hook seen firing in a live
group of real members on loopback, and the import-time check that refuses any other pysyncobj."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pysyncobj.syncobj
import pysyncobj.version
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pysyncobj.journal import FileJournal

import mesh.consensus.transport
from mesh._proto import raft_pb2, raft_pb2_grpc
from mesh.consensus import _pysyncobj_patch
from mesh.consensus._pysyncobj_patch import (
    PYSYNCOBJ_VERSION,
    PysyncobjMismatch,
    check_pysyncobj,
    grant_pre_vote,
    hook_counts,
)
from mesh.consensus.raft import RaftGroup, RaftTimings
from mesh.consensus.transport import GROUP_KEY
from mesh.consensus.wire import encode_message
from mesh.node.local import wait_for

REPO = Path(__file__).resolve().parents[2]


def counted(name: str, before: dict[str, int]) -> int:
    """How often hook `name` changed something since `before` (a `hook_counts()` taken earlier)."""
    return hook_counts().get(name, 0) - before.get(name, 0)


def votes(groups: list[RaftGroup]) -> dict[str, tuple[int, str | None]]:
    """(term, voted_for) each member's journal made durable in its .vote file."""
    out = {}
    for g in groups:
        path = g.data_dir / "raft.journal.vote"
        assert path.exists(), f"{path} is missing: {g.node_id} does not journal through DurableFileJournal"
        vote = json.loads(path.read_bytes())
        out[g.node_id] = (vote["term"], vote["voted_for"])
    return out


# --- the version pin ----------------------------------------------------------------------------


def test_the_installed_pysyncobj_is_the_pinned_one_with_every_hooked_internal():
    assert pysyncobj.version.VERSION == PYSYNCOBJ_VERSION
    assert _pysyncobj_patch.missing_internals() == []
    pin = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if '"pysyncobj' in line)
    assert pin.strip() == f'"pysyncobj=={PYSYNCOBJ_VERSION}",'


def test_the_internals_check_names_a_missing_method_and_a_changed_state_enum(monkeypatch):
    """PreVote calls name-mangled SyncObj methods and compares raft states by value: a pysyncobj
    without one of them, or with other state numbers, is named (the check fails on purpose here)."""
    monkeypatch.delattr(pysyncobj.syncobj.SyncObj, "_SyncObj__generateRaftTimeout")
    monkeypatch.setattr(pysyncobj.syncobj._RAFT_STATE, "LEADER", 7)
    missing = _pysyncobj_patch.missing_internals()
    assert "SyncObj._SyncObj__generateRaftTimeout" in missing
    assert "_RAFT_STATE.FOLLOWER/CANDIDATE/LEADER == 0/1/2" in missing


def test_another_pysyncobj_version_is_refused_naming_both(monkeypatch):
    monkeypatch.setattr(pysyncobj.version, "VERSION", "0.3.99")
    with pytest.raises(PysyncobjMismatch) as err:
        check_pysyncobj()
    message = str(err.value)
    assert "0.3.17" in message and "0.3.99" in message and "pysyncobj==0.3.17" in message


def test_importing_the_raft_layer_fails_loudly_with_another_pysyncobj():
    code = "import pysyncobj.version as v; v.VERSION = '0.4.0'; import mesh.consensus.raft"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mesh.consensus._pysyncobj_patch.PysyncobjMismatch:"), done.stderr
    assert "pysyncobj 0.3.17" in last and "pysyncobj 0.4.0 is installed" in last


@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (pysyncobj.syncobj, "createJournal", "pysyncobj.syncobj.createJournal"),
        (pysyncobj.syncobj, "pickle", "pysyncobj.syncobj.pickle"),
        (pysyncobj.syncobj.SyncObj, "_SyncObj__doApplyCommand", "SyncObj.__doApplyCommand"),
        (FileJournal, "deleteEntriesTo", "FileJournal.deleteEntriesTo"),
        (FileJournal, "setCurrentTerm", "FileJournal.setCurrentTerm"),
    ],
)
def test_a_missing_internal_is_refused_by_name(monkeypatch, owner, name, named):
    monkeypatch.delattr(owner, name)
    with pytest.raises(PysyncobjMismatch, match=named.replace(".", r"\.")):
        check_pysyncobj()


def test_a_renamed_syncobj_attribute_is_refused_by_name(monkeypatch):
    def renamed(self, *args, **kwargs):
        self.raft_log = None  # the name-mangled _SyncObj__raftLog is gone

    monkeypatch.setattr(pysyncobj.syncobj.SyncObj, "__init__", renamed)
    with pytest.raises(PysyncobjMismatch, match="SyncObj._SyncObj__raftLog"):
        check_pysyncobj()


# --- 1. the durable journal ---------------------------------------------------------------------


def test_durable_journal_fsyncs_the_vote_before_returning_and_reloads_it(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = str(tmp_path / "raft.journal")
    journal = _pysyncobj_patch.DurableFileJournal(path)
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (0, None)
    journal.setCurrentTerm(7, "127.0.0.1:1234")
    assert len(synced) >= 2  # the file and its directory
    journal.add(b"\x00cmd", 1, 7)
    journal.close()
    again = _pysyncobj_patch.DurableFileJournal(path)
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (7, "127.0.0.1:1234")
    assert again[0] == (b"\x00cmd", 1, 7)
    again.close()


def test_the_log_is_synced_with_fdatasync_on_its_file_once_per_change_or_per_group(tmp_path, monkeypatch):
    """fdatasync releases the GIL; CPython's mmap.flush (msync) holds it for the whole sync, so every thread
    of the node stood still on each log sync. Each change is synced before `add` returns, or once per
    `flush_pending` when deferred (group commit)."""
    synced: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    path = str(tmp_path / "raft.journal")
    journal = _pysyncobj_patch.DurableFileJournal(path)
    journal.add(b"\x00one", 1, 1)
    journal.add(b"\x00two", 2, 1)
    assert synced == [path, path] and journal.flushes == 2
    journal.close()
    synced.clear()
    deferred = _pysyncobj_patch.DurableFileJournal(path, defer_flush=True)
    deferred.add(b"\x00three", 3, 1)
    deferred.add(b"\x00four", 4, 1)
    assert synced == []
    deferred.flush_pending()
    deferred.flush_pending()  # nothing new: no sync
    assert synced == [path] and deferred.flushes == 1
    deferred.close()


@pytest.mark.asyncio
async def test_every_vote_of_a_live_group_is_made_durable_by_the_durable_journal(raft_cluster):
    """Only DurableFileJournal writes raft.journal.vote: after each election every member's file holds its
    current term, the leader's names itself, and a majority's name the leader."""
    c = await raft_cluster(3)
    groups = c.start_all()
    leader = await c.wait_leader()
    durable = votes(groups)
    assert all(durable[g.node_id][0] == g.raftCurrentTerm for g in groups)
    assert durable[leader.node_id] == (leader.raftCurrentTerm, leader.node_id)
    assert sum(vote == (leader.raftCurrentTerm, leader.node_id) for vote in durable.values()) >= 2

    # The leader dies: the survivors vote again, in a later term, and both votes are on disk.
    await c.close(leader)
    survivors = c.live()
    new = await c.wait_leader(survivors)
    assert new.raftCurrentTerm > leader.raftCurrentTerm
    assert set(votes(survivors).values()) == {(new.raftCurrentTerm, new.node_id)}


# --- 2. followers truncate only on a conflict; nextIndex moves back only on a failure ------------


def _log_view(entries: list[tuple[int, int]]):
    terms = dict(entries)
    return (lambda idx: terms.get(idx)), max(terms)


def _append(prev: tuple[int, int], entries: list[tuple[int, int]], term: int) -> dict:
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": 0,
        "prevLogIdx": prev[0],
        "prevLogTerm": prev[1],
        "entries": [(b"c", i, t) for i, t in entries],
    }


def test_follower_keeps_entries_that_match_the_leader_and_truncates_only_on_conflict():
    """pysyncobj deletes everything after prevLogIdx; Raft deletes only from the first conflict."""
    trim = _pysyncobj_patch.trim_append_entries
    follower = _log_view([(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)])
    # A re-sent, already-held range: nothing left to append, nothing after it deleted.
    out = trim(_append((2, 1), [(3, 2), (4, 2)], term=2), *follower)
    assert (out["prevLogIdx"], out["prevLogTerm"], out["entries"]) == (5, 2, [])
    # A stale heartbeat of the same leader keeps the leader's own later entries.
    out = trim(_append((3, 2), [], term=2), *follower)
    assert out["prevLogIdx"] == 5
    # New entries after held ones: only the new ones are handed on.
    out = trim(_append((3, 2), [(4, 2), (5, 2), (6, 2)], term=2), *follower)
    assert (out["prevLogIdx"], [e[1] for e in out["entries"]]) == (5, [6])
    # A conflict (index 4 has term 3 at the new leader): pysyncobj truncates from index 4.
    out = trim(_append((3, 2), [(4, 3)], term=3), *follower)
    assert (out["prevLogIdx"], [e[1:] for e in out["entries"]]) == (3, [(4, 3)])
    # A heartbeat from a newer leader cannot vouch for older-term entries: left to pysyncobj.
    msg = _append((3, 2), [], term=3)
    assert trim(msg, *follower) is msg
    # prevLogIdx not held with that term: pysyncobj's own failure reply.
    msg = _append((6, 2), [(7, 2)], term=2)
    assert trim(msg, *follower) is msg


@pytest.mark.asyncio
async def test_concurrent_proposals_never_truncate_applied_entries(raft_cluster, caplog, monkeypatch):
    # One entry per message, as plain pysyncobj sends them: many appends in flight at once, whose success
    # replies would move nextIndex back (merged appends leave too few in flight to show it reliably).
    monkeypatch.setattr(mesh.consensus.transport, "MAX_COALESCED_ENTRIES", 1)
    c = await raft_cluster(3, STEADY)
    assert not c.timings.batch_appends  # unbatched: each proposal goes out at once, many in flight
    groups = c.start_all()
    await c.wait_leader()
    before = hook_counts()
    with caplog.at_level("CRITICAL", logger="pysyncobj.syncobj"):
        sent = await propose_until(c, groups, "c", lambda: counted("next_index_kept", before) > 0)
    assert not [r for r in caplog.records if "truncating" in r.getMessage()]
    # keep_next_index fired: success replies of in-flight appends did not move nextIndex back.
    assert counted("next_index_kept", before) > 0, f"no success reply overtook an append in {sent} proposals"


# Rounds of 300 concurrent proposals keep the tick threads busy; on a loaded machine the default 0.2-0.4 s
# election timeout then elects a new leader mid-round, and a proposal in flight ends "may or may not have
# committed". These tests are about appends in flight, not failover: elections wait longer.
STEADY = RaftTimings(election_min_s=1.5, election_max_s=3.0, leader_fallback_s=3.0)


async def propose_until(c, groups, prefix: str, exercised, rounds: int = 5, per_round: int = 300) -> int:
    """Rounds of `per_round` concurrent proposals through every member until `exercised()` (at most
    `rounds`); after each, every entry proposed so far is in every member's log, once. Returns how many."""
    sent = 0
    for _ in range(rounds):
        batch = [f"{prefix}{sent + i}".encode() for i in range(per_round)]
        await asyncio.gather(*(groups[i % 3].propose(e, timeout_s=10.0) for i, e in enumerate(batch)))
        sent += per_round
        entries = await c.converged()
        assert sorted(entries) == sorted(f"{prefix}{i}".encode() for i in range(sent))
        if exercised():
            break
    return sent


@pytest.mark.asyncio
async def test_trim_append_entries_alone_keeps_acknowledged_entries_when_the_leader_resends(
    raft_cluster, caplog, monkeypatch
):
    """With keep_next_index switched off, success replies move the leader's nextIndex back and it re-sends
    in-flight ranges (as plain pysyncobj does): trim_append_entries rewrites those messages, and no
    follower drops an entry it has acknowledged."""

    def plain_pysyncobj(sync_obj, node, handle) -> bool:
        handle()
        return False

    monkeypatch.setattr(_pysyncobj_patch, "keep_next_index", plain_pysyncobj)
    # One entry per message, as plain pysyncobj sends them: merged appends leave fewer resends to trim.
    monkeypatch.setattr(mesh.consensus.transport, "MAX_COALESCED_ENTRIES", 1)
    c = await raft_cluster(3, STEADY)
    groups = c.start_all()
    await c.wait_leader()
    before = hook_counts()
    # Resends happen when replies overtake appends in flight: a matter of timing, so rounds of 300
    # until one shows it (the invariants below hold after every round).
    with caplog.at_level("CRITICAL", logger="pysyncobj.syncobj"):
        sent = await propose_until(c, groups, "t", lambda: counted("append_entries_trimmed", before) > 0)
    assert counted("append_entries_trimmed", before) > 0, "no round re-sent an acknowledged range"
    assert counted("next_index_kept", before) == 0
    assert sent
    assert not [r for r in caplog.records if "truncating" in r.getMessage()]


# --- 3. log entries are read as plain values only ---------------------------------------------


class _FileGadget:
    """Unpickling this would create `path` (a stand-in for any code a pickle can run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.asyncio
async def test_a_pickle_gadget_proposed_by_a_member_runs_nowhere_and_the_group_goes_on(raft_cluster,
                                                                                        tmp_path):
    """A member (valid certificate, hostile intent) forwards a command whose bytes are a pickle
    gadget; the leader appends it as any command, every replica reads it with the plain-value
    reader, skips it, and keeps committing."""
    c = await raft_cluster(3)
    groups = c.start_all()
    leader = await c.wait_leader()
    marker = tmp_path / "pwned"
    gadget = b"\x00" + pickle.dumps((0, (_FileGadget(str(marker)),), {}), protocol=2)
    before = hook_counts().get("unsafe_pickle_refused", 0)
    hostile = next(g for g in groups if g is not leader)
    endpoint = c.endpoints[hostile.node_id]
    stub = raft_pb2_grpc.RaftStub(endpoint.channels.channel(c.endpoints[leader.node_id].address,
                                                            leader.node_id))
    call = stub.Exchange(metadata=((GROUP_KEY, c.group),))
    assert (await call.read()).node_id == leader.node_id  # accepted: it is a member
    await call.write(raft_pb2.RaftBatch(
        frames=[encode_message({"type": "apply_command", "command": gadget})]))
    await wait_for(lambda: hook_counts().get("unsafe_pickle_refused", 0) >= before + 3, 10.0,
                   "every replica refused the entry")
    call.cancel()
    await leader.propose(b"after")
    assert await c.converged() == [b"after"]
    assert not marker.exists()


# --- 4. PreVote: a member that restarts or comes back from a partition does not depose the leader ------

_terms = st.integers(min_value=0, max_value=50)
_logs = st.tuples(_terms, st.integers(min_value=0, max_value=500))


Member = tuple[int, tuple[int, int]]  # (term, (last log term, last log index))


def _grant(candidate: Member, voter: Member, contact: float) -> bool:
    """Does `voter` (term, log) grant `candidate` (term, log) a pre-vote for its next term?"""
    return grant_pre_vote(
        proposed_term=candidate[0] + 1,
        candidate_log=candidate[1],
        own_term=voter[0],
        own_log=voter[1],
        leader_contact_s=contact,
        min_timeout_s=0.2,
    )


_members = st.tuples(_terms, _logs)


@given(candidate=_members, voter=_members, contact=st.floats(0, 0.199))
def test_a_member_not_ahead_in_term_never_wins_a_pre_vote_while_a_leader_is_heard(candidate, voter, contact):
    """What PreVote is for: a restarted or returning member, whatever its log, cannot start an election
    that deposes a leader the voters still hear."""
    if candidate[0] <= voter[0]:
        assert not _grant(candidate, voter, contact)


@given(proposed=_terms, own=_terms, candidate_log=_logs, own_log=_logs, contact=st.floats(0, 5))
def test_a_pre_vote_for_a_term_not_past_ours_is_never_granted(proposed, own, candidate_log, own_log, contact):
    granted = grant_pre_vote(
        proposed_term=proposed,
        candidate_log=candidate_log,
        own_term=own,
        own_log=own_log,
        leader_contact_s=contact,
        min_timeout_s=0.2,
    )
    assert not (granted and proposed <= own)


@given(a=_members, b=_members, contact=st.floats(0.2, 5))
def test_with_no_leader_one_of_any_two_members_can_win_the_others_pre_vote(a, b, contact):
    """Liveness with one member down in three: whatever their terms and logs, one of the two live members
    gets the other's grant (with a rule that refused older logs outright, a member ahead in term but
    behind in log and one with the newer log but a lower term refused each other for good)."""
    assert _grant(a, b, contact) or _grant(b, a, contact)


def test_the_term_log_inversion_resolves():
    leader_gone = 1.0
    a = (5, (5, 10))  # the old leader's term, with entries nobody else has
    b = (6, (5, 8))  # won a round, raised its term; its vote requests were lost
    assert not _grant(a, b, leader_gone)  # a's round for term 6 is not past b's term
    assert _grant(b, a, leader_gone)  # b's election lifts a to term 7; a then refuses it the vote ...
    assert _grant((7, (5, 10)), (7, (5, 8)), leader_gone)  # ... and wins the next round with its newer log


@dataclasses.dataclass(frozen=True)
class _Node:
    id: str


class _FakeSyncObj:
    """The pysyncobj state PreVote reads and writes (name-mangled as in SyncObj), and what it sent."""

    def __init__(self, term: int = 3, log: tuple[int, int] = (3, 10)) -> None:
        self._SyncObj__raftState = 0  # follower
        self._SyncObj__selfNode = _Node("a")
        self._SyncObj__otherNodes = {_Node("b"), _Node("c")}
        self._SyncObj__raftCurrentTerm = term
        self._SyncObj__raftElectionDeadline = 0.0  # passed
        self._SyncObj__transferInProgress = False
        self._SyncObj__raftLeader = _Node("b")
        self._SyncObj__transport = self
        self.log = log
        self.sent: list[tuple[str, dict]] = []
        self.leader_changes = 0

    def send(self, node: _Node, message: dict) -> bool:
        self.sent.append((node.id, message))
        return True

    def _SyncObj__connectedToAnyone(self) -> bool:
        return True

    def _SyncObj__generateRaftTimeout(self) -> float:
        return 0.3

    def _SyncObj__getCurrentLogTerm(self) -> int:
        return self.log[0]

    def _SyncObj__getCurrentLogIndex(self) -> int:
        return self.log[1]

    def _SyncObj__onLeaderChanged(self) -> None:
        self.leader_changes += 1


def _pre_vote(contact_s: list[float]) -> tuple[_FakeSyncObj, _pysyncobj_patch.PreVote]:
    so = _FakeSyncObj()
    return so, _pysyncobj_patch.PreVote(so, lambda: contact_s[0], 0.2)


def test_a_timed_out_follower_asks_instead_of_raising_its_term_and_drops_its_leader():
    so, pv = _pre_vote([5.0])
    pv.before_tick()
    assert so._SyncObj__raftCurrentTerm == 3, "a pre-vote changes no term"
    assert so._SyncObj__raftElectionDeadline > 0, "pysyncobj's own election must not fire on this tick"
    assert so._SyncObj__raftLeader is None, "no leader taken for one while asking"
    assert so.leader_changes == 1, "commands forwarded to it fail as in an election"
    assert sorted(to for to, _ in so.sent) == ["b", "c"]
    assert {m["type"] for _, m in so.sent} == {"pre_vote"} and {m["term"] for _, m in so.sent} == {4}


def test_a_grant_for_the_round_under_way_wins_it_and_lets_the_election_go_ahead():
    so, pv = _pre_vote([5.0])
    pv.before_tick()
    (round_,) = {m["round"] for _, m in so.sent}
    pv.receive(_Node("b"), {"type": "pre_vote_response", "term": 4, "round": round_, "granted": True})
    assert so._SyncObj__raftElectionDeadline == 0, "won: pysyncobj's election starts on the next tick"
    so.sent.clear()
    pv.before_tick()
    assert so.sent == [], "no second round: the won election goes ahead"


def test_a_grant_from_an_earlier_round_or_after_a_leader_was_heard_wins_nothing():
    contact = [5.0]
    so, pv = _pre_vote(contact)
    pv.before_tick()
    first = max(m["round"] for _, m in so.sent)
    so._SyncObj__raftElectionDeadline = 0.0
    pv.before_tick()  # a second round, at the same term
    pv.receive(_Node("b"), {"type": "pre_vote_response", "term": 4, "round": first, "granted": True})
    assert so._SyncObj__raftElectionDeadline > 0, "a grant for an earlier round counted"
    contact[0] = 0.0  # the leader had only stalled: its append arrived after the round began
    pv.receive(_Node("c"), {"type": "pre_vote_response", "term": 4, "round": first + 1, "granted": True})
    assert so._SyncObj__raftElectionDeadline > 0, "a late grant deposed a leader that was heard again"


def test_malformed_pre_votes_get_no_answer():
    so, pv = _pre_vote([5.0])
    for message in (
        {"type": "pre_vote", "term": 9, "round": 1, "last_log_term": "3", "last_log_index": 10},
        {"type": "pre_vote", "term": True, "round": 1, "last_log_term": 3, "last_log_index": 10},
        {"type": "pre_vote", "term": 9, "last_log_term": 3, "last_log_index": 10},
    ):
        pv.receive(_Node("b"), message)
    assert so.sent == []
    good = {"type": "pre_vote", "term": 9, "round": 1, "last_log_term": 3, "last_log_index": 10}
    pv.receive(_Node("b"), good)
    assert so.sent == [("b", {"type": "pre_vote_response", "term": 9, "round": 1, "granted": True})]


def _term_and_leader(groups: list[RaftGroup]) -> set[tuple[int, str | None]]:
    return {(g.raftCurrentTerm, g.leader_id) for g in groups}


def _timings(pre_vote: bool) -> RaftTimings:
    """Five times the default timeouts: what is asserted is that no election happens for seconds, and on
    a loaded machine a leader's tick thread can stall past 0.2 s (every follower then times out at once,
    and PreVote rightly lets them elect). The outages below are longer than the longest timeout."""
    return RaftTimings(pre_vote=pre_vote, election_min_s=1.0, election_max_s=2.0, leader_fallback_s=2.0)


@pytest.mark.parametrize("pre_vote", [True, False], ids=["pre-vote", "plain-pysyncobj"])
@pytest.mark.asyncio
async def test_a_restarted_follower_rejoins_without_deposing_the_leader(raft_cluster, pre_vote):
    """A follower whose process restarts (its port gone for a second) times out before the leader's
    stream reaches it again: the leader re-dials after a back-off of up to about two seconds, longer
    than the default election timeout (made certain here by keeping the two apart for longer than the
    longest timeout after the start). With
    PreVote the others, who still hear the leader, refuse it, and it rejoins at the same term under
    the same leader; plain pysyncobj (the control) raises the term and holds an election."""
    c = await raft_cluster(3, _timings(pre_vote))
    c.start_all()
    leader = await c.caught_up()
    term = leader.raftCurrentTerm
    follower = next(g for g in c.live() if g is not leader)
    index = c.names.index(follower.node_id)
    before = hook_counts()
    for round_ in range(2):
        lead = await c.caught_up()
        await c.close(follower)
        port = await c.stop_endpoint(follower.node_id)
        await asyncio.sleep(1.0)  # how long the node is down: the scenario, not a wait for anything
        await c.add_endpoint(follower.node_id, port)
        follower = c.start(index)
        follower.cut(lead.node_id)
        lead.cut(follower.node_id)
        await asyncio.sleep(2.5)  # the leader's re-dial back-off, past the longest election timeout
        follower.heal()
        lead.heal()
        await (await c.caught_up()).propose(b"after restart %d" % round_)
        await c.converged()
    if pre_vote:
        assert _term_and_leader(c.live()) == {(term, leader.node_id)}
        assert counted("pre_vote_refused", before) >= 1, "the restarted member never asked: nothing shown"
    else:
        assert max(g.raftCurrentTerm for g in c.live()) > term


@pytest.mark.parametrize("pre_vote", [True, False], ids=["pre-vote", "plain-pysyncobj"])
@pytest.mark.asyncio
async def test_a_follower_back_from_a_partition_does_not_depose_the_leader(raft_cluster, pre_vote):
    """A follower cut off for 5 s (2.5-5 election timeouts) cannot win a pre-vote, so it keeps its
    term and rejoins when the partition heals; plain pysyncobj's follower raises its term with every
    timeout, and its vote requests depose the leader on the heal (the control)."""
    c = await raft_cluster(3, _timings(pre_vote))
    groups = c.start_all()
    leader = await c.caught_up()
    term = leader.raftCurrentTerm
    follower = next(g for g in groups if g is not leader)
    others = [g.node_id for g in groups if g is not follower]
    follower.cut(*others)
    for g in groups:
        if g is not follower:
            g.cut(follower.node_id)
    before = hook_counts()
    await asyncio.sleep(5.0)  # the partition's length: what is measured is what it leads to
    for g in groups:
        g.heal()
    await leader.propose(b"after the partition")
    await c.converged()
    if pre_vote:
        assert _term_and_leader(groups) == {(term, leader.node_id)}
        assert counted("pre_vote_started", before) >= 1, "the cut-off member never asked: nothing shown"
    else:
        assert max(g.raftCurrentTerm for g in groups) > term
