"""A node's membership in its site's Raft group: the replicated ledgers and this replica's audit log.

`SiteGroup` assembles one `RaftGroup` whose state machine is `_AuditedLedger`: the
`DecisionLedger` (the guard runs inside its apply, on every replica) and the site's
`RolloutLedger` (canary rollouts: plans, waves, gate verdicts, operator commands, the same
guard rule inside its apply), one state machine that dispatches each command by its name
(`RolloutLedger` takes the canonical commands whose ``cmd`` is one of
`mesh.rollout.state.COMMAND_NAMES`, the decision ledger everything else), with one snapshot
holding both, plus this replica's hash-chained `AuditLog` (``data_dir/audit.log``). Every
replica writes the audit events of every committed command, of either ledger, to its own
log, fsynced: apply queues them, and at the end of each pysyncobj tick (and before a
snapshot) the queue is written with one fsync (group commit). A member that proposed waits for
that sync before it answers: the audit records of a command are durable before its proposer
hears the outcome.

Audit records are written once per Raft entry, even though apply runs again
    pysyncobj replays the journal on restart: committed entries after the last snapshot are
    applied again from scratch. Each audit record carries ``raft_index`` (the index of the
    log entry that produced it; identical on every replica) and ``raft_event`` (its position
    among that entry's events). On start the group reads the last (index, event) already in
    its audit log, and apply skips every event at or before it: the ledger state is rebuilt,
    the audit log is not written twice. A crash between two events of one entry is resumed
    at the missing event. A replica that catches up through another member's snapshot never
    applies the entries the snapshot covers; it writes one ``snapshot_installed`` record
    naming the index range its log does not cover, so the gap is on the record rather than
    silent. (A restart from its own snapshot is no gap: it applied and audited those entries.)
    If the Raft journal is gone while the audit log stays, indexes are no longer comparable:
    a ``raft_journal_reset`` record is written and nothing is skipped from then on.

Reads
    `pending`, `routes`, `allocations`, `history` and `outcome_of` read this replica's
    applied state: cheap, but possibly stale on a follower or a member cut off in a minority.
    Call `await sync()` first (a read barrier through the leader) when the answer must be
    current; the Decisions servicer does so for every admin read and says when it could not.
    `audit_records` and `verify_audit` read this replica's own audit log, which is per node
    by design (each replica's log is its own evidence).

Writes (`propose`, `approve`, `deny`, `expire`, `set_routes`) may be called on any member:
pysyncobj forwards a follower's command to the leader and resolves it once this member has
applied it, so the `ApplyResult` returned is this member's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.consensus.commands import (
    approve_command,
    deny_command,
    expire_command,
    propose_command,
    remove_member_command,
    set_routes_command,
    withdraw_command,
)
from mesh.consensus.counts import GroupCounts, count_proposal
from mesh.consensus.ledger import ApplyResult, DecisionLedger, HeldDecision, HistoryEntry, Outcome
from mesh.consensus.raft import RaftGroup, RaftTimings
from mesh.consensus.transport import RaftLink
from mesh.guard.approval import Approval
from mesh.guard.audit import (
    AuditError,
    AuditLog,
    AuditRecord,
    AuditVerdict,
    read_audit,
    verify_audit,
    verify_tail,
)
from mesh.guard.core import NODE_ID_RE, Decision, Policy
from mesh.identity.revocation import Revocation
from mesh.identity.signing import TrustedKeys
from mesh.rollout.plan import RolloutPlan, SignedPlan
from mesh.rollout.state import LedgerResult, RolloutLedger, SiteRollout, Tombstone
from mesh.rollout.state import Outcome as RolloutOutcome

if TYPE_CHECKING:
    from mesh.consensus.config import RaftSection
    from mesh.consensus.ledger import Displacement

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"
# FMSITE1: the decision ledger alone (written before rollouts existed; still restored).
# FMSITE2: the decision ledger's snapshot, length-prefixed, then the rollout ledger's.
_SNAPSHOT_MAGIC_V1 = b"FMSITE1\n"
_SNAPSHOT_MAGIC = b"FMSITE2\n"
# Canonical JSON sorts keys, and "cmd" is the first key of every rollout command: this prefix routes
# a command to the rollout ledger on every replica alike (bytes spelled otherwise go to the decision
# ledger, which refuses them as malformed, also alike).
_ROLLOUT_COMMAND_PREFIX = b'{"cmd":"rollout_'
# raft_event of a snapshot_installed record: after any event the covered entries could have had.
_GAP_EVENT = 1 << 30
DEFAULT_PROPOSE_TIMEOUT_S = 3.0
# The audit writer brings the head file up to the log once it has had nothing to write for this long.
AUDIT_HEAD_IDLE_S = 0.05
# Audit records a failing log (a full disk) keeps in memory to write when it can; older ones are dropped.
MAX_UNWRITTEN_AUDIT_RECORDS = 100_000
AUDIT_RETRY_S = 1.0  # how often a failing audit log (or head file) is tried again


class GroupError(Exception):
    """Root of SiteGroup errors."""


class GroupStartError(GroupError):
    """The group cannot start (bad configuration, or an audit log that does not verify)."""


class _AuditedLedger:
    """The StateMachine the Raft group replicates: each command applied by the ledger it names (decisions
    or rollouts), then its events to the audit log.

    Runs on pysyncobj's tick thread; readers on the event loop take `lock`. Audit records are queued by
    apply and written by `flush` (group commit) on a writer thread of their own, woken at the end of
    every tick (`tick_ended`), so that the tick thread goes on replicating while the audit log syncs;
    `durable(index)` waits until the records of every entry up to `index` are on disk.
    """

    def __init__(self, ledger: DecisionLedger, rollouts: RolloutLedger, audit: AuditLog,
                 audited: tuple[int, int], on_rollout_change: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.rollouts = rollouts
        self.on_rollout_change = on_rollout_change
        self.audit = audit
        self.lock = threading.RLock()
        self.raft: RaftGroup | None = None  # set before the tick thread starts (see _SiteRaftGroup)
        self.audited = audited  # (raft_index, raft_event) of the last event already in the audit log
        self.applied_index = 0
        self.audit_error: str | None = None
        self.counts = GroupCounts()
        self._queued: list[tuple[str, Mapping[str, Any]]] = []  # audit records applied but not yet written
        self._unwritten = 0  # of them, how many a failed write left queued (they lead the queue)
        self._retry_at = 0.0  # monotonic time before which a failed log is not tried again
        self._flush_lock = threading.Lock()  # one writer at a time, so records reach the log in order
        self.durable_index = 0  # the records of every entry applied up to here are on disk
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._writer = threading.Thread(target=self._write_queued, name=f"audit-{audit.path}", daemon=True)
        self._writer.start()

    def apply(self, command: bytes) -> ApplyResult | LedgerResult:
        # pysyncobj applies entry raftLastApplied + 1 and increments raftLastApplied afterwards.
        index = self.raft.raftLastApplied + 1 if self.raft is not None else self.applied_index + 1
        with self.lock:
            if command.startswith(_ROLLOUT_COMMAND_PREFIX):
                result: ApplyResult | LedgerResult = self.rollouts.apply(command)
            else:
                result = self.ledger.apply(command)
                if index > self.audited[0]:  # not a journal replay after a restart
                    self.counts.applied(result)
            self.applied_index = index
            self._write(index, result.audit)
        changed = isinstance(result, LedgerResult) and result.outcome is RolloutOutcome.APPLIED
        if changed and self.on_rollout_change is not None:
            self.on_rollout_change()
        return result

    def _write(self, index: int, events: Sequence[Any]) -> None:
        for position, event in enumerate(events):
            if (index, position) <= self.audited:
                continue  # written before a restart: the journal replay applies it again
            payload = {**dict(event.payload), "raft_index": index, "raft_event": position}
            self._queued.append((event.kind, payload))
            self.audited = (index, position)

    def tick_ended(self) -> None:
        """End of a pysyncobj tick (tick thread): wake the writer if entries were applied since it ran."""
        if self.applied_index > self.durable_index or self._queued:
            self._wake.set()

    def _write_queued(self) -> None:
        while not self._stopping:
            if self._wake.wait(AUDIT_HEAD_IDLE_S):
                self._wake.clear()
                self.flush()
            else:  # nothing to write for a while: bring the head file up to the log
                self._sync_head()

    def _sync_head(self) -> None:
        with self._flush_lock:
            if time.monotonic() < self._retry_at:
                return
            try:
                self.audit.sync_head()
                if not self._unwritten:
                    self.audit_error = None
            except AuditError as exc:
                if self.audit_error != str(exc):
                    log.error("audit head file NOT updated (retried every %.0f s): %s", AUDIT_RETRY_S, exc)
                self.audit_error = str(exc)
                self._retry_at = time.monotonic() + AUDIT_RETRY_S

    def stop(self) -> None:
        """Stop the writer thread, then write what is still queued (after the tick thread has stopped)."""
        self._stopping = True
        self._wake.set()
        self._writer.join()
        self.flush(force=True)
        self._retry_at = 0.0
        self._sync_head()

    def flush(self, *, force: bool = False) -> None:
        """Write every queued audit record with one fsync, then release proposers waiting for them.
        Any thread (the writer's, a snapshot's, a reader that wants every record on disk). After a failed
        write the log is tried again every AUDIT_RETRY_S, or now with `force`."""
        with self._flush_lock:
            with self.lock:
                through = self.applied_index
                if self._unwritten and not force and time.monotonic() < self._retry_at:
                    queued = []  # the log failed a moment ago: let the disk drain before trying again
                else:
                    queued, self._queued = self._queued, []
            if queued:
                try:
                    # Waiters go as soon as the records are synced; the head file follows when the writer
                    # is idle (or one append behind the log at most), not in the way of the next records.
                    self.audit.append_many(queued, on_synced=lambda: self._synced(through), defer_head=True)
                except AuditError as exc:
                    # As for one record (see _append): the entries are in effect on every replica, so
                    # proposers are not held. The records stay queued, in order, and the next flush
                    # retries them: a full disk delays the audit trail, it does not cut holes in it.
                    with self.lock:
                        queued = queued[getattr(exc, "written", 0):]  # a first part may have been written
                        kept = queued[-MAX_UNWRITTEN_AUDIT_RECORDS:]
                        dropped = len(queued) - len(kept)
                        newly = len(queued) - self._unwritten
                        self._queued = kept + self._queued
                        self._unwritten = len(kept)
                    for _ in range(max(newly, 0) + dropped):
                        self.counts.audit_failed()
                    if self.audit_error is None or dropped:
                        log.error("%d audit records up to raft index %s NOT written yet (kept to retry; %d "
                                  "dropped): %s", len(queued), through, dropped, exc)
                    self.audit_error = str(exc)
                    self._retry_at = time.monotonic() + AUDIT_RETRY_S
                else:
                    if self._unwritten:
                        log.warning("audit log writable again: %d held records written", self._unwritten)
                    self._unwritten = 0
                    self.audit_error = None
            self._synced(through)

    def _synced(self, through: int) -> None:
        """The records of every entry up to `through` are on disk: release who waits for them."""
        with self.lock:
            self.durable_index = max(self.durable_index, through)
            ready = [f for i, f in self._waiters if i <= self.durable_index]
            self._waiters = [(i, f) for i, f in self._waiters if i > self.durable_index]
        if ready:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                ready[0].get_loop().call_soon_threadsafe(_release_waiters, ready)

    async def durable(self, index: int, timeout_s: float = 1.0) -> None:
        """Return once the audit records of every entry up to `index` are on disk (on the event loop)."""
        with self.lock:
            if self.durable_index >= index:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((index, waiter))
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for, which can swallow a cancellation in 3.11
                await asyncio.shield(waiter)
        except TimeoutError:  # no tick ended since (the member is stopping): write them from here
            await asyncio.to_thread(self.flush)

    def _append(self, kind: str, payload: Mapping[str, Any]) -> None:
        try:
            self.audit.append(kind, payload)
        except AuditError as exc:
            # The ledger has applied the entry on every replica; raising here would only make this
            # replica report a failure for a command that is in effect. Say it loudly instead.
            self.audit_error = str(exc)
            self.counts.audit_failed()
            log.error("audit record %s at raft index %s NOT written: %s", kind, payload.get("raft_index"),
                      exc)

    def snapshot(self) -> bytes:
        # Called by pysyncobj on the tick thread at the last applied entry. The writer's address tells a
        # restart (its own snapshot: every entry was applied and audited here) from an install (another
        # member's snapshot: the entries it covers were never applied here). Audit records still queued
        # are written first: after a restart from this snapshot, the entries it covers are not replayed.
        # (If the log still fails, records held in memory are lost at the next restart; audit_error says so.)
        self.flush(force=True)
        with self.lock:
            index = self.raft.raftLastApplied if self.raft is not None else self.applied_index
            writer = (self.raft.node_id if self.raft is not None else "").encode()
            decisions = self.ledger.snapshot()
            return (_SNAPSHOT_MAGIC + struct.pack(">QH", index, len(writer)) + writer
                    + struct.pack(">Q", len(decisions)) + decisions + self.rollouts.snapshot())

    def restore(self, data: bytes) -> None:
        head = len(_SNAPSHOT_MAGIC)
        if not data.startswith((_SNAPSHOT_MAGIC, _SNAPSHOT_MAGIC_V1)) or len(data) < head + 10:
            raise GroupError("Raft snapshot is not a fleetmesh site-group snapshot; move it away to resync")
        index, writer_len = struct.unpack(">QH", data[head : head + 10])
        writer = data[head + 10 : head + 10 + writer_len].decode("utf-8", "replace")
        self.flush(force=True)  # records queued before the snapshot go first
        body = data[head + 10 + writer_len :]
        rollouts: bytes | None = None
        if data.startswith(_SNAPSHOT_MAGIC):
            if len(body) < 8 or struct.unpack(">Q", body[:8])[0] > len(body) - 8:
                raise GroupError("Raft snapshot of the site group is truncated; move it away to resync")
            size = struct.unpack(">Q", body[:8])[0]
            body, rollouts = body[8 : 8 + size], body[8 + size :]
        with self.lock:
            # Both or neither: the rollouts are restored aside first, so a damaged part changes nothing.
            fresh = RolloutLedger(site=self.rollouts.site, trusted=self.rollouts.trusted,
                                  max_share_ppm=self.rollouts.max_share_ppm)
            if rollouts is not None:
                fresh.restore(rollouts)
            self.ledger.restore(body)
            self.rollouts = fresh
            self.applied_index = index
            mine = self.raft is not None and writer == self.raft.node_id
            if not mine and self.audited[0] < index:
                # Entries up to `index` will never be applied here: this replica's log cannot hold them.
                self._append(
                    "snapshot_installed",
                    {
                        "from_index": self.audited[0] + 1,
                        "to_index": index,
                        "snapshot_of": writer,
                        "why": "state restored from another member's Raft snapshot; the audit records of "
                        "these entries are in the logs of the replicas that applied them",
                        "raft_index": index,
                        "raft_event": _GAP_EVENT,
                    },
                )
                self.audited = (index, _GAP_EVENT)


def _release_waiters(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class _SiteRaftGroup(RaftGroup):
    """RaftGroup that hands itself to the state machine before its tick thread can apply anything,
    so the state machine knows the Raft index of each entry it applies."""

    def __init__(self, node_id: str, partners: Iterable[str], state: _AuditedLedger, **kwargs: Any):
        state.raft = self
        super().__init__(node_id, partners, state, **kwargs)


def _last_audited(records: Sequence[AuditRecord]) -> tuple[int, int]:
    for record in reversed(records):
        index, event = record.payload.get("raft_index"), record.payload.get("raft_event")
        if type(index) is int and type(event) is int:
            return index, event
    return 0, -1


class SiteGroup:
    """This node's replica of its site's decisions: propose, answer, read, audit.

    Construct it on the event loop's thread (pysyncobj's tick thread ends with the thread
    that built it), with the `RaftLink` its messages travel on (registered with the node's
    Raft service). `members` are the node ids of the whole group, this node's among them;
    every member must be built with the same members, policy and trusted keys.
    """

    def __init__(
        self,
        node_id: str,
        *,
        members: Sequence[str],
        group: str,
        data_dir: Path,
        link: RaftLink,
        trusted: TrustedKeys,
        policy: Policy | None = None,
        timings: RaftTimings | None = None,
    ) -> None:
        if not isinstance(group, str) or not NODE_ID_RE.fullmatch(group):
            raise GroupStartError(f"Raft group name {group!r} is not valid (expected {NODE_ID_RE.pattern})")
        members = list(dict.fromkeys(members))
        if node_id not in members:
            raise GroupStartError(
                f"this node ({node_id}) is not among the Raft group's members {members}; "
                "list every member, this one included, in [raft] members"
            )
        if link.group != group:
            raise GroupStartError(f"the Raft link is for group {link.group}, not {group}")
        self.node_id = node_id
        self.group = group
        self.data_dir = Path(data_dir)
        self.policy = policy or Policy()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.audit_path = self.data_dir / AUDIT_FILE
        try:
            audit = AuditLog(self.audit_path)
            audited = _last_audited(read_audit(self.audit_path)) if audit.head[0] else (0, -1)
        except AuditError as exc:
            raise GroupStartError(f"Raft group {group} cannot start on {node_id}: {exc}") from None
        if audited[0] > 0 and not (self.data_dir / "raft.journal").exists():
            # The Raft log is gone but the audit log is not (journal wiped, group re-created): indexes start
            # over, so "already audited" can no longer be judged by index. Write everything again rather
            # than skip records; the reset itself goes on the record.
            try:
                audit.append("raft_journal_reset", {
                    "last_audited_index": audited[0],
                    "why": f"no Raft journal in {self.data_dir}; entries applied from now on are "
                           "audited even if an earlier record has the same raft_index",
                })
            except AuditError as exc:
                raise GroupStartError(f"Raft group {group} cannot start on {node_id}: {exc}") from None
            audited = (0, -1)
        # An edit anywhere in the log's last MiB shows at start, in the log and `mesh admin status`.
        self.audit_check = verify_tail(self.audit_path)
        if not self.audit_check.ok:
            log.warning("audit log %s of group %s does not verify: %s (first bad record %s); run "
                        "`mesh admin audit --verify`", self.audit_path, group, self.audit_check.reason,
                        self.audit_check.first_bad_seq)
        ledger = DecisionLedger(group=group, policy=self.policy, group_size=len(members), trusted=trusted,
                                members=frozenset(members))
        # The site's rollouts: named after the group (the site), the same trusted keys on every replica.
        # The site's [guard] rollout_max_share narrows every plan's autonomous scope here.
        rollouts = RolloutLedger(site=group, trusted=trusted, max_share_ppm=self.policy.rollout_max_share_ppm)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._rollout_changed = asyncio.Event()
        self._state = _AuditedLedger(ledger, rollouts, audit, audited,
                                     on_rollout_change=self._rollout_applied)
        try:
            self.raft = _SiteRaftGroup(
                node_id,
                members,
                self._state,
                data_dir=self.data_dir,
                link=link,
                timings=timings,
            )
        except BaseException:
            self._state.stop()
            raise
        self.raft.addOnTickCallback(self._state.tick_ended)  # after the transport's: frames leave first
        self._closed = False
        # Revocation signature -> the ledger's refusal of the removal it asked for (not proposed again).
        self._refused_removals: dict[str, ApplyResult] = {}

    @classmethod
    def from_config(
        cls,
        node_id: str,
        raft: RaftSection,
        guard: Mapping[str, Any] | Policy | None,
        *,
        site: str | None,
        node_data_dir: Path,
        creds_dir: Path,
        link: RaftLink,
    ) -> SiteGroup:
        """Build from a node's [raft] section (`RaftSection`), its [guard] table, its site label,
        credentials folder (publisher.pub, operator.pub) and Raft link. Data lives in node_data_dir/raft."""
        from mesh.consensus.config import policy_from_table
        from mesh.identity.ca import load_trusted_keys

        policy = guard if isinstance(guard, Policy) else policy_from_table(guard)
        return cls(
            node_id,
            members=list(raft.members),
            group=raft.group_id(site),
            data_dir=Path(node_data_dir) / "raft",
            link=link,
            trusted=load_trusted_keys(creds_dir),
            policy=policy,
            timings=raft.timings(),
        )

    # -- writes (any member; forwarded to the leader by pysyncobj) --

    async def propose(self, decision: Decision, timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> ApplyResult:
        """Replicate a decision: applied at once within scope, HELD above it (on every replica)."""
        command = propose_command(decision, now=time.time())
        return await count_proposal(self.counts, decision.kind.value, self._propose(command, timeout_s))

    async def approve(self, approval: Approval, timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> ApplyResult:
        """Submit an operator's signed approval; every replica verifies it inside apply."""
        return await self._propose(approve_command(approval, now=time.time()), timeout_s)

    async def deny(self, approval: Approval, timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> ApplyResult:
        """Submit an operator's signed denial (an Approval with approve=False)."""
        return await self._propose(deny_command(approval, now=time.time()), timeout_s)

    async def expire(self, timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> ApplyResult:
        """Drop held decisions whose hold TTL has passed (and forget old outcomes and nonces)."""
        return await self._propose(expire_command(time.time()), timeout_s)

    async def withdraw(self, decision_id: str, reason: str,
                       timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> ApplyResult:
        """Finish a held decision unapplied on every replica because its premise is gone (`reason`)."""
        return await self._propose(withdraw_command(decision_id, reason=reason, now=time.time()), timeout_s)

    async def set_routes(
        self,
        routes: Mapping[str, str],
        allocations: Mapping[str, int] | None = None,
        timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S,
    ) -> ApplyResult:
        """Initial assignment of streams and allocations that have none (moving one is a decision)."""
        command = set_routes_command(routes, allocations=allocations, now=time.time())
        return await count_proposal(self.counts, "set_routes", self._propose(command, timeout_s))

    async def _propose(self, command: bytes, timeout_s: float) -> ApplyResult:
        result, index = await self.raft.propose_indexed(command, timeout_s=timeout_s)
        await self._state.durable(index)  # its audit records are on disk (not every later entry's)
        if not isinstance(result, ApplyResult):  # RaftGroup.propose returns what state.apply returned
            raise GroupError(f"unexpected apply result {result!r}")
        return result

    async def propose_rollout(self, command: bytes,
                              timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> LedgerResult:
        """Replicate a rollout command (`mesh.rollout.state`: `plan_command`, `encode_input`); every replica
        verifies plans and operator signatures inside its apply. Returns this member's result, once the
        audit records of it are on disk (an operator told "applied" finds it in the audit log)."""
        if not command.startswith(_ROLLOUT_COMMAND_PREFIX):
            raise GroupError("not a rollout command (expected canonical JSON with a rollout_* cmd)")
        result, index = await self.raft.propose_indexed(command, timeout_s=timeout_s)
        await self._state.durable(index)  # its audit records are on disk, as decisions'
        if not isinstance(result, LedgerResult):
            raise GroupError(f"unexpected apply result {result!r}")
        return result

    async def run_expiry(self, interval_s: float = 10.0) -> None:
        """Background task for the node: while this member leads, expire held decisions that are due."""
        while not self._closed:
            await asyncio.sleep(interval_s)
            now = time.time()
            if self.raft.is_leader and any(h.expires_at <= now for h in self.pending()):
                try:
                    result = await self.expire()
                    log.info("group %s: %s", self.group, result.message)
                except Exception as exc:  # noqa: BLE001 - the next round retries; the node's task must not die
                    log.warning("group %s: expiring held decisions failed: %s", self.group, exc)

    async def remove_revoked(self, revocation: Revocation,
                             timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S) -> ApplyResult | None:
        """Take the member an operator revoked out of this group, through the guard: first the ledger
        entry that carries the signed revocation (every replica verifies the operator's signature and
        that the node is a configured member, and audits the removal once; anything else is refused
        there), then the Raft membership change it authorises, which only the leader makes. Returns the
        ledger entry's result (None when the node is not, or no longer, a member, or is this node).

        Idempotent across leaders: a removal whose ledger entry applied but whose membership change
        did not (the leader failed in between) is finished by the next leader from the replicated
        state, and a second entry for it would be a no-op with no audit record.
        """
        node_id = revocation.node_id
        if node_id == self.node_id or node_id not in self.raft.members():
            return None
        result = None
        with self._state.lock:
            authorised = node_id in self._state.ledger.removed_members()
        if not authorised:
            if (refused := self._refused_removals.get(revocation.signature)) is not None:
                return refused
            result = await self._propose(remove_member_command(revocation, now=time.time()), timeout_s)
            if result.outcome is Outcome.REFUSED:
                self._refused_removals[revocation.signature] = result
                log.error("group %s: the ledger refused to remove revoked member %s: %s; this leader does "
                          "not propose it again until it restarts (check the [tls] operator keys of this "
                          "site's members)", self.group, node_id, result.message)
                return result
        if node_id in self.raft.members():
            await self.raft.remove_member(node_id, timeout_s)
            log.warning("group %s: removed revoked member %s (%d members now)", self.group, node_id,
                        len(self.raft.members()))
        return result

    async def run_member_removal(self, revocation_of: Callable[[str], Revocation | None],
                                 interval_s: float = 1.0) -> None:
        """Background task for the node: while this member leads, remove every member whose certificates
        an operator revoked (`revocation_of(node_id)` names the revocation). Other members already refuse
        its messages; removing it also takes it out of the majority the group counts."""
        while not self._closed:
            await asyncio.sleep(interval_s)  # a check period, not synchronisation
            if not self.raft.is_leader:
                continue
            for node_id in self.raft.members():
                revocation = revocation_of(node_id) if node_id != self.node_id else None
                if revocation is None or revocation.signature in self._refused_removals:
                    continue  # refused by the ledger: logged then; an operator must look
                try:
                    await self.remove_revoked(revocation)
                except Exception as exc:  # noqa: BLE001 - the next round retries; the node's task must not die
                    log.warning("group %s: removing revoked member %s failed (retrying): %s", self.group,
                                node_id, exc)
                break  # one membership change at a time (pysyncobj's rule)

    # -- reads --

    async def sync(self, timeout_s: float = 2.0) -> None:
        """Read barrier through the leader: afterwards this replica's reads are current.
        Raises NoLeaderError in a minority partition (the local state is then the last committed one)."""
        await self.raft.read_barrier(timeout_s)

    def pending(self) -> tuple[HeldDecision, ...]:
        """Decisions held for an operator on this replica (see module docstring about staleness)."""
        with self._state.lock:
            return self._state.ledger.pending()

    def routes(self) -> dict[str, str]:
        with self._state.lock:
            return self._state.ledger.routes()

    def allocations(self) -> dict[str, int]:
        with self._state.lock:
            return self._state.ledger.allocations()

    def history(self) -> tuple[HistoryEntry, ...]:
        with self._state.lock:
            return self._state.ledger.history()

    def displaced(self) -> dict[str, Displacement]:
        """Streams a reassignment took from their node, still where it put them (what a return gives back)."""
        with self._state.lock:
            return self._state.ledger.displaced()

    def outcome_of(self, decision_id: str) -> str | None:
        with self._state.lock:
            return self._state.ledger.outcome_of(decision_id)

    def held(self, decision_id: str) -> HeldDecision | None:
        return next((h for h in self.pending() if h.decision_id == decision_id), None)

    def rollouts(self) -> tuple[tuple[RolloutPlan, SiteRollout], ...]:
        """Every rollout this replica's site holds, oldest plan first (see the staleness note above)."""
        with self._state.lock:
            return self._state.rollouts.rollouts()

    def rollout_tombstones(self) -> tuple[Tombstone, ...]:
        """Aborted rollouts this site has forgotten the plans of (devices still never serve their targets)."""
        with self._state.lock:
            return self._state.rollouts.tombstones()

    def rollout(self, rollout_id: str) -> tuple[RolloutPlan, SiteRollout] | None:
        with self._state.lock:
            return self._state.rollouts.get(rollout_id)

    def signed_plan(self, rollout_id: str) -> SignedPlan | None:
        with self._state.lock:
            return self._state.rollouts.signed_plan(rollout_id)

    def _rollout_applied(self) -> None:
        # On pysyncobj's tick thread: wake whoever waits on the loop.
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._rollout_changed.set)

    async def rollout_changed(self, timeout_s: float) -> bool:
        """Wait until a rollout command changes this replica's state (True) or `timeout_s` passes (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._rollout_changed.wait()
        except TimeoutError:
            return False
        self._rollout_changed.clear()
        return True

    def rollout_clock(self) -> float:
        """The rollout ledger's time: the largest `now` any applied rollout command carried."""
        with self._state.lock:
            return self._state.rollouts.clock

    def state_digest(self) -> str:
        """Digest of both replicated ledgers: replicas that applied the same log agree on it."""
        with self._state.lock:
            both = self._state.ledger.state_digest() + self._state.rollouts.state_digest()
        return hashlib.sha256(both.encode()).hexdigest()

    @property
    def applied_index(self) -> int:
        return self.raft.applied_index

    @property
    def counts(self) -> GroupCounts:
        """What this replica proposed, judged and failed to audit (for metrics)."""
        return self._state.counts

    @property
    def group_size(self) -> int:
        return self._state.ledger.group_size

    def audit_records(self) -> list[AuditRecord]:
        """This replica's audit records (display only; `verify_audit` checks the chain)."""
        self._state.flush()
        with self._state.lock:
            return read_audit(self.audit_path)

    def verify_audit(self) -> AuditVerdict:
        self._state.flush()
        with self._state.lock:
            return verify_audit(self.audit_path)

    def status(self) -> dict[str, Any]:
        status = self.raft.status()
        seq, head_hash = self._state.audit.head
        status.update(
            node_id=self.node_id,
            group=self.group,
            group_size=self.group_size,
            pending=len(self.pending()),
            audit_head={"seq": seq, "hash": head_hash},
            audit_error=self._state.audit_error,
            audit_check={"ok": self.audit_check.ok, "records": self.audit_check.records,
                         "first_bad_seq": self.audit_check.first_bad_seq, "reason": self.audit_check.reason},
        )
        return status

    async def close(self) -> None:
        """Stop the Raft member, then close the audit log."""
        if self._closed:
            return
        self._closed = True
        await self.raft.close()
        await asyncio.to_thread(self._state.stop)
        with self._state.lock:
            self._state.audit.close()


__all__ = ["GroupError", "GroupStartError", "Outcome", "SiteGroup"]
