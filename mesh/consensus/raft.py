"""Raft groups of one site on pysyncobj, bridged to asyncio.

The members of a site replicate one state machine (anything with ``apply``,
``snapshot`` and ``restore``; see `StateMachine`). `RaftGroup` is a pysyncobj
``SyncObj`` with a single replicated method that hands the command bytes to
``state.apply``. pysyncobj runs its own tick thread per group; the event loop never
waits on it: `RaftGroup.propose` registers a pysyncobj callback that resolves an
asyncio future through ``loop.call_soon_threadsafe``.

Who can talk to a member, and what they can send
    Members talk over each other's node gRPC port (`transport.py`): a stream is accepted only
    from a node certificate that names a member of the group, and frames carry msgpack of
    plain values, never pickle. There is no Raft port, no shared password, and no secret on a
    device that opens any group but its own node's certificate. pysyncobj's own log entries
    (and snapshot metadata) are still pickles that every replica reads when it applies them;
    `_pysyncobj_patch` makes pysyncobj read them with `safe_pickle`, which builds plain values
    only, so a member cannot make the others run code by what it proposes. Snapshots are
    written by this module without pickle.

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
- A single entry larger than ``appendEntriesBatchSizeBytes`` is sent by pysyncobj as a
  chunked "transmission" of a pickle; the batch size here is above any command the ledger
  accepts, and the transport refuses such messages in both directions.
- Group commit: the journal defers its msync; the transport flushes it once before any frame
  leaves (see transport.py), so entries appended together are synced together and no member
  acknowledges or counts an entry before it is durable.
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
import contextlib
import functools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from mesh.consensus import _pysyncobj_patch
from mesh.consensus.transport import COMMIT_NOTICE_HOLD_S, GrpcTransport, MemberNode, RaftLink
from mesh.consensus.wire import FrameError, decode_message, encode_message

_pysyncobj_patch.install()

logger = logging.getLogger(__name__)

_SNAPSHOT_MAGIC = b"FMRAFT2\n"
# Entries per append_entries message are cut at this many bytes. A single entry at least this
# large would be sent as a pickled "transmission", which the transport refuses: keep it above the
# largest command a state machine accepts (the ledger's is 1 MiB) and below the gRPC message cap.
APPEND_BATCH_BYTES = 2 * 1024 * 1024
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
    """No leader is reachable: this member is in a minority partition (raised at once when it reaches
    no majority and has heard from no leader for `NO_LEADER_AFTER_ELECTIONS` election timeouts), or an
    election outlasted the call's deadline. The command was not appended; it is safe to retry."""


class NotLeaderError(RaftError):
    """This member is not the leader; ``leader_id`` names the one it knows (a node id), if any."""

    def __init__(self, message: str, leader_id: str | None):
        super().__init__(message)
        self.leader_id = leader_id


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
#: A member that has heard from no leader for this many maximum election timeouts, and reaches no
#: majority of its group, is cut off, not watching an election: proposals and read barriers fail at
#: once instead of retrying until their deadline. One timeout passes before a follower even starts
#: an election (its timer is drawn up to election_max_s after the last heartbeat), so one is not
#: enough; the second covers the election itself, including a round lost to a split vote.
NO_LEADER_AFTER_ELECTIONS = 2


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
    one cannot commit anything meanwhile). Reconnection is the transport's (a member's
    streams are re-dialled within about a second, and keepalive notices a dead connection in
    about two: mesh/node/peers.py).
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
    #: Ask the others before raising the term for an election (PreVote, _pysyncobj_patch 4), so a
    #: member that restarts or comes back from a partition does not depose a leader the rest still
    #: hear. False is plain pysyncobj's election (kept for tests that show what PreVote prevents);
    #: the member still answers others' pre-votes.
    pre_vote: bool = True

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
        if self.tick_period_s <= 0:
            raise RaftConfigError("tick_period_s must be > 0")


# --- the group ------------------------------------------------------------------------------


class RaftGroup(SyncObj):
    """One member of a site's Raft group, identified by its fleet node id.

    Construct it on the event loop's thread (pysyncobj's tick thread stops when the
    constructing thread ends), with the `RaftLink` that carries its messages (registered with
    the node's Raft service); construction returns in milliseconds. ``data_dir`` belongs to
    this member of this group: the journal (``raft.journal``, its ``.meta`` and ``.vote``) and
    the snapshot (``raft.snapshot``) live there and survive restarts.

    pysyncobj snapshots every attribute a SyncObj gains after its constructor as replicated
    state: set them all before ``super().__init__``.
    """

    def __init__(
        self,
        node_id: str,
        partners: Iterable[str],
        state: StateMachine,
        *,
        data_dir: Path,
        link: RaftLink,
        timings: RaftTimings | None = None,
    ):
        timings = timings or RaftTimings()
        timings.validate()
        if link.node_id != node_id:
            raise RaftConfigError(f"the Raft link is node {link.node_id}'s, not {node_id}'s")
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # Set before SyncObj.__init__: its tick thread and transport start inside it.
        self.state = state
        self.timings = timings
        self.data_dir = data_dir
        self.link = link
        # Monotonic time this member last heard from a leader (see _note_leader_contact); starting counts
        # as contact, so a group that is forming is given the same grace as one that is electing.
        self._leader_heard_at = time.monotonic()
        self._pre_vote = _pysyncobj_patch.PreVote(
            self, self.leader_contact_s, timings.election_min_s, ask=timings.pre_vote
        )
        journal = _pysyncobj_patch.DurableJournalPath(str(data_dir / "raft.journal"), defer_flush=True)
        transport = functools.partial(
            GrpcTransport, link=link, flush=journal.flush_pending, on_message=_receive,
            hold_s=min(COMMIT_NOTICE_HOLD_S, timings.append_period_s / 4),
        )
        conf = SyncObjConf(
            autoTick=True,
            autoTickPeriod=timings.tick_period_s,
            raftMinTimeout=timings.election_min_s,
            raftMaxTimeout=timings.election_max_s,
            appendEntriesPeriod=timings.append_period_s,
            leaderFallbackTimeout=timings.leader_fallback_s,
            appendEntriesUseBatch=timings.batch_appends,
            logCompactionMinEntries=timings.compaction_min_entries,
            logCompactionMinTime=timings.compaction_min_interval_s,
            journalFile=journal,
            appendEntriesBatchSizeBytes=APPEND_BATCH_BYTES,
            fullDumpFile=str(data_dir / "raft.snapshot"),
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            useFork=False,
            dynamicMembershipChange=True,
            # Fail fast with MISSING_LEADER instead of queueing forever: propose() retries
            # until its own deadline, and a command never lingers in the queue to surface
            # after the caller has given up.
            commandsWaitLeader=False,
        )
        super().__init__(
            MemberNode(node_id),
            [MemberNode(p) for p in dict.fromkeys(partners) if p != node_id],
            conf,
            transportClass=transport,
            nodeClass=MemberNode,
        )

    # -- replicated methods (run on pysyncobj's tick thread, on every member) --

    def _onTick(self, timeToWait: float = 0.0) -> None:
        self._pre_vote.before_tick()
        super()._onTick(timeToWait)

    @replicated
    def apply_command(self, command: bytes):
        """The one replicated method. Call it through `propose`; calling it directly with
        ``sync=True`` blocks the calling thread (what bench/consensus.py measures as raw)."""
        try:
            return self.state.apply(command)
        except Exception as exc:  # deterministic on every replica; must not escape the tick
            logger.exception("state machine rejected a command on %s", self.node_id)
            return _ApplyFailed(f"{type(exc).__name__}: {exc}")

    @replicated
    def _read_barrier(self):
        return None

    # -- snapshot (log compaction, install snapshot, restart) --

    def _write_snapshot(self, path: str, raft_data: Any) -> None:
        # Called on the tick thread at the last applied entry, so state and index agree. pysyncobj's
        # part is (last applied entry, first entry, cluster nodes): written as plain values (the
        # cluster as node ids), never pickled, since a follower reads the snapshot its leader sends.
        state_bytes = self.state.snapshot()
        last_entry, first_entry, cluster = raft_data
        meta = encode_message(
            {
                "type": "snapshot",
                "last": tuple(last_entry),
                "first": tuple(first_entry),
                "cluster": sorted(node.id for node in cluster),
            }
        )
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
        try:
            meta = decode_message(body[state_len : state_len + meta_len])
            last, first, cluster = meta["last"], meta["first"], meta["cluster"]
        except (FrameError, KeyError) as exc:
            raise RaftError(f"{path} holds a damaged Raft snapshot ({exc}); move it away to resync") from None
        if (
            not _is_entry(last)
            or not _is_entry(first)
            or not isinstance(cluster, list)
            or not all(isinstance(n, str) for n in cluster)
        ):
            raise RaftError(f"{path} is not a snapshot this group wrote; move it away to resync")
        self.state.restore(body[:state_len])
        return last, first, {MemberNode(n) for n in cluster}

    # -- status --

    @property
    def node_id(self) -> str:
        """This member's fleet node id (its id in the group)."""
        return self.selfNode.id

    @property
    def is_leader(self) -> bool:
        """True while this member believes it leads. A leader cut off in a minority believes
        it for up to leader_fallback_s: use `read_barrier` for reads that must be current."""
        return self._isLeader()

    @property
    def leader_id(self) -> str | None:
        """The node id of the last leader this member heard of (None during an election)."""
        leader = self._getLeader()
        return None if leader is None else leader.id

    @property
    def applied_index(self) -> int:
        return self.raftLastApplied

    def members(self) -> list[str]:
        return sorted([self.node_id] + [n.id for n in self.otherNodes])

    def status(self) -> dict[str, Any]:
        """A snapshot of this member's view, for operators (``mesh admin``) and tests. Call it on the
        event loop (it reads the transport's per-member state)."""
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
            "self": self.node_id,
            "state": _RAFT_STATE_NAMES.get(raw["state"], str(raw["state"])),
            "leader": self.leader_id,
            "term": raw["raft_term"],
            "commit_index": raw["commit_idx"],
            "applied_index": raw["last_applied"],
            "log_entries": raw["log_len"],
            "has_quorum": raw["has_quorum"],
            "members": self.members(),
            "peers_connected": peers,
            "reachable": self.reachable(),
            "last_heard_s": {n.id: self.link.last_heard_s(n.id) for n in self.otherNodes},
            "leader_contact_s": self.leader_contact_s(),
            "cut_off": self.cut_off(),
            "no_leader_after_s": self.no_leader_after_s,
            "cut_links": sorted(self.link.cut),
        }

    @property
    def no_leader_after_s(self) -> float:
        """Without word from a leader for longer than this, proposals and read barriers fail at once."""
        return NO_LEADER_AFTER_ELECTIONS * self.timings.election_max_s

    def leader_contact_s(self) -> float:
        """Seconds since this member last heard from a leader: 0 while it leads itself; as a follower,
        since the last append it accepted from a leader (since start if none yet)."""
        if self.is_leader:
            return 0.0
        return max(0.0, time.monotonic() - self._leader_heard_at)

    def reachable(self) -> list[str]:
        """The other members this member's Raft streams reach (a stream cut by fault injection does not)."""
        return sorted(n.id for n in self.otherNodes if n.id not in self.link.cut and self.isNodeConnected(n))

    def cut_off(self) -> bool:
        """True when this member has heard from no leader for longer than `no_leader_after_s` and does
        not reach a majority of its group: it is in a minority, not watching an election. A leader it
        still names but has not heard from for that long counts as none (with every stream down,
        pysyncobj never even starts an election). A member that reaches a majority but has heard from
        no leader yet (a long election, a partition that has just healed) is not cut off: a leader is
        about to be elected or heard from."""
        if self.leader_contact_s() <= self.no_leader_after_s:
            return False
        return 2 * (1 + len(self.reachable())) <= len(self.otherNodes) + 1

    def _note_leader_contact(self, node: MemberNode, message: Any) -> None:
        """Tick thread, after pysyncobj handled `message` from `node`: an append it accepted from its
        leader, or (as the leader) a follower's answer, is contact with a leader."""
        kind = message.get("type") if isinstance(message, dict) else None
        from_leader = kind == "append_entries" and self._getLeader() == node
        to_leader = kind == "next_node_idx" and self._isLeader()
        if from_leader or to_leader:
            self._leader_heard_at = time.monotonic()

    def require_leader(self) -> None:
        """Raise NotLeaderError unless this member believes it leads (see `is_leader`)."""
        if not self.is_leader:
            leader = self.leader_id
            raise NotLeaderError(
                f"{self.node_id} is not the leader of its Raft group; "
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
        return (await self.propose_indexed(command, timeout_s))[0]

    async def propose_indexed(self, command: bytes, timeout_s: float = 2.0) -> tuple[object, int]:
        """`propose`, with the Raft index of the entry this member applied (to wait for what was written
        about that entry, not about every entry applied since)."""
        if not isinstance(command, bytes | bytearray):
            raise TypeError(f"command must be bytes, got {type(command).__name__}")
        command = bytes(command)
        result, index = await self._run(
            lambda cb: self.apply_command(command, callback=cb), timeout_s, "proposal", indexed=True
        )
        if isinstance(result, _ApplyFailed):
            raise CommandRejected(f"the state machine rejected the command on every member: {result.error}")
        return result, index

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
        member as partners; add one member at a time. Only on the leader: members refuse a change
        forwarded by a follower (see `_pysyncobj_patch.receive_message`); NotLeaderError here."""
        self.require_leader()
        await self._run(
            lambda cb: self.addNodeToCluster(address, callback=cb), timeout_s, f"adding {address}"
        )

    async def remove_member(self, address: str, timeout_s: float = 5.0) -> None:
        """Remove a member (dynamic membership); close the removed member afterwards. Only on the
        leader, as `add_member`."""
        self.require_leader()
        await self._run(
            lambda cb: self.removeNodeFromCluster(address, callback=cb), timeout_s, f"removing {address}"
        )

    async def wait_for_leader(self, timeout_s: float = 5.0) -> str:
        """Poll until this member knows a leader; return its address."""
        deadline = time.monotonic() + timeout_s
        while (leader := self.leader_id) is None:
            if time.monotonic() >= deadline:
                raise self._no_leader_error(timeout_s, "waiting for a leader")
            await asyncio.sleep(0.01)
        return leader

    def cut(self, *node_ids: str) -> None:
        """Fault injection: drop all Raft messages to and from these members (tests)."""
        self.link.cut = self.link.cut | frozenset(node_ids)

    def heal(self) -> None:
        self.link.cut = frozenset()

    async def close(self) -> None:
        """Stop the tick thread and the journal, then the member's streams; returns when all are done."""
        await asyncio.to_thread(self.close_sync)
        await self.link.close()

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
        *,
        indexed: bool = False,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        backoff_s = self.timings.append_period_s
        while True:
            if self.cut_off():
                # No leader for longer than an election takes: waiting out the deadline would only delay
                # the same answer (a minority cannot commit until the partition heals).
                raise self._no_leader_error(timeout_s, what)
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

            def on_result(result: Any, error: int, fut=fut) -> None:
                # Runs on pysyncobj's tick thread (or inline): must never raise, or pysyncobj
                # re-applies the entry on its next tick. pysyncobj calls it right after applying the
                # entry, before counting it applied: the entry's index is raftLastApplied + 1.
                if indexed:
                    result = (result, self.raftLastApplied + 1)
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits for this outcome
                    loop.call_soon_threadsafe(_settle, fut, result, error)

            submit(on_result)
            remaining_s = deadline - loop.time()
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that meets the
                # outcome in one loop turn, and the cancelled caller carries on (tests/node/test_shutdown.py).
                async with asyncio.timeout(max(remaining_s, 0.0)):
                    result, error = await fut
            except TimeoutError:
                if self.leader_id is None:
                    raise self._no_leader_error(timeout_s, what) from None
                raise ProposalTimeout(
                    f"{what} on {self.node_id} got no outcome within {timeout_s:.2f} s (leader "
                    f"{self.leader_id}, term {self.raftCurrentTerm}); it may still commit: retry "
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
        reachable = self.reachable()
        contact_s = self.leader_contact_s()
        if contact_s > self.no_leader_after_s:
            silence = f"no leader heard from for {contact_s:.1f} s"
        else:
            silence = f"no leader within {timeout_s:.2f} s (an election is running)"
        return NoLeaderError(
            f"{what} on {self.node_id}: {silence} (term {self.raftCurrentTerm}, {len(reachable)}/"
            f"{len(self.otherNodes)} peers reachable); nothing was applied. If a majority of "
            f"{self.members()} is down or cut off, this member is in a minority and cannot commit until "
            "the partition heals: retry then, or send it to a member of the majority (`mesh admin group` "
            "shows who leads)"
        )

    def _error_for(self, error: int, what: str, timeout_s: float) -> RaftError:
        where = f"{what} on {self.node_id} (term {self.raftCurrentTerm})"
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


def _is_entry(value: Any) -> bool:
    """A pysyncobj log entry: (command bytes, index, term)."""
    return (
        isinstance(value, tuple)
        and len(value) == 3
        and isinstance(value[0], bytes)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
    )


def _receive(transport: GrpcTransport, node: MemberNode, message: dict) -> None:
    """Incoming messages go through fleetmesh's receive rules (_pysyncobj_patch) into pysyncobj; then
    the group notes whether it was word from a leader."""
    sync_obj = transport._sync_obj
    if message.get("type") in (_pysyncobj_patch.PRE_VOTE, _pysyncobj_patch.PRE_VOTE_RESPONSE):
        if isinstance(sync_obj, RaftGroup):
            sync_obj._pre_vote.receive(node, message)
        return  # not pysyncobj's
    _pysyncobj_patch.receive_message(sync_obj, node, message, transport._onMessageReceived)
    if isinstance(sync_obj, RaftGroup):
        sync_obj._note_leader_contact(node, message)
