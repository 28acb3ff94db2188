"""Group commit in the audit log: `append_many` makes many records durable with one fsync and one head
update, and a crash between the two leaves a log that reopens and verifies."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.guard import audit as audit_module
from mesh.guard.audit import AuditCorruptError, AuditLog, head_path, read_audit, record_hash, verify_audit
from mesh.identity.signing import canonical_json

N = 4
BATCH = 5


@pytest.fixture
def log_path(tmp_path):
    """N records written one by one, then a batch of BATCH records in one append_many."""
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        for i in range(N):
            log.append("held", {"n": i}, now=1000.0 + i)
        log.append_many([("applied", {"n": N + i}) for i in range(BATCH)], now=2000.0)
    return path


def set_head(path, seq):
    """The head file as a crash before the head update of the records after `seq` would leave it."""
    record = read_audit(path)[seq - 1]
    head_path(path).write_text(json.dumps({"seq": seq, "hash": record.hash}))


def test_a_batch_chains_like_single_appends(log_path):
    records = read_audit(log_path)
    assert [r.seq for r in records] == list(range(1, N + BATCH + 1))
    assert [r.payload["n"] for r in records] == list(range(N + BATCH))
    assert verify_audit(log_path).ok
    with AuditLog(log_path) as log:
        assert log.head == (N + BATCH, records[-1].hash)


def test_a_batch_is_one_write_one_fsync_of_the_log_and_one_head_update(tmp_path, monkeypatch):
    path = tmp_path / "a.log"
    log = AuditLog(path)
    synced, writes = [], []
    real_fsync, real_write = os.fsync, os.write

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def write(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(path):
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    log.append_many([("applied", {"n": i}) for i in range(10)], now=1.0)
    log.close()
    assert synced[0] == str(path) and synced.count(str(path)) == 1  # the records, before anything else
    assert len(writes) == 1 and writes[0].count(b"\n") == 10
    assert str(path.parent) in synced  # the head's rename
    assert json.loads(head_path(path).read_text())["seq"] == 10


def test_a_batch_over_the_limit_is_synced_in_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_module, "MAX_RECORDS_PER_SYNC", 3)
    path = tmp_path / "a.log"
    heads = []
    real = audit_module._write_head
    monkeypatch.setattr(
        audit_module, "_write_head", lambda p, seq, digest: (heads.append(seq), real(p, seq, digest))
    )
    with AuditLog(path) as log:
        log.append_many([("applied", {"n": i}) for i in range(7)])
    assert heads[-3:] == [3, 6, 7]
    assert verify_audit(path).ok


def test_crash_between_a_batch_and_its_head_is_accepted_and_recovered(log_path):
    set_head(log_path, N)  # the batch is on disk, its head update is not
    assert verify_audit(log_path).ok
    with AuditLog(log_path) as log:
        assert log.head[0] == N + BATCH
        log.append("applied", {"after": "recovery"})
    assert json.loads(head_path(log_path).read_text())["seq"] == N + BATCH + 1
    assert verify_audit(log_path).ok


def test_a_head_further_behind_than_one_batch_is_refused(log_path, monkeypatch):
    monkeypatch.setattr(audit_module, "MAX_RECORDS_PER_SYNC", BATCH - 1)
    set_head(log_path, N)
    verdict = verify_audit(log_path)
    assert not verdict.ok and "ahead of its head file" in verdict.reason and verdict.first_bad_seq == N + 1
    with pytest.raises(AuditCorruptError, match="head file records seq"):
        AuditLog(log_path)


def test_a_lagging_head_that_does_not_chain_is_refused(log_path):
    head_path(log_path).write_text(json.dumps({"seq": N, "hash": "ab" * 32}))  # rewritten, not a crash
    assert not verify_audit(log_path).ok
    with pytest.raises(AuditCorruptError):
        AuditLog(log_path)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=4,
    ),
    seq=st.integers(1, 10**9),
)
def test_a_record_line_is_the_canonical_json_of_the_record(payload, seq):
    body = {"seq": seq, "time": 1234.5, "kind": "applied", "payload": payload, "prev": "ab" * 32}
    digest = record_hash(body)
    line = audit_module._record_line(canonical_json(body), digest)
    assert line == canonical_json({**body, "hash": digest}) + b"\n"
