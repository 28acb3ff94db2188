"""What fleetmesh changes in pysyncobj 0.3.17, in one place, each change tested in a live group
(tests/consensus/test_pysyncobj_patch.py).

1. A durable journal. pysyncobj 0.3.17 already stores currentTerm and votedFor in the
   journal's ``.meta`` file before it sends a vote (upstream issue #201, fixed there without
   fsync), and writes log entries through an mmap it never msyncs. After a power cut either
   may be lost, and a member that forgets its vote or an acknowledged entry lets a stale
   member win an election and overwrite committed entries. `DurableFileJournal` keeps term
   and vote in a file of its own written temp + fsync + rename + directory fsync before
   ``setCurrentTerm`` returns (so before the vote or the request leaves), and syncs the log
   after every change, or, with ``defer_flush`` (group commit, used with the gRPC transport),
   once in `flush_pending`, which the transport calls before any frame leaves. It syncs with
   ``os.fdatasync`` on the log file, not pysyncobj's ``mmap.flush``: CPython's msync holds the
   GIL for the whole sync, so every thread of the node (gRPC, proposers, the audit writer)
   stood still on each one; on Linux both write back the same dirty pages of the file. The log is
   written through an mmap of a sparse file: on a full disk, touching a page the file system
   cannot back kills the whole process with SIGBUS. `add` reserves the record's bytes with
   ``posix_fallocate`` first, so a full disk fails that one entry with `JournalFullError`
   (pysyncobj logs it and retries the tick; the proposal times out) and the node lives. SyncObj
   builds its journal through the module-global ``createJournal``; `install()` wraps it so a
   `DurableJournalPath` gets the durable journal and every other path keeps pysyncobj's own.
2. Followers truncate only on a conflict. pysyncobj's follower deletes every entry after
   ``prevLogIdx`` whenever it holds more, even when they match what the leader sends (and
   on plain heartbeats): with unbatched appends the leader re-sends in-flight ranges (a
   success reply moves nextIndex back), and the follower drops entries it has already
   acknowledged, logging "truncating already-applied log entries". Raft deletes only from
   the first entry whose term differs (paper, section 5.3). `trim_append_entries` rewrites
   such a message before pysyncobj sees it: entries the follower already holds with the
   same term are skipped, and local entries written by the sending leader (same term) are
   kept. `keep_next_index` stops a success reply from moving the leader's nextIndex back
   below what is already in flight on the ordered TCP stream. Both run in
   `receive_message`, which every Transport subclass calls from its ``_onMessageReceived``.
3. No code from log entries. pysyncobj pickles every log entry (a replicated call, a
   membership change) and every replica unpickles it when it applies it; whoever gets an
   entry into the log (any member, through the leader) could run code on all of them.
   `install()` replaces the ``pickle`` that ``pysyncobj.syncobj`` uses with one whose
   ``loads`` is `safe_pickle.loads`: plain values, and instances of the group member class
   (`transport.MemberNode`, in membership changes); anything else raises, and the wrapped
   ``SyncObj.__doApplyCommand`` then skips the entry (logged, counted) on every replica alike
   instead of letting the exception stop the tick and retry the entry forever.

4. PreVote (Raft thesis, section 9.6). pysyncobj's follower starts an election, and raises its
   term, as soon as its election timeout passes; every other member that hears the higher term
   steps down to it, the leader included. A member that restarts does so before the leader's
   stream to it is re-dialled (about a second, against a 0.2-0.4 s timeout), so every reboot of
   a site member deposed the site's leader and cost an election. `PreVote` runs a round first: the
   member asks the others whether they would vote for it at the next term, and pysyncobj's
   election goes ahead only when a majority says yes (`grant_pre_vote`: no leader heard from for
   the minimum election timeout, and the candidate's log at least as new; or the candidate's term
   already past the member's). Nobody changes term or vote for a pre-vote; rounds are numbered, and
   a round is void once a leader is heard again. `RaftGroup._onTick` runs `PreVote.before_tick`
   before pysyncobj's tick, and the group's receive hook hands it the two message types it adds
   (``pre_vote``, ``pre_vote_response``), which pysyncobj never sees.

These reach into pysyncobj's internals (module-level ``createJournal`` and
``pickle`` of ``pysyncobj.syncobj``, the name-mangled ``_SyncObj__raftLog`` and
``_SyncObj__raftNextIndex``, FileJournal's methods, the shape of its Raft messages), which
change between releases. pyproject.toml pins pysyncobj exactly, and importing this module
fails with `PysyncobjMismatch` (naming both versions) when another version is installed
or one of those internals is gone.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeGuard

import pysyncobj.pipe_notifier as _pipe_notifier
import pysyncobj.syncobj as _syncobj
import pysyncobj.version as _pysyncobj_version
from pysyncobj.journal import FileJournal, ResizableFile
from pysyncobj.transport import Transport

from mesh.durable import fsync_dir

_log = logging.getLogger("mesh.consensus.raft")

#: The pysyncobj release these patches were written and tested against (pinned in pyproject.toml).
PYSYNCOBJ_VERSION = "0.3.17"

# FileJournal methods that DurableFileJournal overrides or calls (defined by FileJournal itself).
_JOURNAL_METHODS = (
    "add",
    "clear",
    "deleteEntriesFrom",
    "deleteEntriesTo",
    "flush",
    "setCurrentTerm",
    "getCurrentTerm",
    "getVotedForNodeId",
    "_destroy",
)
# Instance attributes of SyncObj (name-mangled) that the message hooks and PreVote read and write.
_SYNCOBJ_ATTRIBUTES = (
    "_SyncObj__raftLog",
    "_SyncObj__raftNextIndex",
    "_SyncObj__raftElectionDeadline",
    "_SyncObj__raftState",
    "_SyncObj__raftCurrentTerm",
    "_SyncObj__raftLeader",
    "_SyncObj__otherNodes",
    "_SyncObj__selfNode",
    "_SyncObj__transport",
    "_SyncObj__transferInProgress",
)
# SyncObj methods (name-mangled) that PreVote calls.
_SYNCOBJ_METHODS = (
    "_SyncObj__generateRaftTimeout",
    "_SyncObj__connectedToAnyone",
    "_SyncObj__getCurrentLogIndex",
    "_SyncObj__getCurrentLogTerm",
    "_SyncObj__onLeaderChanged",
    "_onTick",
)
# Instance attributes of FileJournal and its ResizableFile that DurableFileJournal reserves space through.
_JOURNAL_ATTRIBUTES = ("_FileJournal__journalFile", "_FileJournal__currentOffset")
_RESIZABLE_FILE_ATTRIBUTES = ("_ResizableFile__f",)
# FileJournal.add's record: length (4), index and term (16), the command, length again (4).
_RECORD_OVERHEAD = 24
# Message types and fields of pysyncobj's Raft protocol that the message hooks rely on.
_MESSAGE_KEYS = (
    "append_entries",
    "prevLogIdx",
    "prevLogTerm",
    "entries",
    "transmission",
    "next_node_idx",
    "success",
    "reset",
)


class PysyncobjMismatch(ImportError):
    """The installed pysyncobj is not the release fleetmesh's Raft patches were written against."""


def installed_pysyncobj_version() -> str | None:
    """The version of the pysyncobj that is imported (its own VERSION, else the distribution's metadata)."""
    version = getattr(_pysyncobj_version, "VERSION", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("pysyncobj")
    except importlib.metadata.PackageNotFoundError:
        return None


_REGULAR_COMMAND = 0  # pysyncobj.syncobj._COMMAND_TYPE.REGULAR: a replicated call


def missing_internals() -> list[str]:
    """The pysyncobj internals these patches hook that the imported pysyncobj lacks (empty if none)."""
    missing = [
        f"pysyncobj.syncobj.{name}"
        for name in ("createJournal",)
        if not callable(getattr(_syncobj, name, None))
    ]
    if not callable(getattr(getattr(_syncobj, "pickle", None), "loads", None)):
        missing.append("pysyncobj.syncobj.pickle")
    if not callable(getattr(_syncobj.SyncObj, "_SyncObj__doApplyCommand", None)):
        missing.append("SyncObj.__doApplyCommand")
    if not callable(getattr(_pipe_notifier, "PipeNotifier", None)):
        missing.append("pysyncobj.pipe_notifier.PipeNotifier")
    missing += [f"Transport.{name}" for name in ("_onNodeConnected", "_onNodeDisconnected")
                if not callable(getattr(Transport, name, None))]
    missing += [f"SyncObj.{name}" for name in _SYNCOBJ_METHODS
                if not callable(getattr(_syncobj.SyncObj, name, None))]
    raft_state = getattr(_syncobj, "_RAFT_STATE", None)
    if [getattr(raft_state, k, None) for k in ("FOLLOWER", "CANDIDATE", "LEADER")] != [0, 1, 2]:
        missing.append("_RAFT_STATE.FOLLOWER/CANDIDATE/LEADER == 0/1/2")
    init_names = getattr(getattr(_syncobj.SyncObj.__init__, "__code__", None), "co_names", ())
    missing += [f"SyncObj.{name}" for name in _SYNCOBJ_ATTRIBUTES if name not in init_names]
    missing += [f"FileJournal.{name}" for name in _JOURNAL_METHODS if name not in vars(FileJournal)]
    for cls, names in ((FileJournal, _JOURNAL_ATTRIBUTES), (ResizableFile, _RESIZABLE_FILE_ATTRIBUTES)):
        assigned = getattr(getattr(cls.__init__, "__code__", None), "co_names", ())
        missing += [f"{cls.__name__}.{name}" for name in names if name not in assigned]
    if not callable(getattr(Transport, "_onMessageReceived", None)):
        missing.append("Transport._onMessageReceived")
    handler = getattr(_syncobj.SyncObj, "_SyncObj__onMessageReceived", None)
    consts = getattr(getattr(handler, "__code__", None), "co_consts", ())
    missing += [f"Raft message key {key!r}" for key in _MESSAGE_KEYS if key not in consts]
    if getattr(getattr(_syncobj, "_COMMAND_TYPE", None), "REGULAR", None) != _REGULAR_COMMAND:
        missing.append(f"_COMMAND_TYPE.REGULAR == {_REGULAR_COMMAND}")
    return missing


def check_pysyncobj() -> None:
    """Raise PysyncobjMismatch unless pysyncobj is the pinned release and has every hooked internal."""
    found = installed_pysyncobj_version()
    if found != PYSYNCOBJ_VERSION:
        raise PysyncobjMismatch(
            f"fleetmesh's Raft patches (mesh/consensus/_pysyncobj_patch.py) were written against pysyncobj "
            f"{PYSYNCOBJ_VERSION}, but pysyncobj {found or '(unknown version)'} is installed; install "
            f"'pysyncobj=={PYSYNCOBJ_VERSION}' as pyproject.toml pins it, or re-check every patch against "
            f"{found} before moving the pin"
        )
    missing = missing_internals()
    if missing:
        raise PysyncobjMismatch(
            f"pysyncobj {found} lacks internals that mesh/consensus/_pysyncobj_patch.py hooks: "
            f"{', '.join(missing)}; reinstall 'pysyncobj=={PYSYNCOBJ_VERSION}' (this copy was modified)"
        )


check_pysyncobj()

_counts_lock = threading.Lock()
_counts: Counter[str] = Counter()
_refused_changes_from: set[str] = set()  # members whose forwarded change was refused (logged once each)


def hook_counts() -> dict[str, int]:
    """How often each message hook changed something in this process, by name (for tests and metrics):
    ``append_entries_trimmed`` (trim_append_entries rewrote a message), ``next_index_kept``
    (keep_next_index undid a move of the leader's nextIndex), ``unsafe_pickle_refused`` (a log
    entry or snapshot that was not plain values) and ``forwarded_change_refused`` (a member sent the
    leader a membership or version change); PreVote's ``pre_vote_started``, ``pre_vote_won``,
    ``pre_vote_granted`` and ``pre_vote_refused`` (rounds this process's members ran and won,
    answers they gave)."""
    with _counts_lock:
        return dict(_counts)


def _count(name: str) -> None:
    with _counts_lock:
        _counts[name] += 1


_install_lock = threading.Lock()
_installed = False


class DurableJournalPath(str):
    """A journal file path that asks for `DurableFileJournal` instead of pysyncobj's FileJournal.

    With ``defer_flush``, the journal msyncs only in `flush_pending` (group commit)."""

    defer_flush: bool
    journal: DurableFileJournal | None

    def __new__(cls, path: str, *, defer_flush: bool = False) -> DurableJournalPath:
        made = super().__new__(cls, path)
        made.defer_flush = defer_flush
        made.journal = None
        return made

    def flush_pending(self) -> None:
        """Make every change written to the journal so far durable (no-op if there is none)."""
        if self.journal is not None:
            self.journal.flush_pending()


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


class JournalFullError(OSError):
    """The Raft journal cannot take another entry (the disk is full); nothing was written."""


class DurableFileJournal(FileJournal):
    """pysyncobj's FileJournal with term/vote and log entries made durable before they count."""

    def __init__(self, journal_file: str, *, defer_flush: bool = False):
        super().__init__(journal_file)
        self._path = journal_file
        self._vote_path = journal_file + ".vote"
        self._dir = os.path.dirname(os.path.abspath(journal_file))
        self._rewriting = False
        self._defer = defer_flush
        self._dirty = False
        self.flushes = 0  # syncs of the log (tests and the bench count them)
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

    def close(self) -> None:
        """Close the journal's files (SyncObj closes the journal it uses itself, through _destroy)."""
        self._destroy()

    def getVotedForNodeId(self):
        return self._voted_for

    # A follower acknowledges entries (next_node_idx) in the same tick that it adds them and
    # the leader counts its own copy at once: msync before either can happen. Deferred, the
    # transport calls flush_pending before any message leaves, which is before either too.
    def add(self, command, idx, term):
        self._reserve(_RECORD_OVERHEAD + len(command))
        super().add(command, idx, term)
        if not self._rewriting:
            self._changed()

    def _reserve(self, size: int) -> None:
        """Allocate the next `size` bytes of the log file before the mmap touches them (see point 1).
        Growing past the mapping, reserve as pysyncobj would grow (double) and map it here: mmap's
        ``size()``, which pysyncobj's ResizableFile compares with, is the file's size, not the map's."""
        resizable = self._FileJournal__journalFile
        mm, fileno = resizable._ResizableFile__mm, resizable._ResizableFile__f.fileno()
        offset = self._FileJournal__currentOffset
        end = offset + size
        try:
            if end <= len(mm):
                os.posix_fallocate(fileno, offset, size)
                return
            target = max(end, 2 * len(mm))
            try:
                os.posix_fallocate(fileno, offset, target - offset)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or target == end:
                    raise
                target = end  # not room to double: the exact record
                os.posix_fallocate(fileno, offset, size)
            mm.resize(target)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # a file system that cannot reserve: as plain pysyncobj
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                what_to_do = "free disk space in the node's data directory; the group retries"
            else:  # ENOMEM from growing the mapping, EIO, ...: not a full disk
                what_to_do = f"{errno.errorcode.get(exc.errno or 0, 'an OS error')}; the group retries"
            raise JournalFullError(
                f"cannot grow the Raft journal {self._path}: {exc.strerror or exc}; the entry is refused "
                f"({what_to_do})"
            ) from None

    def deleteEntriesFrom(self, entryFrom):
        super().deleteEntriesFrom(entryFrom)
        self._changed()

    def clear(self):
        super().clear()
        if not self._rewriting:
            self._changed()

    def _changed(self) -> None:
        if self._defer:
            self._dirty = True
        else:
            self.flush()
            self.flushes += 1

    def flush(self) -> None:
        """Make the log durable: fdatasync on its file, which (unlike mmap.flush) lets other threads run."""
        os.fdatasync(self._FileJournal__journalFile._ResizableFile__f.fileno())

    def flush_pending(self) -> None:
        """Group commit: one sync for every change since the last one."""
        if self._dirty:
            self._dirty = False
            self.flush()
            self.flushes += 1

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
        self._dirty = False
        self.flushes += 1


class _SafePickle:
    """Stands in for the ``pickle`` module inside pysyncobj.syncobj: dumps as before, loads plain
    values only (see point 3 of the module docstring)."""

    def __init__(self, original: Any) -> None:
        self._original = original

    def dumps(self, data: Any, *args: Any, **kwargs: Any) -> bytes:
        return self._original.dumps(data, *args, **kwargs)

    def loads(self, data: Any) -> Any:
        from mesh.consensus import safe_pickle

        try:
            return safe_pickle.loads(data, allow=[("mesh.consensus.transport", "MemberNode")])
        except safe_pickle.UnsafePickle:
            _count("unsafe_pickle_refused")
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def install() -> None:
    """Wrap pysyncobj's journal factory and its pickle once per process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        original_create_journal = _syncobj.createJournal

        def create_journal(journal_file=None):
            if isinstance(journal_file, DurableJournalPath):
                journal = DurableFileJournal(str(journal_file), defer_flush=journal_file.defer_flush)
                journal_file.journal = journal
                return journal
            return original_create_journal(journal_file)

        _syncobj.createJournal = create_journal
        _syncobj.pickle = _SafePickle(_syncobj.pickle)
        original_apply = _syncobj.SyncObj._SyncObj__doApplyCommand

        def do_apply_command(self: Any, command: bytes) -> Any:
            from mesh.consensus.safe_pickle import UnsafePickle

            try:
                return original_apply(self, command)
            except UnsafePickle as exc:
                _log.error("skipped a Raft log entry that is not plain values (%s); every replica skips it",
                           exc)
                return None

        _syncobj.SyncObj._SyncObj__doApplyCommand = do_apply_command
        logging.getLogger(_syncobj.__name__).addFilter(_JournalFullLines())
        _installed = True


class _JournalFullLines(logging.Filter):
    """pysyncobj logs every failed tick with a traceback and retries it; a full disk fails the ticks of a
    member until there is room. Say that in one line, at most once per JOURNAL_FULL_LOG_EVERY_S."""

    def __init__(self) -> None:
        super().__init__()
        self._last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, JournalFullError):
            return True
        if record.created - self._last < JOURNAL_FULL_LOG_EVERY_S:
            return False
        self._last = record.created
        record.msg, record.args, record.exc_info, record.exc_text = "%s", (str(exc),), None, None
        return True


JOURNAL_FULL_LOG_EVERY_S = 10.0


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


def keep_next_index(sync_obj: Any, node: Any, handle: Callable[[], None]) -> bool:
    """Run `handle` (pysyncobj's processing of a next_node_idx reply) without letting a success
    reply move the leader's nextIndex for `node` back below what was already sent; True if it
    had to undo such a move."""
    next_index = sync_obj._SyncObj__raftNextIndex
    before = next_index.get(node)
    handle()
    after = next_index.get(node)
    if before is not None and after is not None and after < before:
        next_index[node] = before
        return True
    return False


def receive_message(sync_obj: Any, node: Any, message: Any, deliver: Callable[[Any, Any], None]) -> None:
    """Hand one Raft message that `node` sent to pysyncobj, with fleetmesh's message hooks applied.

    Every pysyncobj Transport subclass calls this from its ``_onMessageReceived`` with its
    SyncObj and ``deliver`` = the base class's ``_onMessageReceived`` (which passes the message
    to SyncObj). Runs on the group's tick thread, like pysyncobj's own handling.
    `keep_next_index` assumes that messages between two members arrive in the order they were
    sent, as on one TCP connection or one gRPC stream.
    """
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "append_entries":
        entry_term, last_index = follower_view(sync_obj)
        trimmed = trim_append_entries(message, entry_term, last_index)
        if trimmed is not message:
            _count("append_entries_trimmed")
        deliver(node, trimmed)
    elif kind == "next_node_idx" and message.get("success") and not message.get("reset"):
        if keep_next_index(sync_obj, node, lambda: deliver(node, message)):
            _count("next_index_kept")
    elif kind == "apply_command" and not is_regular_command(message.get("command")):
        # pysyncobj forwards a follower's membership change (or code version change) to the leader
        # like any command, so any member could add or remove members. fleetmesh changes membership
        # only on the leader itself, after the ledger entry that authorises it: refuse the rest.
        _count("forwarded_change_refused")
        with _counts_lock:
            first = node.id not in _refused_changes_from
            _refused_changes_from.add(node.id)
        _log.log(logging.WARNING if first else logging.DEBUG,
                 "refused a membership or version change forwarded by member %s: only the leader "
                 "changes the group's members, after the ledger entry that authorises it", node.id)
    else:
        deliver(node, message)


def is_regular_command(command: Any) -> bool:
    """Whether pysyncobj command bytes are a replicated call (type byte 0), not a membership,
    version or no-op entry."""
    return isinstance(command, bytes | bytearray) and len(command) > 0 and command[0] == _REGULAR_COMMAND


# --- 4. PreVote ------------------------------------------------------------------------------------

PRE_VOTE = "pre_vote"
PRE_VOTE_RESPONSE = "pre_vote_response"
_FOLLOWER, _CANDIDATE = 0, 1  # pysyncobj.syncobj._RAFT_STATE (checked by missing_internals)


def grant_pre_vote(
    *,
    proposed_term: int,
    candidate_log: tuple[int, int],
    own_term: int,
    own_log: tuple[int, int],
    leader_contact_s: float,
    min_timeout_s: float,
) -> bool:
    """Would this member vote for the candidate at `proposed_term` (the candidate's term + 1)? Pure.

    Logs are (last log term, last log index). A candidate at this member's own term (or behind it)
    is granted only when its log is at least as new and this member has heard from no leader for the
    minimum election timeout: that is what keeps a restarted or returning member from deposing a
    leader the rest still hear. A candidate whose own term is already past this member's is always
    granted: it moved on alone (it won a round whose vote requests were lost, or it ran without
    PreVote), pysyncobj's members drop appends of a lower term, and only its election lifts the
    others to its term. Refusing it for an older log would leave it and a member with a newer log but
    a lower term refusing each other for good (etcd's PreVote deadlock). Granting costs nothing: the
    real vote still refuses an older log, and the next round is won by a member with the newest log."""
    if proposed_term <= own_term:
        return False
    if proposed_term - 1 > own_term:
        return True
    return candidate_log >= own_log and leader_contact_s >= min_timeout_s


def _plain_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class PreVote:
    """The pre-vote round of one pysyncobj member (see the module docstring, 4). Tick thread only.

    `leader_contact_s()`: seconds since the member last heard from a leader (0 while it leads).
    With ``ask=False`` the member holds plain pysyncobj elections but still answers pre-votes."""

    def __init__(
        self, sync_obj: Any, leader_contact_s: Callable[[], float], min_timeout_s: float, *, ask: bool = True
    ) -> None:
        self._so = sync_obj
        self._ask = ask
        self._leader_contact_s = leader_contact_s
        self._min_timeout_s = min_timeout_s
        self._asking: int | None = None  # the term of the round under way
        self._round = 0  # numbers this member's rounds: a grant counts only for the round it answers
        self._started = 0.0  # monotonic time the round under way began
        self._grants: set[str] = set()
        self._won: int | None = None  # the term a round was won for: pysyncobj's election may start

    def _get(self, name: str) -> Any:
        return getattr(self._so, "_SyncObj__" + name)

    def _log(self) -> tuple[int, int]:
        return self._get("getCurrentLogTerm")(), self._get("getCurrentLogIndex")()

    def before_tick(self) -> None:
        """Where pysyncobj would start an election on this tick, run a pre-vote round instead (and
        push its election deadline back); once a round is won, let the election go ahead."""
        if not self._ask or self._get("raftState") not in (_FOLLOWER, _CANDIDATE):
            return
        if self._get("selfNode") is None:
            return
        term = self._get("raftCurrentTerm")
        now = _syncobj.monotonicTime()
        if self._won == term + 1:
            if self._get("raftElectionDeadline") < now:
                return  # won: pysyncobj's election raises the term to it on this tick
            self._won = None  # a leader was heard since the round was won: the next election asks again
        if self._get("transferInProgress"):
            return  # the leader handed over (timeout_now): its word is the vote
        if self._get("raftElectionDeadline") >= now or not self._get("connectedToAnyone")():
            return
        self._so._SyncObj__raftElectionDeadline = now + self._get("generateRaftTimeout")()
        # As pysyncobj's election (and etcd's pre-candidate) does: the leader it has not heard from for a
        # timeout is no longer taken for one. Commands already forwarded to it fail with LEADER_CHANGED
        # (they may or may not commit), new ones with MISSING_LEADER until a leader's append arrives.
        self._so._SyncObj__raftLeader = None
        self._get("onLeaderChanged")()
        self._round += 1
        self._started = now
        self._asking, self._grants = term + 1, {self._get("selfNode").id}
        _count("pre_vote_started")
        if not self._majority():
            last_term, last_index = self._log()
            message = {"type": PRE_VOTE, "term": term + 1, "round": self._round, "last_log_term": last_term,
                       "last_log_index": last_index}
            for node in list(self._get("otherNodes")):
                self._get("transport").send(node, dict(message))

    def receive(self, node: Any, message: dict) -> None:
        """A ``pre_vote`` (answer it) or a ``pre_vote_response`` (count it) from `node`."""
        term, round_ = message.get("term"), message.get("round")
        if not _plain_int(term) or not _plain_int(round_):
            return
        if message.get("type") == PRE_VOTE:
            last_term, last_index = message.get("last_log_term"), message.get("last_log_index")
            if not _plain_int(last_term) or not _plain_int(last_index):
                return
            granted = grant_pre_vote(
                proposed_term=term,
                candidate_log=(last_term, last_index),
                own_term=self._get("raftCurrentTerm"),
                own_log=self._log(),
                leader_contact_s=self._leader_contact_s(),
                min_timeout_s=self._min_timeout_s,
            )
            _count("pre_vote_granted" if granted else "pre_vote_refused")
            self._get("transport").send(
                node, {"type": PRE_VOTE_RESPONSE, "term": term, "round": round_, "granted": granted}
            )
        elif message.get("type") == PRE_VOTE_RESPONSE and message.get("granted") is True:
            if self._asking is None or (term, round_) != (self._asking, self._round):
                return  # an answer to an earlier round
            state = self._get("raftState")
            if self._get("raftCurrentTerm") + 1 != term or state not in (_FOLLOWER, _CANDIDATE):
                self._asking = None
                return
            if self._leader_contact_s() < _syncobj.monotonicTime() - self._started:
                # A leader was heard since the round began (it had stalled, not died): the round is
                # void, and a late grant must not depose it.
                self._asking = None
                return
            self._grants.add(node.id)
            self._majority()

    def _majority(self) -> bool:
        """Has the round under way a majority? Then it is won: the election starts on the next tick."""
        if 2 * len(self._grants) <= len(self._get("otherNodes")) + 1:
            return False
        self._won, self._asking = self._asking, None
        self._so._SyncObj__raftElectionDeadline = 0
        _count("pre_vote_won")
        return True
