"""A site group on a disk that fills up (a real tmpfs, filled to the last byte while it runs): the
process lives (pysyncobj writes its log through an mmap of a sparse file, where a page the disk
cannot back is a SIGBUS), proposals fail with an error instead of hanging, and once there is room
again the group decides on, every replica's audit chain verifies, and no record is missing."""

from __future__ import annotations

import asyncio
import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.consensus.ledger import Outcome
from mesh.consensus.raft import RaftError
from mesh.guard.audit import read_audit, verify_audit
from mesh.node.local import wait_for
from tests.consensus.harness import ROUTES, SiteCluster, move
from tests.disks import fill_to_the_last_byte

REPO = Path(__file__).resolve().parents[2]

# Fill the disk under a journal with entries in it, add more, free the disk, add more, read it back.
JOURNAL_ON_A_FULL_DISK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pysyncobj.journal import FileJournal
    from mesh.consensus._pysyncobj_patch import DurableFileJournal, JournalFullError
    from tests.disks import fill_to_the_last_byte
    disk, kind = Path(sys.argv[1]), sys.argv[2]
    journal = (DurableFileJournal if kind == "durable" else FileJournal)(str(disk / "raft.journal"))
    for i in range(1, 51):
        journal.add(b"x" * 100, i, 1)
    filler = fill_to_the_last_byte(disk)
    n = 50
    try:
        while n < 5000:
            journal.add(b"y" * 100, n + 1, 1)
            n += 1
    except JournalFullError as exc:
        print("refused:", exc)
    assert n < 5000, "the disk never filled"
    filler.unlink()
    for _ in range(300):
        journal.add(b"z" * 100, n + 1, 1)
        n += 1
    journal._destroy()
    again = FileJournal(str(disk / "raft.journal"))
    assert len(again) == n and [again[i][1] for i in range(n)] == list(range(1, n + 1)), "entries lost"
    print("entries:", n)
""")


def journal_on_a_full_disk(disk: Path, kind: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", JOURNAL_ON_A_FULL_DISK, str(disk), kind],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_durable_journal_refuses_an_entry_on_a_full_disk_and_goes_on_when_there_is_room(tiny_disk):
    done = journal_on_a_full_disk(tiny_disk(512), "durable")
    assert done.returncode == 0, done.stderr
    assert "refused: cannot grow the Raft journal" in done.stdout and "free disk space" in done.stdout
    assert "entries:" in done.stdout


def test_pysyncobjs_own_journal_dies_of_sigbus_on_a_full_disk(tiny_disk):
    """The fault the durable journal guards against, shown on plain pysyncobj (proves the setup)."""
    done = journal_on_a_full_disk(tiny_disk(512), "plain")
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)


def audited_entries(path) -> set[tuple[int, int]]:
    return {
        (r.payload["raft_index"], r.payload["raft_event"])
        for r in read_audit(path)
        if "raft_index" in r.payload
    }


@pytest.mark.asyncio
async def test_a_full_disk_fails_proposals_and_the_group_recovers_with_every_record(tiny_disk, fleet):
    disk = tiny_disk(4096)
    s = SiteCluster(disk / "site", fleet, 3)
    await s.open()
    try:
        groups = s.start_all()
        leader = await s.wait_leader()
        assert (await leader.set_routes(ROUTES)).outcome is Outcome.APPLIED
        filler = fill_to_the_last_byte(disk)

        # Decide until the journal has no room left (its file grows by doubling, so a few go through).
        side = ["node-1", "node-2"]
        refused = None
        for n in range(40):
            try:
                result = await leader.propose(
                    move(("cam-0", side[0], side[1]), nonce=f"full-{n:05d}"), timeout_s=2.0
                )
            except RaftError as exc:
                refused = exc
                break
            assert result.outcome is Outcome.APPLIED, result.message  # the audit record waits in memory
            side.reverse()
        assert refused is not None, "40 decisions went through on a full disk: the test did not fill it"

        filler.unlink()
        deadline = asyncio.get_running_loop().time() + 30.0
        attempt, outcomes = 0, []
        while True:  # the entry refused on the full disk may hold the leader up for a moment
            attempt += 1
            try:
                leader = await s.wait_leader()
                on = leader.routes()["cam-0"]
                to = "node-2" if on == "node-1" else "node-1"
                result = await leader.propose(
                    move(("cam-0", on, to), nonce=f"room-{attempt:05d}"), timeout_s=2.0
                )
                outcomes.append(result.outcome.value)
                if result.outcome is Outcome.APPLIED:
                    break
            except RaftError as exc:
                outcomes.append(type(exc).__name__)
            assert asyncio.get_running_loop().time() < deadline, f"no decision applied 30 s after: {outcomes}"
        await s.converged()
        for g in groups:
            await wait_for(
                lambda g=g: g.status()["audit_error"] is None,
                10.0,
                what=f"{g.node_id}'s audit log writes again",
            )
        await s.close_all()
        entries = []
        for g in groups:
            verdict = verify_audit(g.audit_path)
            assert verdict.ok, f"{g.node_id}: {verdict.reason}"
            entries.append(audited_entries(g.audit_path))
        assert entries[0] == entries[1] == entries[2], "a replica's audit lost records of applied entries"
    finally:
        await s.shutdown()


def test_a_journal_that_cannot_grow_for_another_reason_does_not_blame_the_disk(tmp_path, monkeypatch):
    """Growing the journal's mapping can fail with ENOMEM (or EIO): the refusal names that error rather
    than telling the operator to free disk space. (The OS call is made to fail: the test is about the
    message, a real full disk is above.)"""
    from mesh.consensus import _pysyncobj_patch
    from mesh.consensus._pysyncobj_patch import DurableFileJournal, JournalFullError

    journal = DurableFileJournal(str(tmp_path / "raft.journal"))
    journal.add(b"x" * 100, 1, 1)

    def no_memory(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(_pysyncobj_patch.os, "posix_fallocate", no_memory)
    with pytest.raises(JournalFullError) as refused:
        journal.add(b"y" * 100, 2, 1)
    assert "ENOMEM" in str(refused.value) and "free disk space" not in str(refused.value)
    monkeypatch.undo()
    journal.add(b"z" * 100, 2, 1)  # nothing was written by the refused entry
    assert [journal[i][1] for i in range(len(journal))] == [1, 2]
    journal._destroy()
