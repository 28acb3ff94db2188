"""What fleetmesh patches in pysyncobj (mesh/consensus/_pysyncobj_patch.py): each hook seen firing in a live
group of real members on loopback, and the import-time check that refuses any other pysyncobj."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pysyncobj.syncobj
import pysyncobj.version
import pytest
from pysyncobj.journal import FileJournal

import mesh.consensus.transport
from mesh._proto import raft_pb2, raft_pb2_grpc
from mesh.consensus import _pysyncobj_patch
from mesh.consensus._pysyncobj_patch import PYSYNCOBJ_VERSION, PysyncobjMismatch, check_pysyncobj, hook_counts
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
