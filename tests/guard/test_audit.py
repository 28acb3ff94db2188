"""The hash-chained audit log: durable appends; verify names the first bad record for every kind of damage."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.guard.audit import (
    GENESIS_HASH,
    MAX_RECORDS_PER_SYNC,
    AuditCorruptError,
    AuditEvent,
    AuditLog,
    AuditReadError,
    AuditWriteError,
    head_path,
    read_audit,
    verify_audit,
)
from tests.disks import fill_to_the_last_byte

N = 5
KINDS = ["proposed", "held", "approved", "applied", "model_activated"]


@pytest.fixture
def log_path(tmp_path):
    """A log of N records (seq 1..N)."""
    path = tmp_path / "audit" / "guard.log"
    with AuditLog(path) as log:
        for i in range(N):
            log.append(KINDS[i], {"decision_id": f"{i:016x}", "n": i}, now=1000.0 + i)
    return path


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path, rows):
    path.write_bytes(b"".join(rows))


def test_intact_log_verifies(log_path):
    verdict = verify_audit(log_path)
    assert verdict.ok, verdict.reason
    assert verdict.records == N and verdict.first_bad_seq is None
    records = read_audit(log_path)
    assert [r.seq for r in records] == list(range(1, N + 1))
    assert records[0].prev == GENESIS_HASH
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))
    assert [r.kind for r in records] == KINDS
    assert verdict.head_hash == records[-1].hash


def test_reopening_continues_the_chain(log_path):
    with AuditLog(log_path) as log:
        assert log.head == (N, read_audit(log_path)[-1].hash)
        record = log.append_events([AuditEvent("denied", {"key_id": "ab" * 8})], now=2000.0)[0]
    assert record.seq == N + 1 and record.prev == read_audit(log_path)[N - 1].hash
    assert verify_audit(log_path).ok and verify_audit(log_path).records == N + 1


def test_empty_log_verifies(tmp_path):
    AuditLog(tmp_path / "a.log").close()
    verdict = verify_audit(tmp_path / "a.log")
    assert verdict.ok and verdict.records == 0


@pytest.mark.parametrize("seq", range(1, N + 1))
def test_edited_record_is_named(log_path, seq):
    rows = lines(log_path)
    doc = json.loads(rows[seq - 1])
    doc["payload"]["n"] = 99
    rows[seq - 1] = json.dumps(doc).encode() + b"\n"
    write_lines(log_path, rows)
    verdict = verify_audit(log_path)
    assert not verdict.ok
    assert verdict.first_bad_seq == seq
    assert "edited" in verdict.reason
    assert verdict.records == seq - 1


@pytest.mark.parametrize("seq", range(1, N + 1))
def test_edit_with_recomputed_hash_breaks_the_next_link(log_path, seq):
    """An editor who also fixes the record's own hash breaks the chain at the next record (or the head)."""
    from mesh.guard.audit import record_hash

    rows = lines(log_path)
    doc = json.loads(rows[seq - 1])
    doc["kind"] = "applied"
    doc["payload"] = {"forged": True}
    doc["hash"] = record_hash({k: v for k, v in doc.items() if k != "hash"})
    rows[seq - 1] = json.dumps(doc).encode() + b"\n"
    write_lines(log_path, rows)
    verdict = verify_audit(log_path)
    assert not verdict.ok
    assert verdict.first_bad_seq == (seq + 1 if seq < N else N)


@pytest.mark.parametrize("seq", range(1, N + 1))
def test_deleted_record_is_named(log_path, seq):
    rows = lines(log_path)
    del rows[seq - 1]
    write_lines(log_path, rows)
    verdict = verify_audit(log_path)
    assert not verdict.ok
    assert verdict.first_bad_seq == seq
    assert ("missing" in verdict.reason) or ("dropped" in verdict.reason)


@pytest.mark.parametrize("seq", range(1, N))
def test_reordered_records_are_named(log_path, seq):
    rows = lines(log_path)
    rows[seq - 1], rows[seq] = rows[seq], rows[seq - 1]
    write_lines(log_path, rows)
    verdict = verify_audit(log_path)
    assert not verdict.ok
    assert verdict.first_bad_seq == seq
    assert "out of order" in verdict.reason or "missing" in verdict.reason


def test_truncation_at_every_byte_is_detected(log_path):
    data = log_path.read_bytes()
    ends = []  # byte offset where each record's line ends
    for row in lines(log_path):
        ends.append((ends[-1] if ends else 0) + len(row))
    for cut in range(len(data)):
        log_path.write_bytes(data[:cut])
        verdict = verify_audit(log_path)
        complete = sum(1 for e in ends if e <= cut)
        assert not verdict.ok, f"cut at byte {cut} went unnoticed"
        assert verdict.first_bad_seq == complete + 1, (cut, verdict)
        assert verdict.records == complete


def test_dropping_the_tail_and_the_head_file_is_still_flagged(log_path):
    rows = lines(log_path)
    write_lines(log_path, rows[:2])
    head_path(log_path).unlink()
    verdict = verify_audit(log_path)
    assert not verdict.ok and "head file" in verdict.reason and verdict.first_bad_seq == 3


def test_expected_head_catches_a_rewritten_head_file(log_path):
    """Cut the tail and rewrite the head to match: only a head kept elsewhere shows it."""
    with AuditLog(log_path) as log:
        kept_elsewhere = log.head
    rows = lines(log_path)
    write_lines(log_path, rows[:3])
    last = json.loads(rows[2])
    head_path(log_path).write_text(json.dumps({"seq": 3, "hash": last["hash"]}))
    assert verify_audit(log_path).ok  # the documented limit of a local head file
    verdict = verify_audit(log_path, expected_head=kept_elsewhere)
    assert not verdict.ok and verdict.first_bad_seq == 4 and "expected head" in verdict.reason


def test_crash_between_record_and_head_is_accepted_and_recovered(log_path):
    """The record is fsynced before the head: after a crash the log may be one record ahead."""
    rows = lines(log_path)
    prev = json.loads(rows[-2])
    head_path(log_path).write_text(json.dumps({"seq": N - 1, "hash": prev["hash"]}))
    assert verify_audit(log_path).ok
    with AuditLog(log_path) as log:
        assert log.head[0] == N
    assert json.loads(head_path(log_path).read_text())["seq"] == N
    assert verify_audit(log_path).ok


def test_torn_unacknowledged_line_is_dropped_on_reopen_and_recorded(log_path):
    with open(log_path, "ab") as f:
        f.write(b'{"hash":"ab12')  # power loss in the middle of record N+1
    verdict = verify_audit(log_path)
    assert not verdict.ok and verdict.first_bad_seq == N + 1 and "torn" in verdict.reason
    with AuditLog(log_path) as log:
        log.append("applied", {"after": "recovery"}, now=3000.0)
    verdict = verify_audit(log_path)
    assert verdict.ok, verdict.reason
    kinds = [r.kind for r in read_audit(log_path)]
    assert kinds[N:] == ["log_recovered", "applied"]
    assert read_audit(log_path)[N].payload["dropped_bytes"] == len(b'{"hash":"ab12')


@pytest.mark.parametrize(
    "damage",
    ["cut_acknowledged", "edit_last", "no_head"],
)
def test_reopening_a_damaged_log_refuses(log_path, damage):
    rows = lines(log_path)
    if damage == "cut_acknowledged":
        write_lines(log_path, rows[:-1] + [rows[-1][:20]])
    elif damage == "edit_last":
        write_lines(log_path, rows[:-1] + [rows[-1].replace(b'"n":4', b'"n":5')])
    else:
        head_path(log_path).unlink()
    with pytest.raises(AuditCorruptError, match=str(log_path)):
        AuditLog(log_path)


def test_every_append_is_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "new" / "a.log"
    log = AuditLog(path)
    assert str(path.parent) in synced  # the directory entry of a new log is durable
    synced.clear()
    log.append("held", {}, now=1.0)
    log.close()
    assert synced[0] == str(path)  # the record, before anything else
    assert str(head_path(path)) in synced or any(s.endswith(".head.tmp" + str(os.getpid())) for s in synced)
    assert str(path.parent) in synced


def test_write_errors_name_the_path(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(AuditWriteError, match="not-a-dir"):
        AuditLog(blocker / "a.log")


def test_append_after_the_disk_fails_raises_a_typed_error(tmp_path):
    path = tmp_path / "a.log"
    log = AuditLog(path)
    # The disk fills up under the open log: its descriptor now writes to /dev/full (ENOSPC).
    real = os.path.realpath(path)
    (fd,) = [int(f.name) for f in Path("/proc/self/fd").iterdir() if os.path.realpath(f) == real]
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, fd)
    finally:
        os.close(full)
    with pytest.raises(AuditWriteError, match="a.log"):
        log.append("held", {}, now=1.0)
    log.close()


def test_a_full_disk_delays_records_but_never_breaks_the_chain(tiny_disk):
    # A real tmpfs: the kernel takes what fits of a write (part of a record) before ENOSPC.
    disk = tiny_disk(256)
    path = disk / "a.log"
    log = AuditLog(path)
    for i in range(10):
        log.append("held", {"i": i}, now=1.0)
    filler = fill_to_the_last_byte(disk)
    refused = 0
    for _ in range(20):
        try:
            log.append("held", {"i": "x" * 700}, now=2.0)
        except AuditWriteError as exc:
            refused += 1
            assert "free disk space" in str(exc) or "head" in str(exc), exc
    assert refused, "the disk was full, yet every append succeeded"
    assert verify_audit(path).ok, "a refused append left part of a record behind"
    filler.unlink()
    log.append("released", {"after": True}, now=3.0)
    log.close()
    verdict = verify_audit(path)
    assert verdict.ok, verdict.reason
    records = read_audit(path)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert records[-1].kind == "released"
    AuditLog(path).close()  # reopens: nothing torn, nothing dropped


def test_a_long_append_that_fails_part_way_says_how_many_records_are_durable(tmp_path, monkeypatch):
    import mesh.guard.audit as audit_module

    path = tmp_path / "a.log"
    log = AuditLog(path)

    def no_head(*args, **kwargs):
        raise AuditWriteError("cannot write audit head file: No space left on device")

    monkeypatch.setattr(audit_module, "_write_head", no_head)
    entries = [("held", {"i": i}) for i in range(MAX_RECORDS_PER_SYNC + 10)]
    with pytest.raises(AuditWriteError) as failed:
        log.append_many(entries, now=1.0, defer_head=True)
    assert failed.value.written == MAX_RECORDS_PER_SYNC == len(read_audit(path))


def test_a_partial_record_that_cannot_be_cut_off_stops_appends_with_a_clear_error(tmp_path):
    path = tmp_path / "a.log"
    log = AuditLog(path)
    log.append("held", {}, now=1.0)
    real = os.path.realpath(path)
    (fd,) = [int(f.name) for f in Path("/proc/self/fd").iterdir() if os.path.realpath(f) == real]
    full = os.open("/dev/full", os.O_WRONLY)  # ENOSPC on write, and it cannot be truncated
    try:
        os.dup2(full, fd)
    finally:
        os.close(full)
    for _ in range(2):  # the second append refuses too, without writing after the partial record
        with pytest.raises(AuditWriteError, match="restart the node"):
            log.append("held", {}, now=2.0)
    log.close()


def test_missing_log_is_a_read_error(tmp_path):
    with pytest.raises(AuditReadError, match="no audit log"):
        verify_audit(tmp_path / "nothing.log")


def test_bad_kind_is_refused(tmp_path):
    with AuditLog(tmp_path / "a.log") as log, pytest.raises(ValueError, match="audit kind"):
        log.append("Not A Kind", {})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(max_size=80), max_size=4), position=st.integers(0, N))
def test_verify_never_crashes_on_garbage(log_path, garbage, position):
    original = log_path.read_bytes()
    try:
        rows = lines(log_path)
        rows[position:position] = [g + b"\n" for g in garbage]
        write_lines(log_path, rows)
        verdict = verify_audit(log_path)
        if garbage:
            assert not verdict.ok
            assert verdict.first_bad_seq == position + 1
    finally:
        log_path.write_bytes(original)
