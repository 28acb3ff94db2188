"""The guard's audit trail: an append-only, hash-chained log of JSON lines, fsynced.

Each line is one record: `seq` (1, 2, 3, ...), `time` (wall-clock seconds),
`kind` (proposed, held, approved, denied, refused, applied, expired,
model_activated, ...), `payload` (an object), `prev` (the previous record's
hash; 64 zeros for the first) and `hash` (sha256 of the canonical JSON of the
record without `hash`). Changing, deleting or reordering any record breaks
the chain at that record, and `verify_audit` names it.

What the chain alone cannot show: records dropped from the END. A shorter
log is still a valid chain. So the log keeps a sidecar head file
(`<log>.head`: last seq and hash, written atomically and fsynced after every
append) and `verify_audit` checks the log against it. The head file is made
before the log, so a missing head file is itself evidence. This raises the
bar, it does not remove it: someone who can rewrite both files can still cut
the tail. The complete answer is to keep the head somewhere else as well
(print it with `AuditLog.head`, gossip it, or pass it as `expected_head`).

Crash safety: a record is fsynced before the head is advanced, so after a
power loss the log may be ahead of the head by the records of one append
(accepted: one record for `append`, at most `MAX_RECORDS_PER_SYNC` for
`append_many`) or end in a torn line that was never acknowledged. Reopening
drops such a torn line and records that it did so; a torn or missing record
the head already covers is damage, and reopening refuses it
(`AuditCorruptError`).

Group commit: `append_many` writes many records with one write, one fsync
and one head update, for a writer (a Raft replica applying a batch of
entries) that acknowledges none of them before it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from mesh.durable import fsync_dir
from mesh.guard.core import GuardError, is_sha256_hex
from mesh.identity.signing import canonical_json

GENESIS_HASH = "0" * 64
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_RECORD_FIELDS = frozenset({"seq", "time", "kind", "payload", "prev", "hash"})
_FILE_MODE = 0o640
#: Records that one `append_many` makes durable with a single fsync and head update; after a crash the log
#: may be ahead of its head file by at most this many records (the records of one interrupted append).
MAX_RECORDS_PER_SYNC = 1024

log = logging.getLogger(__name__)


class AuditError(GuardError):
    """Root of audit log errors."""


class AuditWriteError(AuditError):
    """The audit log could not be written (names the file and the OS error). `written`: how many of the
    records of the failed call are durable all the same (the first chunks of a long append)."""

    written: int = 0


class AuditReadError(AuditError):
    """The audit log could not be read."""


class AuditCorruptError(AuditError):
    """The audit log on disk is damaged or was tampered with; run `mesh admin audit verify`."""


@dataclass(frozen=True)
class AuditEvent:
    """Something the guard or the ledger wants on the record; the log gives it a seq, time and hash."""

    kind: str
    payload: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "payload": dict(self.payload)}


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: float
    kind: str
    payload: Mapping[str, Any]
    prev: str
    hash: str

    def body(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "payload": dict(self.payload),
            "prev": self.prev,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}

    def expected_hash(self) -> str:
        return record_hash(self.body())


def record_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(body))).hexdigest()


def _record_line(canonical_body: bytes, digest: str) -> bytes:
    """canonical_json({**body, "hash": digest}) + newline, from the canonical bytes of `body`: "hash"
    sorts before every other field, so it only goes in front (one encoding per record, not two)."""
    return b'{"hash":"' + digest.encode("ascii") + b'",' + canonical_body[1:] + b"\n"


class _BadRecord(Exception):
    """One line of the log is not a well-formed record."""


def _parse_record(line: bytes) -> AuditRecord:
    """Parse one line into a record; raise _BadRecord saying what is wrong (not whether it chains)."""
    try:
        doc = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _BadRecord(f"not a JSON record ({exc})") from None
    if not isinstance(doc, dict) or doc.keys() != _RECORD_FIELDS:
        raise _BadRecord(f"expected an object with fields {', '.join(sorted(_RECORD_FIELDS))}")
    if type(doc["seq"]) is not int or doc["seq"] < 1:
        raise _BadRecord("seq must be a whole number >= 1")
    if type(doc["time"]) not in (int, float):
        raise _BadRecord("time must be a number")
    if not isinstance(doc["kind"], str) or not _KIND_RE.fullmatch(doc["kind"]):
        raise _BadRecord("kind must be a lower-case name")
    if not isinstance(doc["payload"], dict):
        raise _BadRecord("payload must be an object")
    if not is_sha256_hex(doc["prev"]) or not is_sha256_hex(doc["hash"]):
        raise _BadRecord("prev and hash must be sha256 hex digests")
    record = AuditRecord(doc["seq"], doc["time"], doc["kind"], doc["payload"], doc["prev"], doc["hash"])
    try:
        record.expected_hash()
    except (ValueError, TypeError) as exc:  # 1e400 parses as inf; "\ud800" is not encodable
        raise _BadRecord(f"a value cannot be hashed canonically ({exc})") from None
    return record


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def head_path(path: Path) -> Path:
    """Where the sidecar head file of log `path` lives."""
    path = Path(path)
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> tuple[int, str] | None:
    """Return (seq, hash) from the head file, None if it is absent; raise AuditCorruptError if unreadable."""
    hp = head_path(path)
    try:
        raw = hp.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditReadError(f"cannot read audit head file {hp}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        seq, digest = doc["seq"], doc["hash"]
        if type(seq) is not int or seq < 0 or not is_sha256_hex(digest) or doc.keys() != {"seq", "hash"}:
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AuditCorruptError(f"audit head file {hp} is not a valid head record") from None
    return seq, digest


def _write_head(path: Path, seq: int, digest: str) -> None:
    hp = head_path(path)
    tmp = hp.with_name(f".{hp.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(canonical_json({"seq": seq, "hash": digest}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, hp)
        fsync_dir(hp.parent)
    except OSError as exc:
        raise AuditWriteError(f"cannot write audit head file {hp}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class AuditVerdict:
    """Result of `verify_audit`: ok, how many records chain, and the first bad seq with the reason."""

    ok: bool
    records: int
    first_bad_seq: int | None
    reason: str
    head_hash: str = GENESIS_HASH  # hash of the last good record: give it to someone else to keep


def verify_audit(path: Path, *, expected_head: tuple[int, str] | None = None) -> AuditVerdict:
    """Check the whole chain of the log at `path` against its head file (and `expected_head` if given).

    `first_bad_seq` is the seq where the chain breaks: an edited record's own
    seq, the seq that is missing or out of place, or the first dropped seq.
    """
    return _verify(Path(path), expected_head=expected_head, tail_bytes=None)


#: How much of a log `verify_tail` reads at each start: about 2,800 decision records, checked in
#: 0.3 s on one busy x86 core; the whole chain of a 7 MiB log took 2 s (`mesh admin audit --verify`).
TAIL_CHECK_BYTES = 1 << 20


def verify_tail(path: Path, *, max_bytes: int = TAIL_CHECK_BYTES) -> AuditVerdict:
    """Check the records in the last `max_bytes` of the log (the whole log when it is smaller):
    each is intact and chains to the one before, and the last one matches the head file.

    A replica runs this at every start, so an edit anywhere in that window is reported
    at once, whatever the log's length; `verify_audit` reads the whole log. The first
    record of a window that starts mid-log is taken as given (its predecessor is
    outside), so `records` counts the records checked, not the log's length.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return _verify(Path(path), expected_head=None, tail_bytes=max_bytes)


def _read_window(path: Path, tail_bytes: int | None) -> tuple[bytes | None, bool]:
    """(the log's bytes, or its last whole lines within `tail_bytes`; whether that is a window)."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if tail_bytes is None or size <= tail_bytes:
                return f.read(), False
            f.seek(size - tail_bytes - 1)  # one byte more: is the window's first byte a line's first?
            data = f.read()
            start = data.find(b"\n") + 1
            if start == 0 or start == len(data):  # no whole record in the window: read them all
                f.seek(0)
                return f.read(), False
    except FileNotFoundError:
        return None, False
    except OSError as exc:
        raise AuditReadError(f"cannot read audit log {path}: {exc.strerror}") from None
    return data[start:], True


def _window_start(lines: list[bytes], head: tuple[int, str] | None) -> int:
    """The seq the first line of a window holds: what most records up to the first unreadable
    line say (each record's seq minus its line number), so an edited seq does not shift the
    others; lines after a damaged one may be shifted by a line split in two. Where no two records
    agree and every line reads (a window of one record, whose seq may be the edited byte), the
    record whose hash the head file names settles it: it sits at the head's seq (the head may lag
    the log, but never names another record's hash)."""
    votes: Counter[int] = Counter()
    hashes: list[str] = []  # of the lines read, in order, while every line reads
    readable = True
    for index, line in enumerate(lines):
        try:
            record = _parse_record(line)
        except _BadRecord:
            readable = False
            if votes:
                break
            continue
        votes[record.seq - index] += 1
        hashes.append(record.hash)
    if votes and votes.most_common(1)[0][1] > 1:
        return votes.most_common(1)[0][0]
    if head is not None and readable and head[1] in hashes:  # (a split line would shift it too)
        return max(1, head[0] - hashes.index(head[1]))
    if votes:
        return votes.most_common(1)[0][0]
    return max(1, (head[0] if head else 0) - len(lines) + 1)


def _verify(path: Path, *, expected_head: tuple[int, str] | None, tail_bytes: int | None) -> AuditVerdict:
    data, window = _read_window(path, tail_bytes)
    head = _read_head(path)
    if data is None:
        if head is None:
            raise AuditReadError(f"no audit log at {path} (and no head file {head_path(path)})")
        data = b""
    prev, seq, count = GENESIS_HASH, 1, 0
    lines = data.split(b"\n")
    hashes: dict[int, str] = {}
    where = "line {}" if not window else "line {} of the last " + f"{len(data)} bytes"
    if window:
        seq = _window_start(lines[:-1], head)

    def bad(reason: str, at: int | None = None) -> AuditVerdict:
        return AuditVerdict(False, count, seq if at is None else at, reason, prev)

    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        if last and line == b"":
            break
        if last:
            return bad(
                f"{where.format(index + 1)} is incomplete (torn write or truncation): "
                f"record {seq} is cut short"
            )
        try:
            record = _parse_record(line)
        except _BadRecord as exc:
            return bad(f"{where.format(index + 1)} is not a valid record: {exc}")
        if window and index == 0:  # its predecessor is outside the window
            prev = record.prev
        if record.seq != seq:
            what = "missing (deleted), or this seq was edited" if record.seq > seq else "out of order"
            return bad(
                f"{where.format(index + 1)} holds seq {record.seq} where seq {seq} belongs: "
                f"record {seq} is {what}"
            )
        if record.prev != prev:
            return bad(
                f"record {seq} does not chain to record {seq - 1}: a record before it was changed or removed"
            )
        if record.expected_hash() != record.hash:
            return bad(f"record {seq} ({record.kind}) was edited: its content no longer matches its hash")
        hashes[seq] = record.hash
        prev, seq, count = record.hash, seq + 1, count + 1
    last_seq = seq - 1

    for source, anchor in (("head file", head), ("expected head", expected_head)):
        if anchor is None:
            if source == "head file":
                return bad(
                    f"head file {head_path(path)} is missing: records may have been dropped from the end",
                    at=None if last_seq == 0 else last_seq + 1,
                )
            continue
        head_seq, head_hash = anchor
        if head_seq > last_seq:
            return bad(
                f"{source} records seq {head_seq} but the log ends at seq {last_seq}: "
                f"records {last_seq + 1}..{head_seq} were dropped",
                at=last_seq + 1,
            )
        if head_seq > 0 and head_seq in hashes and hashes[head_seq] != head_hash:
            return bad(f"record {head_seq} does not match the {source}: the log was rewritten", at=head_seq)
        if head_seq == 0 and head_hash != GENESIS_HASH:
            return bad(f"{source} is not the empty-log head", at=1)
        if source == "head file" and last_seq - head_seq > MAX_RECORDS_PER_SYNC:
            return bad(
                f"the log is {last_seq - head_seq} records ahead of its head file (at most "
                f"{MAX_RECORDS_PER_SYNC} after a crash)",
                at=head_seq + 1,
            )
    if window:
        first_seq = last_seq - count + 1
        reason = f"last {count} records (seq {first_seq}..{last_seq}) chain intact"
        return AuditVerdict(True, count, None, reason, prev)
    return AuditVerdict(True, count, None, f"{count} records, chain intact", prev)


def read_audit(path: Path) -> list[AuditRecord]:
    """Every well-formed record of the log, for display; this does not check the chain (use verify_audit)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditReadError(f"cannot read audit log {path}: {exc.strerror}") from None
    records = []
    for line in data.split(b"\n"):
        if line:
            try:
                records.append(_parse_record(line))
            except _BadRecord:
                continue
    return records


class AuditLog:
    """Appends records to the log at `path`, continuing the chain of an existing log.

    Every append is written, flushed and fsynced before the head file advances;
    on create the directory is fsynced too, so the file itself survives a power
    loss. Safe to share between threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seq, self._hash = 0, GENESIS_HASH
        recovered_bytes = self._open_existing() if self.path.exists() else self._create()
        self._head_seq = self._seq  # the seq the head file on disk records
        self._damaged: str | None = None  # set when a partial write could not be cut off: appends refuse
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise AuditWriteError(f"cannot open audit log {self.path}: {exc.strerror}") from None
        if recovered_bytes:
            self.append(
                "log_recovered",
                {
                    "dropped_bytes": recovered_bytes,
                    "why": "torn last line after a crash; it was never acknowledged",
                },
            )

    def _create(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditWriteError(
                f"cannot create directory for audit log {self.path}: {exc.strerror}"
            ) from None
        # Head first: from now on a log without a head file is evidence of tampering, never a crash.
        _write_head(self.path, 0, GENESIS_HASH)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise AuditWriteError(f"cannot create audit log {self.path}: {exc.strerror}") from None
        return 0

    def _open_existing(self) -> int:
        """Find the chain's end; drop a torn, unacknowledged last line. Return the bytes dropped."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise AuditReadError(f"cannot read audit log {self.path}: {exc.strerror}") from None
        head = _read_head(self.path)
        if head is None:
            raise AuditCorruptError(
                f"audit log {self.path} has no head file {head_path(self.path)}; records may be missing. "
                "Run `mesh admin audit verify`, then move the log aside (keep it as evidence) to start anew"
            )
        end = data.rfind(b"\n") + 1
        torn = len(data) - end
        last = data[:end].rstrip(b"\n").rsplit(b"\n", 1)[-1] if end else b""
        if last:
            try:
                record = _parse_record(last)
            except _BadRecord as exc:
                raise AuditCorruptError(f"last record of audit log {self.path} is damaged ({exc})") from None
            if record.expected_hash() != record.hash:
                raise AuditCorruptError(f"last record ({record.seq}) of audit log {self.path} was edited")
            self._seq, self._hash = record.seq, record.hash
        head_seq, head_hash = head
        # The head may lag the log by the records of one append (a crash between their fsync and the head's):
        # the first record it does not cover must chain to it.
        lag = self._seq - head_seq
        if lag == 0:
            covered = head_hash == self._hash
        elif lag == 1:
            covered = head_hash == record.prev
        elif 1 < lag <= MAX_RECORDS_PER_SYNC:
            rows = data[:end].rstrip(b"\n").split(b"\n")
            try:
                first = _parse_record(rows[-lag]) if lag <= len(rows) else None
            except _BadRecord:
                first = None
            covered = first is not None and first.seq == head_seq + 1 and first.prev == head_hash
        else:
            covered = False
        if not covered:
            raise AuditCorruptError(
                f"audit log {self.path} ends at seq {self._seq} but its head file records seq {head_seq}: "
                "records were dropped or rewritten. Run `mesh admin audit verify`"
            )
        if torn:
            log.warning(
                "audit log %s ends in a torn line of %d bytes after seq %d; dropping it",
                self.path,
                torn,
                self._seq,
            )
            try:
                os.truncate(self.path, end)
            except OSError as exc:
                raise AuditWriteError(f"cannot truncate torn audit log {self.path}: {exc.strerror}") from None
        if head_seq != self._seq:
            _write_head(self.path, self._seq, self._hash)
        return torn

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record: keep a copy elsewhere to detect a cut tail."""
        with self._lock:
            return self._seq, self._hash

    def append(
        self, kind: str, payload: Mapping[str, Any] | None = None, *, now: float | None = None
    ) -> AuditRecord:
        """Write one record durably and return it."""
        return self.append_many([(kind, payload)], now=now)[0]

    def append_many(
        self,
        entries: Iterable[tuple[str, Mapping[str, Any] | None]],
        *,
        now: float | None = None,
        on_synced: Callable[[], None] | None = None,
        defer_head: bool = False,
    ) -> list[AuditRecord]:
        """Write records (kind, payload) durably and return them: one write, one fsync and one head
        update per `MAX_RECORDS_PER_SYNC` records. `on_synced` is called once every record is on disk,
        before the last head update (so that a writer waiting for them need not wait for the head too).

        With `defer_head`, the head file is left behind (a busy writer's next records need not wait for
        it) until the log would get more than `MAX_RECORDS_PER_SYNC` records ahead of it; the writer
        calls `sync_head` when it has nothing else to do."""
        items = [(kind, dict(payload or {})) for kind, payload in entries]
        for kind, _ in items:
            if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
                raise ValueError(f"audit kind {kind!r} must match {_KIND_RE.pattern}")
        records: list[AuditRecord] = []
        with self._lock:
            for start in range(0, len(items), MAX_RECORDS_PER_SYNC):
                chunk = items[start : start + MAX_RECORDS_PER_SYNC]
                if self._seq - self._head_seq + len(chunk) > MAX_RECORDS_PER_SYNC:
                    try:
                        self._advance_head()  # after a crash the log stays at most one chunk ahead of it
                    except AuditWriteError as exc:
                        exc.written = len(records)
                        raise
                last = start + MAX_RECORDS_PER_SYNC >= len(items)
                try:
                    records += self._write_synced(chunk, now, on_synced if last else None)
                except AuditWriteError as exc:
                    exc.written = len(records)  # the earlier chunks are durable: a retry must not repeat them
                    raise
                if not defer_head:
                    self._try_advance_head()
        return records

    def _try_advance_head(self) -> None:
        """Advance the head file after records are durable; if it cannot be written (a full disk), the
        records stand and the head lags: the next append that would leave it too far behind refuses."""
        try:
            self._advance_head()
        except AuditWriteError as exc:
            log.warning("%s (the log is %d records ahead of it; retried at the next append)", exc,
                        self._seq - self._head_seq)

    def sync_head(self) -> None:
        """Bring the head file up to the last record (after appends with `defer_head`)."""
        with self._lock:
            self._advance_head()

    def _advance_head(self) -> None:
        if self._head_seq != self._seq:
            _write_head(self.path, self._seq, self._hash)
            self._head_seq = self._seq

    def _write_synced(self, items: list[tuple[str, dict[str, Any]]], now: float | None,
                      on_synced: Callable[[], None] | None = None) -> list[AuditRecord]:
        """Append `items` as records and fsync the log (caller holds the lock; the head is the caller's)."""
        seq, prev = self._seq, self._hash
        records, lines = [], []
        at = time.time() if now is None else float(now)
        for kind, payload in items:
            seq += 1
            body = {"seq": seq, "time": at, "kind": kind, "payload": payload, "prev": prev}
            canonical = canonical_json(body)
            digest = hashlib.sha256(canonical).hexdigest()
            lines.append(_record_line(canonical, digest))
            records.append(AuditRecord(seq, at, kind, payload, prev, digest))
            prev = digest
        if self._damaged is not None:
            raise AuditWriteError(self._damaged)
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(b"".join(lines))
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            # A full disk takes part of the lines: cut them off again, or the next records would follow a
            # torn line and the chain would never verify again. The records were not acknowledged.
            reason = f"cannot append to audit log {self.path}: {exc.strerror or exc}"
            try:
                os.ftruncate(self._fd, start)
            except OSError as cut:
                self._damaged = (
                    f"{reason}, and cannot cut the partial record off again ({cut.strerror or cut}): "
                    "restart the node once the disk has room (reopening drops the torn line)"
                )
                raise AuditWriteError(self._damaged) from None
            raise AuditWriteError(f"{reason}; nothing was written, free disk space and it retries") from None
        self._seq, self._hash = seq, prev
        if on_synced is not None:
            on_synced()
        return records

    def append_events(self, events: Iterable[AuditEvent], *, now: float | None = None) -> list[AuditRecord]:
        return self.append_many(((e.kind, e.payload) for e in events), now=now)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    self._advance_head()
                except AuditWriteError as exc:  # the head may lag the log by one append: still valid
                    log.warning("%s", exc)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
