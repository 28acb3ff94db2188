"""What fleetmesh changes in pysyncobj 0.3.17, in one place, each change tested in tests/consensus.

1. A durable journal. pysyncobj 0.3.17 already stores currentTerm and votedFor in the
   journal's ``.meta`` file before it sends a vote (upstream issue #201, fixed there without
   fsync), and writes log entries through an mmap it never msyncs. After a power cut either
   may be lost, and a member that forgets its vote or an acknowledged entry lets a stale
   member win an election and overwrite committed entries. `DurableFileJournal` keeps term
   and vote in a file of its own written temp + fsync + rename + directory fsync before
   ``setCurrentTerm`` returns (so before the vote or the request leaves), and msyncs the log
   after every change. SyncObj builds its journal through the module-global
   ``createJournal``; `install()` wraps it so a `DurableJournalPath` gets the durable
   journal and every other path keeps pysyncobj's own.
2. Followers truncate only on a conflict. pysyncobj's follower deletes every entry after
   ``prevLogIdx`` whenever it holds more, even when they match what the leader sends (and
   on plain heartbeats): with unbatched appends the leader re-sends in-flight ranges (a
   success reply moves nextIndex back), and the follower drops entries it has already
   acknowledged, logging "truncating already-applied log entries". Raft deletes only from
   the first entry whose term differs (paper, section 5.3). `trim_append_entries` rewrites
   such a message before pysyncobj sees it: entries the follower already holds with the
   same term are skipped, and local entries written by the sending leader (same term) are
   kept. `keep_next_index` stops a success reply from moving the leader's nextIndex back
   below what is already in flight on the ordered TCP stream.
3. A cached encryptor. pysyncobj derives the Fernet key with PBKDF2 (100,000 rounds, fixed
   salt) on every SyncObj construction, ~0.1 s of CPU. The group password is already a
   high-entropy HKDF output (see raft.derive_group_password), so the stretching buys
   nothing; caching by password makes restarts cheap. Fernet objects are stateless and
   safe to share between threads.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj as _syncobj
from pysyncobj.journal import FileJournal

from mesh.durable import fsync_dir

_install_lock = threading.Lock()
_installed = False


class DurableJournalPath(str):
    """A journal file path that asks for `DurableFileJournal` instead of pysyncobj's FileJournal."""


def write_durably(path: str, data: bytes) -> None:
    """Replace `path` with `data` so that after a crash the file holds either the old or the new bytes."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class DurableFileJournal(FileJournal):
    """pysyncobj's FileJournal with term/vote and log entries made durable before they count."""

    def __init__(self, journal_file: str):
        super().__init__(journal_file)
        self._vote_path = journal_file + ".vote"
        self._dir = os.path.dirname(os.path.abspath(journal_file))
        self._rewriting = False
        # A journal written by plain pysyncobj keeps term and vote in its .meta file.
        self._term: int = super().getCurrentTerm()
        self._voted_for: str | None = super().getVotedForNodeId()
        try:
            with open(self._vote_path, "rb") as f:
                vote = json.loads(f.read())
            self._term, self._voted_for = int(vote["term"]), vote["voted_for"]
        except FileNotFoundError:
            pass

    # pysyncobj calls this from SyncObj.__setCurrentTerm, before sending the vote request
    # (candidate) or the vote (follower): once it returns, the vote survives a power cut.
    def setCurrentTerm(self, term, votedForNodeId):
        write_durably(self._vote_path, json.dumps({"term": term, "voted_for": votedForNodeId}).encode())
        self._term, self._voted_for = term, votedForNodeId

    def getCurrentTerm(self):
        return self._term

    def getVotedForNodeId(self):
        return self._voted_for

    # A follower acknowledges entries (next_node_idx) in the same tick that it adds them and
    # the leader counts its own copy at once: msync before either can happen.
    def add(self, command, idx, term):
        super().add(command, idx, term)
        if not self._rewriting:
            self.flush()

    def deleteEntriesFrom(self, entryFrom):
        super().deleteEntriesFrom(entryFrom)
        self.flush()

    def clear(self):
        super().clear()
        if not self._rewriting:
            self.flush()

    # Called after a snapshot replaced the log's prefix (pysyncobj renamed the snapshot into
    # place, unsynced): make that rename durable before the entries it covers are dropped, and
    # msync the rewritten log once instead of once per re-added entry.
    def deleteEntriesTo(self, entryTo):
        fsync_dir(self._dir)
        self._rewriting = True
        try:
            super().deleteEntriesTo(entryTo)
        finally:
            self._rewriting = False
        self.flush()


def install() -> None:
    """Wrap pysyncobj's journal and encryptor factories once per process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        original_create_journal = _syncobj.createJournal

        def create_journal(journal_file=None):
            if isinstance(journal_file, DurableJournalPath):
                return DurableFileJournal(str(journal_file))
            return original_create_journal(journal_file)

        _syncobj.createJournal = create_journal
        _syncobj.getEncryptor = functools.lru_cache(maxsize=64)(_syncobj.getEncryptor)
        _installed = True


def trim_append_entries(
    message: dict[str, Any], entry_term: Callable[[int], int | None], last_index: int
) -> dict[str, Any]:
    """The append_entries message to hand pysyncobj so that it truncates only on a conflict.

    `entry_term(i)` is the term of the follower's entry i (None if it has none) and
    `last_index` its last index. Messages this cannot judge (snapshot chunks, a prevLogIdx
    the follower does not hold with that term) pass unchanged to pysyncobj's own handling.
    """
    if message.get("type") != "append_entries" or "prevLogIdx" not in message or "transmission" in message:
        return message
    prev_idx, prev_term = message["prevLogIdx"], message["prevLogTerm"]
    if entry_term(prev_idx) != prev_term:
        return message
    entries = message.get("entries", [])
    skip = 0
    while skip < len(entries) and entry_term(entries[skip][1]) == entries[skip][2]:
        prev_idx, prev_term = entries[skip][1], entries[skip][2]
        skip += 1
    rest = entries[skip:]
    if not rest:
        # Entries of the sender's own term came from the sender (one leader per term), so they
        # are in its log at the same index: keep them instead of deleting them.
        while prev_idx < last_index and entry_term(prev_idx + 1) == message["term"]:
            prev_idx, prev_term = prev_idx + 1, message["term"]
    if prev_idx == message["prevLogIdx"] and skip == 0:
        return message
    trimmed = dict(message)
    trimmed.update(prevLogIdx=prev_idx, prevLogTerm=prev_term, entries=rest)
    return trimmed


def follower_view(sync_obj: Any) -> tuple[Callable[[int], int | None], int]:
    """(entry_term, last_index) of a SyncObj's log, for `trim_append_entries` (tick thread only)."""
    log = sync_obj._SyncObj__raftLog
    first, last = log[0][1], log[-1][1]

    def entry_term(idx: int) -> int | None:
        if idx < first or idx > last:
            return None
        return log[idx - first][2]

    return entry_term, last


def keep_next_index(sync_obj: Any, node: Any, handle: Callable[[], None]) -> None:
    """Run `handle` (pysyncobj's processing of a next_node_idx reply) without letting a success
    reply move the leader's nextIndex for `node` back below what was already sent."""
    next_index = sync_obj._SyncObj__raftNextIndex
    before = next_index.get(node)
    handle()
    after = next_index.get(node)
    if before is not None and after is not None and after < before:
        next_index[node] = before
