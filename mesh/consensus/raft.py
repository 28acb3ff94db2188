"""Raft groups of one site on pysyncobj, bridged to asyncio.

The members of a site replicate one state machine (anything with ``apply``,
``snapshot`` and ``restore``; see `StateMachine`). `RaftGroup` is a pysyncobj
``SyncObj`` with a single replicated method that hands the command bytes to
``state.apply``. pysyncobj runs its own tick thread per group; the event loop never
waits on it: `RaftGroup.propose` registers a pysyncobj callback that resolves an
asyncio future through ``loop.call_soon_threadsafe``.

Who can talk to the Raft port, and why that matters
    pysyncobj's wire format is ``zlib(pickle(message))``: whoever can put bytes on a
    member's Raft port and have them unpickled can run code in the node. Every group
    therefore runs with pysyncobj's ``password``: each frame is a Fernet token
    (AES-128-CBC + HMAC-SHA256) and a frame whose HMAC does not verify closes the
    connection *before* anything is unpickled. The password is derived per group
    from the fleet secret that only enrolled fleet members hold
    (`derive_group_password`), so only fleet members of that group can produce a frame
    the port will unpickle; there is no default password and `RaftGroup` refuses to
    start without one. Bind the port to the site network only: the password is the
    only gate, and its strength is the fleet secret's.

Timings (`RaftTimings`) are tuned for fast failover on a site LAN; the reasons
are on the fields. Hazards of pysyncobj 0.3.17 and how this module handles them:

- ``leaderFallbackTimeout`` defaults to 30 s, so a leader cut off in a minority
  keeps acting as leader that long. Here it equals the maximum election timeout.
- currentTerm/votedFor (upstream issue #201): 0.3.17 stores them in the journal's
  ``.meta`` file but never fsyncs it, nor the mmapped log entries. After a site-wide
  power cut a member could forget its vote or an acknowledged entry, and a stale member
  could then overwrite committed entries. `_pysyncobj_patch.DurableFileJournal` makes
  both durable (temp + fsync + rename, msync) before they count, and they are loaded on
  start.
- Log compaction forks by default; gRPC does not support fork() in a threaded
  process: ``useFork=False`` and the snapshot goes through ``state.snapshot()``.
- Reads on a follower, and even on a leader that has just been cut off, may be
  stale. Anything that must be current goes through `RaftGroup.read_barrier`
  (a no-op through the log: once it returns, this member has applied everything
  committed before the call), or is proposed as a command.
- pysyncobj's follower deletes every entry after prevLogIdx, even entries that match the
  leader's; with unbatched appends that drops already-acknowledged entries under load
  (logged as "truncating already-applied log entries"). The transport hands every received
  message to `_pysyncobj_patch.receive_message`, which trims it so a follower truncates only
  on a conflict; a transport that replaces the TCP one must do the same.
- All of this reaches into pysyncobj 0.3.17's internals: importing this module imports
  `_pysyncobj_patch`, which refuses (PysyncobjMismatch) any other pysyncobj version.
- An exception escaping ``apply`` or a result callback inside pysyncobj's tick
  would make it apply the same entry again on the next tick; both are caught here.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pysyncobj.pickle as _pickle
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.transport import TCPTransport

from mesh.consensus import _pysyncobj_patch

_pysyncobj_patch.install()

logger = logging.getLogger(__name__)

MIN_FLEET_SECRET_BYTES = 32
MIN_GROUP_PASSWORD_CHARS = 32
_HKDF_SALT = b"fleetmesh/raft-group-password/v1"
_SNAPSHOT_MAGIC = b"FMRAFT1\n"
_RAFT_STATE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}


class StateMachine(Protocol):
    """What a Raft group replicates. ``apply`` must be deterministic: every member applies
    the same commands in the same order and must reach the same state."""

    def apply(self, command: bytes) -> object: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


# --- errors ---------------------------------------------------------------------------------


class RaftError(Exception):
    """Base of every error raised by a Raft group."""


class RaftConfigError(RaftError, ValueError):
    """The group cannot start with this configuration."""


class NoLeaderError(RaftError):
    """No leader is reachable: an election is running, or this member is in a minority partition.
    The command was not appended; it is safe to retry."""


class NotLeaderError(RaftError):
    """This member is not the leader; ``leader_address`` names the one it knows, if any."""

    def __init__(self, message: str, leader_address: str | None):
        super().__init__(message)
        self.leader_address = leader_address


class ProposalTimeout(RaftError):
    """No outcome within the deadline. The command may still commit later: retry only
    with a command that is idempotent in the state machine."""


class ProposalDiscarded(RaftError):
    """A new leader replaced the entry with another one: the command was not applied."""


class LeaderChangedError(RaftError):
    """The leader changed while the command was in flight: it may or may not commit."""


class ProposalQueueFull(RaftError):
    """pysyncobj's command queue is full: the group is overloaded. Back off and retry."""


class MembershipChangeRefused(RaftError):
    """The leader refused a membership change (already a member, not a member, the member
    itself, or another change is not committed yet)."""


class CommandRejected(RaftError):
    """The state machine raised while applying the command; every member did the same."""


# Failures after which the command was certainly not applied: retried until the deadline.
_RETRYABLE = {FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED}
# A read barrier applies nothing, so it may also be retried when the outcome is unknown.
_RETRYABLE_IF_IDEMPOTENT = _RETRYABLE | {FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME}


@dataclass(frozen=True)
class _ApplyFailed:
    error: str


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class RaftTimings:
    """Timings of a group, tuned for failover well under a second on a site LAN.

    The defaults give: a dead leader is replaced after election_min_s..election_max_s
    (0.2..0.4 s) plus one vote round trip; a leader cut off in a minority steps down after
    leader_fallback_s (0.4 s), so two members believe they lead for at most ~0.4 s (the old
    one cannot commit anything meanwhile); a restarted member is reconnected within
    connection_retry_s (0.1 s; pysyncobj's 5 s default is what made failover take up to 5 s).
    """

    #: Election timeout range. pysyncobj requires election_min_s > 3 x append_period_s so that
    #: two lost heartbeats do not start an election. Spread min..max = 2x keeps split votes rare.
    election_min_s: float = 0.2
    election_max_s: float = 0.4
    #: Heartbeat / append period of the leader (pysyncobj appendEntriesPeriod).
    append_period_s: float = 0.05
    #: A leader without answers from a majority for this long steps down (pysyncobj
    #: leaderFallbackTimeout, default 30 s). Equal to election_max_s: by then the majority
    #: side has elected a new leader.
    leader_fallback_s: float = 0.4
    #: A connection that received nothing for this long is dead (>= election_max_s; heartbeats
    #: arrive every append_period_s, so 1 s is 20 missed heartbeats).
    connection_timeout_s: float = 1.0
    #: Delay between reconnect attempts to a member that is down.
    connection_retry_s: float = 0.1
    #: Longest sleep of the tick thread between socket events (pysyncobj autoTickPeriod);
    #: bounds how late an election timeout is noticed. 20 ms costs little CPU when idle.
    tick_period_s: float = 0.02
    #: False: each command is sent to followers at once (commit in ~1 round trip, a few ms).
    #: True: commands wait for the next append period and go out together (~append_period_s
    #: latency, more throughput under heavy load). Decisions of a site are few and latency
    #: matters, so unbatched.
    batch_appends: bool = False
    #: Compact the log (snapshot through StateMachine.snapshot) after this many entries or
    #: this long, whichever comes first.
    compaction_min_entries: int = 5000
    compaction_min_interval_s: float = 300.0

    def validate(self) -> None:
        if self.election_min_s <= 3 * self.append_period_s:
            raise RaftConfigError(
                f"election_min_s={self.election_min_s} must exceed 3 x append_period_s="
                f"{self.append_period_s}: otherwise a couple of late heartbeats start an election"
            )
        if self.election_max_s <= self.election_min_s:
            raise RaftConfigError(
                f"election_max_s={self.election_max_s} must exceed election_min_s={self.election_min_s}"
            )
        if not self.append_period_s < self.leader_fallback_s:
            raise RaftConfigError(
                f"leader_fallback_s={self.leader_fallback_s} must exceed "
                f"append_period_s={self.append_period_s}"
            )
        if self.leader_fallback_s > 2 * self.election_max_s:
            raise RaftConfigError(
                f"leader_fallback_s={self.leader_fallback_s} is far above election_max_s="
                f"{self.election_max_s}: a leader cut off in a minority would keep acting as leader "
                "that long; keep it near the election timeout"
            )
        if self.connection_timeout_s < self.election_max_s:
            raise RaftConfigError(
                f"connection_timeout_s={self.connection_timeout_s} must be >= election_max_s="
                f"{self.election_max_s}"
            )
        if self.connection_retry_s < 0 or self.tick_period_s <= 0:
            raise RaftConfigError("connection_retry_s must be >= 0 and tick_period_s > 0")


def derive_group_password(fleet_secret: bytes, group_id: str) -> str:
    """The pysyncobj password of Raft group `group_id`: HKDF-SHA256 of the fleet secret.

    Each group gets its own password, so a key leaked from one site's group does not open
    another's; the result is 256 bits, urlsafe-base64 (44 characters).
    """
    if not isinstance(fleet_secret, bytes | bytearray):
        raise RaftConfigError(f"fleet secret must be bytes, got {type(fleet_secret).__name__}")
    if len(fleet_secret) < MIN_FLEET_SECRET_BYTES:
        raise RaftConfigError(
            f"fleet secret is {len(fleet_secret)} bytes; Raft group passwords need at least "
            f"{MIN_FLEET_SECRET_BYTES} random bytes (the fleet secret written by `mesh fleet init`)"
        )
    if not group_id:
        raise RaftConfigError("group_id is empty: name the Raft group (for example the site label)")
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=b"raft-group:" + group_id.encode()
    )
    return base64.urlsafe_b64encode(hkdf.derive(bytes(fleet_secret))).decode()


# --- transport with fault injection ---------------------------------------------------------


class _LinkCuttingTransport(TCPTransport):
    """pysyncobj's TCP transport that silently drops Raft messages to and from the peers in
    the group's ``cut_links`` (TCP stays up, as in a partition that drops packets), and that
    keeps followers from truncating entries that match the leader's (see _pysyncobj_patch)."""

    def send(self, node, message):
        if node.id in self._syncObj.cut_links:
            return False
        return super().send(node, message)

    def _onMessageReceived(self, node, message):
        if node.id in self._syncObj.cut_links:
            return
        _pysyncobj_patch.receive_message(self._syncObj, node, message, super()._onMessageReceived)


# --- the group ------------------------------------------------------------------------------


class RaftGroup(SyncObj):
    """One member of a site's Raft group.

    Construct it on the event loop's thread (pysyncobj's tick thread stops when the
    constructing thread ends); construction binds the port and returns in milliseconds.
    ``data_dir`` belongs to this member of this group: the journal (``raft.journal``, its
    ``.meta`` and ``.vote``) and the snapshot (``raft.snapshot``) live there and survive
    restarts.
    """

    def __init__(
        self,
        self_address: str,
        partners: Iterable[str],
        state: StateMachine,
        *,
        data_dir: Path,
        password: str,
        timings: RaftTimings | None = None,
        cut_links: Iterable[str] = (),
    ):
        timings = timings or RaftTimings()
        timings.validate()
        if not isinstance(password, str) or len(password) < MIN_GROUP_PASSWORD_CHARS:
            raise RaftConfigError(
                f"Raft group password for {self_address} is missing or shorter than "
                f"{MIN_GROUP_PASSWORD_CHARS} characters; pass derive_group_password(fleet_secret, group_id): "
                "without it anyone who reaches the port can run code through pickle"
            )
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # Set before SyncObj.__init__: its tick thread and transport start inside it.
        self.state = state
        self.timings = timings
        self.data_dir = data_dir
        self.cut_links: frozenset[str] = frozenset(cut_links)
        conf = SyncObjConf(
            password=password,
            autoTick=True,
            autoTickPeriod=timings.tick_period_s,
            raftMinTimeout=timings.election_min_s,
            raftMaxTimeout=timings.election_max_s,
            appendEntriesPeriod=timings.append_period_s,
            leaderFallbackTimeout=timings.leader_fallback_s,
            connectionTimeout=timings.connection_timeout_s,
            connectionRetryTime=timings.connection_retry_s,
            appendEntriesUseBatch=timings.batch_appends,
            logCompactionMinEntries=timings.compaction_min_entries,
            logCompactionMinTime=timings.compaction_min_interval_s,
            journalFile=_pysyncobj_patch.DurableJournalPath(str(data_dir / "raft.journal")),
            fullDumpFile=str(data_dir / "raft.snapshot"),
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            useFork=False,
            dynamicMembershipChange=True,
            # Fail fast with MISSING_LEADER instead of queueing forever: propose() retries
            # until its own deadline, and a command never lingers in the queue to surface
            # after the caller has given up.
            commandsWaitLeader=False,
            bindRetryTime=0.1,
        )
        super().__init__(
            self_address,
            [p for p in partners if p != self_address],
            conf,
            transportClass=_LinkCuttingTransport,
        )

    # -- replicated methods (run on pysyncobj's tick thread, on every member) --

    @replicated
    def apply_command(self, command: bytes):
        """The one replicated method. Call it through `propose`; calling it directly with
        ``sync=True`` blocks the calling thread (what bench/consensus.py measures as raw)."""
        try:
            return self.state.apply(command)
        except Exception as exc:  # deterministic on every replica; must not escape the tick
            logger.exception("state machine rejected a command on %s", self.address)
            return _ApplyFailed(f"{type(exc).__name__}: {exc}")

    @replicated
    def _read_barrier(self):
        return None

    # -- snapshot (log compaction, install snapshot, restart) --

    def _write_snapshot(self, path: str, raft_data: Any) -> None:
        # Called on the tick thread at the last applied entry, so state and index agree.
        state_bytes = self.state.snapshot()
        meta = _pickle.dumps(raft_data)
        with open(path, "wb") as f:
            f.write(_SNAPSHOT_MAGIC + struct.pack(">QQ", len(state_bytes), len(meta)) + state_bytes + meta)
            f.flush()
            os.fsync(f.fileno())

    def _read_snapshot(self, path: str) -> Any:
        with open(path, "rb") as f:
            blob = f.read()
        if not blob.startswith(_SNAPSHOT_MAGIC):
            raise RaftError(
                f"{path} is not a fleetmesh Raft snapshot; move it away to resync from the leader"
            )
        head = len(_SNAPSHOT_MAGIC)
        state_len, meta_len = struct.unpack(">QQ", blob[head : head + 16])
        body = blob[head + 16 :]
        self.state.restore(body[:state_len])
        return _pickle.loads(body[state_len : state_len + meta_len])

    # -- status --

    @property
    def address(self) -> str:
        return self.selfNode.id

    @property
    def is_leader(self) -> bool:
        """True while this member believes it leads. A leader cut off in a minority believes
        it for up to leader_fallback_s: use `read_barrier` for reads that must be current."""
        return self._isLeader()

    @property
    def leader_address(self) -> str | None:
        """The last leader this member heard of (None during an election)."""
        leader = self._getLeader()
        return None if leader is None else leader.id

    @property
    def applied_index(self) -> int:
        return self.raftLastApplied

    def members(self) -> list[str]:
        return sorted([self.address] + [n.id for n in self.otherNodes])

    def status(self) -> dict[str, Any]:
        """A snapshot of this member's view, for operators (``mesh admin``) and tests."""
        for _ in range(5):
            try:
                raw = self.getStatus()
                break
            except RuntimeError:  # the tick thread changed a dict while getStatus iterated it
                continue
        else:
            raw = self.getStatus()
        peers = {n.id: self.isNodeConnected(n) for n in self.otherNodes}
        return {
            "self": self.address,
            "state": _RAFT_STATE_NAMES.get(raw["state"], str(raw["state"])),
            "leader": self.leader_address,
            "term": raw["raft_term"],
            "commit_index": raw["commit_idx"],
            "applied_index": raw["last_applied"],
            "log_entries": raw["log_len"],
            "has_quorum": raw["has_quorum"],
            "members": self.members(),
            "peers_connected": peers,
            "cut_links": sorted(self.cut_links),
        }

    def require_leader(self) -> None:
        """Raise NotLeaderError unless this member believes it leads (see `is_leader`)."""
        if not self.is_leader:
            leader = self.leader_address
            raise NotLeaderError(
                f"{self.address} is not the leader of its Raft group; "
                + (
                    f"send this to the leader {leader}" if leader else "no leader is known (election running)"
                ),
                leader,
            )

    # -- asyncio bridge --

    async def propose(self, command: bytes, timeout_s: float = 2.0) -> object:
        """Replicate `command` and return what ``state.apply`` returned on this member.

        Retries, until `timeout_s`, the failures after which the command was certainly not
        applied (no leader, not the leader, discarded by a new leader); raises on the others.
        """
        if not isinstance(command, bytes | bytearray):
            raise TypeError(f"command must be bytes, got {type(command).__name__}")
        command = bytes(command)
        result = await self._run(lambda cb: self.apply_command(command, callback=cb), timeout_s, "proposal")
        if isinstance(result, _ApplyFailed):
            raise CommandRejected(f"the state machine rejected the command on every member: {result.error}")
        return result

    async def read_barrier(self, timeout_s: float = 2.0) -> None:
        """Return once this member has applied every entry committed before the call.

        Reading ``state`` right after gives a linearizable read on any member (the barrier
        is an empty entry through the leader, so a deposed leader cannot pass it).
        """
        await self._run(
            lambda cb: self._read_barrier(callback=cb),
            timeout_s,
            "read barrier",
            retry_on=_RETRYABLE_IF_IDEMPOTENT,
        )

    async def add_member(self, address: str, timeout_s: float = 5.0) -> None:
        """Add a member (dynamic membership). Start the new member first, with every current
        member as partners; add one member at a time."""
        await self._run(
            lambda cb: self.addNodeToCluster(address, callback=cb), timeout_s, f"adding {address}"
        )

    async def remove_member(self, address: str, timeout_s: float = 5.0) -> None:
        """Remove a member (dynamic membership); close the removed member afterwards."""
        await self._run(
            lambda cb: self.removeNodeFromCluster(address, callback=cb), timeout_s, f"removing {address}"
        )

    async def wait_for_leader(self, timeout_s: float = 5.0) -> str:
        """Poll until this member knows a leader; return its address."""
        deadline = time.monotonic() + timeout_s
        while (leader := self.leader_address) is None:
            if time.monotonic() >= deadline:
                raise self._no_leader_error(timeout_s, "waiting for a leader")
            await asyncio.sleep(0.01)
        return leader

    def cut(self, *addresses: str) -> None:
        """Fault injection: drop all Raft messages to and from these peers (tests, chaos)."""
        self.cut_links = self.cut_links | frozenset(addresses)

    def heal(self) -> None:
        self.cut_links = frozenset()

    async def close(self) -> None:
        """Stop the tick thread, close sockets and the journal; returns when all are done."""
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        if self.tick_thread_alive():
            self.destroy_synchronous()

    # -- internals --

    async def _run(
        self,
        submit: Callable[[Callable[[Any, int], None]], None],
        timeout_s: float,
        what: str,
        retry_on: set[int] = _RETRYABLE,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        backoff_s = self.timings.append_period_s
        while True:
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

            def on_result(result: Any, error: int, fut=fut) -> None:
                # Runs on pysyncobj's tick thread (or inline): must never raise, or pysyncobj
                # re-applies the entry on its next tick.
                try:
                    loop.call_soon_threadsafe(_settle, fut, result, error)
                except RuntimeError:
                    pass  # loop closed: nobody waits for this outcome any more

            submit(on_result)
            remaining_s = deadline - loop.time()
            try:
                result, error = await asyncio.wait_for(fut, max(remaining_s, 0.0))
            except TimeoutError:
                if self.leader_address is None:
                    raise self._no_leader_error(timeout_s, what) from None
                raise ProposalTimeout(
                    f"{what} on {self.address} got no outcome within {timeout_s:.2f} s (leader "
                    f"{self.leader_address}, term {self.raftCurrentTerm}); it may still commit: retry "
                    "only if applying it twice is harmless, and check the group's status() for a "
                    "partition"
                ) from None
            if error == FAIL_REASON.SUCCESS:
                return result
            if error in retry_on and deadline - loop.time() > backoff_s:
                await asyncio.sleep(backoff_s)
                continue
            raise self._error_for(error, what, timeout_s)

    def _no_leader_error(self, timeout_s: float, what: str) -> NoLeaderError:
        peers = [n for n in self.otherNodes if n.id not in self.cut_links and self.isNodeConnected(n)]
        return NoLeaderError(
            f"{what} on {self.address}: no leader for {timeout_s:.2f} s (term {self.raftCurrentTerm}, "
            f"{len(peers)}/{len(self.otherNodes)} peers reachable). If a majority of {self.members()} "
            "is down or cut off, this member is in a minority and cannot commit until the partition heals; "
            "nothing was applied"
        )

    def _error_for(self, error: int, what: str, timeout_s: float) -> RaftError:
        where = f"{what} on {self.address} (term {self.raftCurrentTerm})"
        if error in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER):
            return self._no_leader_error(timeout_s, what)
        if error == FAIL_REASON.QUEUE_FULL:
            return ProposalQueueFull(f"{where}: pysyncobj's command queue is full; back off and retry")
        if error == FAIL_REASON.DISCARDED:
            return ProposalDiscarded(
                f"{where}: a new leader replaced the entry before it committed; it was not applied, retry"
            )
        if error == FAIL_REASON.LEADER_CHANGED:
            return LeaderChangedError(
                f"{where}: the leader changed while the command was in flight; it may or may not have "
                "committed: retry only if applying it twice is harmless"
            )
        if error == FAIL_REASON.REQUEST_DENIED:
            return MembershipChangeRefused(
                f"{where}: refused by the leader (already a member, not a member, removing itself, or "
                f"another membership change is not committed yet); members now: {self.members()}"
            )
        if error == FAIL_REASON.UNKNOWN_OUTCOME:
            return ProposalTimeout(f"{where}: outcome unknown (the entry was applied through a snapshot)")
        return RaftError(f"{where}: pysyncobj failure reason {error}")


def _settle(fut: asyncio.Future, result: Any, error: int) -> None:
    if not fut.done():
        fut.set_result((result, error))
