"""`verify_tail`: the check a replica runs on its audit log at every start. Any edit to a record
in the window is reported with its seq; an intact log passes whatever the window's size."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.guard.audit import AuditLog, head_path, verify_audit, verify_tail

N = 40


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A log of N records (seq 1..N) and its head file, as bytes."""
    path = tmp_path_factory.mktemp("tail") / "audit.log"
    with AuditLog(path) as log:
        for i in range(N):
            log.append("held", {"decision_id": f"{i:016x}", "n": i, "pad": "x" * (i % 7)}, now=1000.0 + i)
    return path.read_bytes(), head_path(path).read_bytes()


def write(tmp_path, data: bytes, head: bytes):
    path = tmp_path / "audit.log"
    path.write_bytes(data)
    head_path(path).write_bytes(head)
    return path


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each record's line, newline excluded."""
    spans, start = [], 0
    for line in data.split(b"\n")[:-1]:
        spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def test_a_small_log_is_checked_whole(tmp_path, intact):
    path = write(tmp_path, *intact)
    v = verify_tail(path)
    assert (v.ok, v.records) == (True, N) and v.reason == f"{N} records, chain intact"
    assert v.head_hash == verify_audit(path).head_hash


def test_a_window_checks_only_the_last_records(tmp_path, intact):
    data, head = intact
    path = write(tmp_path, data, head)
    spans = record_spans(data)
    window = len(data) - spans[30][0]  # exactly records 31..N
    v = verify_tail(path, max_bytes=window)
    assert (v.ok, v.records) == (True, N - 30), v.reason
    assert v.reason == f"last {N - 30} records (seq 31..{N}) chain intact"
    # One byte less and record 31 no longer fits whole: it is left out, not read torn.
    assert verify_tail(path, max_bytes=window - 1).records == N - 31


def test_an_edit_before_the_window_is_not_seen_by_it_but_by_verify_audit(tmp_path, intact):
    data, head = intact
    doc = json.loads(data.split(b"\n")[4])
    doc["payload"]["n"] = 999
    lines = data.split(b"\n")
    lines[4] = json.dumps(doc, separators=(",", ":")).encode()
    path = write(tmp_path, b"\n".join(lines), head)
    assert verify_tail(path, max_bytes=len(data) // 2).ok
    v = verify_audit(path)
    assert (v.ok, v.first_bad_seq) == (False, 5)
    v = verify_tail(path)  # the default window holds this whole log
    assert (v.ok, v.first_bad_seq) == (False, 5) and "edited" in v.reason


def test_records_dropped_from_the_end_are_reported(tmp_path, intact):
    data, head = intact
    spans = record_spans(data)
    path = write(tmp_path, data[: spans[-3][0]], head)
    v = verify_tail(path, max_bytes=len(data) // 3)
    assert (v.ok, v.first_bad_seq) == (False, N - 2) and "dropped" in v.reason


def test_an_edited_seq_in_a_window_of_one_record_names_the_record_by_its_place(tmp_path, intact):
    # Hypothesis found it: the window held only record 40, whose seq was edited to 50; with one record
    # to vote, the report named "record 50". The head file's hash anchors the record at seq 40.
    data, head = intact
    start, end = record_spans(data)[-1]
    line = data[start:end].replace(f'"seq":{N},'.encode(), f'"seq":{N + 10},'.encode())
    edited = data[:start] + line + b"\n"
    assert edited != data
    v = verify_tail(write(tmp_path, edited, head), max_bytes=end - start + 1)
    assert (v.ok, v.first_bad_seq) == (False, N), v.reason


@pytest.mark.parametrize("window", [252, 600, 2500])
def test_byte_flips_across_the_window_name_their_record(tmp_path, intact, window):
    # The sweep behind the property test above, deterministic: seq digits, newlines (a line split in
    # two, after which lines are shifted) and plain flips, every third byte of every record in the window.
    log, head = intact
    spans = record_spans(log)
    inside = [(s, e) for s, e in spans if s >= len(log) - window]
    wrong = []
    for start, end in inside:
        seq = spans.index((start, end)) + 1
        for offset in range(start, end, 3):
            for flip in {1, log[offset] ^ ord("\n")} - {0}:
                edited = bytearray(log)
                edited[offset] ^= flip
                v = verify_tail(write(tmp_path, bytes(edited), head), max_bytes=window)
                named = {seq} if edited[offset] != ord("\n") else {seq - 1, seq, seq + 1}
                if v.ok or v.first_bad_seq not in named:
                    wrong.append((offset, flip, seq, v.first_bad_seq, v.reason))
    assert inside and not wrong, wrong[:3]


def test_a_record_longer_than_the_window_falls_back_to_the_whole_log(tmp_path, intact):
    path = write(tmp_path, *intact)
    v = verify_tail(path, max_bytes=10)
    assert (v.ok, v.records) == (True, N)


def test_max_bytes_must_be_positive(tmp_path, intact):
    with pytest.raises(ValueError, match="positive"):
        verify_tail(write(tmp_path, *intact), max_bytes=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_changed_byte_of_a_record_inside_the_window_is_caught(tmp_path_factory, intact, data):
    log, head = intact
    spans = record_spans(log)
    window = data.draw(st.integers(min_value=1, max_value=len(log) + 10), label="max_bytes")
    inside = [(s, e) for s, e in spans if s >= len(log) - window]
    if not inside:  # the window holds no whole record: verify_tail reads the whole log
        inside = spans
    start, end = data.draw(st.sampled_from(inside), label="record")
    offset = data.draw(st.integers(min_value=start, max_value=end - 1), label="offset")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    edited = bytearray(log)
    edited[offset] ^= flip
    path = write(tmp_path_factory.mktemp("flip"), bytes(edited), head)
    v = verify_tail(path, max_bytes=window)
    seq = spans.index((start, end)) + 1
    assert not v.ok, f"byte {offset} (record {seq}) ^ {flip} went unnoticed with a {window}-byte window"
    # A byte turned into a newline splits the record in two lines, and the seqs around it may be named.
    named = {seq} if edited[offset] != ord("\n") else {seq - 1, seq, seq + 1}
    assert v.first_bad_seq in named, (v.first_bad_seq, seq, v.reason)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(window=st.integers(min_value=1, max_value=4096))
def test_an_intact_log_passes_with_any_window(tmp_path_factory, intact, window):
    v = verify_tail(write(tmp_path_factory.mktemp("ok"), *intact), max_bytes=window)
    assert v.ok, (window, v.reason)
