"""pysyncobj's transport over the node's gRPC server: Raft under each member's own mTLS.

A site group's members talk over the `Raft.Exchange` stream of each other's node gRPC port.
There is no Raft port of its own, no shared password, and no pickle on the wire:

- Who: a stream is accepted only from a node certificate whose name is a member of the
  group named in the call (`RaftServicer`); a node of another site, an operator certificate,
  or a revoked node is refused with PERMISSION_DENIED, logged and counted.
- What: frames are msgpack of plain values (`wire.py`); anything else is refused, logged,
  counted, and the stream is closed. pysyncobj's own log entries are pickles that every
  replica reads when it applies them: those are read by `safe_pickle` (see _pysyncobj_patch).
- Threads: pysyncobj runs on its tick thread, gRPC on the node's event loop. `GrpcTransport`
  (tick-thread side) hands outgoing frames to `RaftLink` (loop side) with
  ``call_soon_threadsafe``; the link hands incoming messages and connection changes back
  through a queue and a pipe that wakes the tick thread's poller. pysyncobj is only ever
  entered on its tick thread.
- Durability (group commit): the transport releases what the tick thread sent at two points,
  each with one `flush` of the journal: at the end of every tick and after each batch of
  incoming messages, so entries appended together are synced together. A frame that tells
  a peer what this member holds (an acknowledgement, a vote) leaves only after the flush: a
  follower acknowledges an entry only once it is on disk. A batch of append_entries alone
  (the leader replicating) leaves before the flush, so the leader's sync runs while the
  followers write theirs, as in etcd; this is safe because the leader counts its own copy
  towards a commit only when it handles a follower's reply, on the same tick thread, after
  the flush has returned.
- Healing: each member keeps one outgoing stream per peer, re-dialled with a short
  back-off (0.05 s doubling to 1 s) through channels with keepalive (mesh/node/peers.py),
  so a member rejoins within about a second of a partition healing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from pysyncobj import FAIL_REASON
from pysyncobj.node import Node
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.transport import Transport

from mesh._proto import raft_pb2 as pb
from mesh._proto import raft_pb2_grpc as pb_grpc
from mesh.consensus.wire import FrameError, decode_message, encode_message
from mesh.identity.ca import Role
from mesh.identity.tls import peer_identity
from mesh.retry import Backoff

log = logging.getLogger("mesh.consensus.transport")

GROUP_KEY = "x-mesh-raft-group"
# Frames queued for one peer before its stream is considered stuck and dropped (Raft resends).
MAX_QUEUED_BYTES = 16 * 1024 * 1024
# Frames written in one gRPC message.
MAX_FRAMES_PER_BATCH = 256
# Messages that claim nothing about the sender's journal: a batch of only these may leave before the
# journal's flush. append_entries carries the leader's entries; the leader counts its own copy only after
# its flush (see the module docstring). Everything else (next_node_idx, votes) waits for the flush.
_SENT_BEFORE_FLUSH = frozenset({"append_entries"})
# Command bytes `coalesce` puts in one merged append_entries (each entry is at most the ledger's 1 MiB).
MAX_COALESCED_ENTRY_BYTES = 1024 * 1024
# Entries `coalesce` puts in one merged append_entries (bounds a follower's work per message; at 16
# proposers 4 was measured as fast as no bound: 1,082-1,125 vs 1,072-1,106 decisions/s). 1 sends every
# entry on its own, as plain pysyncobj does (read at each call, so a test can emulate that).
MAX_COALESCED_ENTRIES = 4
# How long a leader may hold a commit notice, an append_entries with no entries, for a member it sent a
# frame to less than this long ago (see `GrpcTransport`); RaftGroup passes at most a quarter of its
# heartbeat period.
COMMIT_NOTICE_HOLD_S = 0.01

DialRaft = Callable[[str], "pb_grpc.RaftStub | None"]
"""node id -> stub over an mTLS channel to that member (None while its address is unknown)."""


class MemberNode(Node):
    """A group member as pysyncobj sees it: its id is the fleet node id."""


@dataclass
class TransportCounters:
    """What crossed the transport, for metrics, status and tests."""

    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    refused_frames: int = 0
    refused_streams: int = 0
    dropped_frames: int = 0  # queued for a peer whose stream went down, or over its queue budget
    reconnects: int = 0


class _Peer:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued_bytes = 0
        self.ready = asyncio.Event()  # set when frames are queued
        self.up = False
        self.task: asyncio.Task | None = None
        self.call: Any = None  # the current outgoing stream
        # What the outgoing stream's task is doing ("dialing", "hello": waiting for the member's hello,
        # "up", "backoff", "refused"), and since when (loop time): for status and diagnostics.
        self.phase = "dialing"
        self.phase_since = 0.0
        self.refused_logged = False
        self.denied_logged = False  # its refusal of our certificate was logged (until a stream is up)
        self.last_heard: float | None = None  # loop time of the last frame from this member


class RaftLink:
    """The event-loop side of one member's transport: streams to peers, frames from peers.

    Build it on the loop; the `RaftGroup` built with it creates its `GrpcTransport`. Register
    it with the node's `RaftServicer` so peers' streams reach it.
    """

    def __init__(self, *, group: str, node_id: str, dial: DialRaft, rng: random.Random | None = None,
                 accept: Callable[[str], str | None] | None = None) -> None:
        """`accept(node_id)`: None if that node may talk to this group's members, else why not
        (revocation); membership of the group is checked in any case."""
        self.group = group
        self.node_id = node_id
        self.loop = asyncio.get_running_loop()
        self.counters = TransportCounters()
        self.members: frozenset[str] = frozenset({node_id})  # kept by the transport (tick thread)
        self.cut: frozenset[str] = frozenset()  # fault injection: peers whose frames are dropped silently
        self._dial = dial
        self._accept = accept
        self._rng = rng or random.Random()
        self._peers: dict[str, _Peer] = {}
        self._transport: GrpcTransport | None = None
        self.closed = False

    # -- called by the transport (tick thread) through call_soon_threadsafe --

    def _bind(self, transport: GrpcTransport) -> None:
        self._transport = transport

    def _add_peer(self, node_id: str) -> None:
        if self.closed or node_id in self._peers or node_id == self.node_id:
            return
        peer = self._peers[node_id] = _Peer(node_id)
        name = f"raft-{self.group}-{self.node_id}->{node_id}"
        peer.task = self.loop.create_task(self._run_peer(peer), name=name)

    def _drop_peer(self, node_id: str) -> None:
        peer = self._peers.pop(node_id, None)
        if peer is not None and peer.task is not None:
            peer.task.cancel()

    def _send(self, batch: list[tuple[str, bytes]]) -> None:
        for node_id, frame in batch:
            peer = self._peers.get(node_id)
            if peer is None or not peer.up or node_id in self.cut:
                self.counters.dropped_frames += 1
                continue
            if self._accept is not None and self._accept(node_id) is not None:
                self.counters.dropped_frames += 1
                if peer.call is not None:
                    peer.call.cancel()  # no longer trusted (or cut off): close our stream to it
                continue
            if peer.queued_bytes + len(frame) > MAX_QUEUED_BYTES:
                # The peer does not read its stream (flow control holds our writes): drop what is
                # queued rather than grow without bound; Raft resends from the peer's next index.
                log.warning("raft %s: %s is not reading its stream; dropping %d queued bytes",
                            self.group, node_id, peer.queued_bytes)
                self.counters.dropped_frames += len(peer.queue) + 1
                peer.queue.clear()
                peer.queued_bytes = 0
                continue
            peer.queue.append(frame)
            peer.queued_bytes += len(frame)
            peer.ready.set()

    # -- incoming (the servicer, on the loop) --

    def refusal(self, node_id: str) -> str | None:
        """None if `node_id` may stream to this member, else why not."""
        if node_id not in self.members or node_id == self.node_id:
            return f"{node_id} is not a member of Raft group {self.group}"
        if self._accept is not None:
            return self._accept(node_id)
        return None

    def receive(self, node_id: str, frame: bytes) -> None:
        """A frame from `node_id` (authorised by the servicer): decode it and hand it to pysyncobj.
        Raises FrameError for a frame that is not a plain-valued message."""
        if node_id in self.cut or self.closed:
            return
        message = decode_message(frame)
        self.counters.frames_in += 1
        self.counters.bytes_in += len(frame)
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.last_heard = self.loop.time()
        if self._transport is not None:
            self._transport._post(("message", node_id, message))

    # -- status --

    def connected(self) -> dict[str, bool]:
        """node id -> whether this member's stream to it is up."""
        return {node_id: peer.up and node_id not in self.cut for node_id, peer in self._peers.items()}

    def last_heard_s(self, node_id: str) -> float | None:
        """Seconds since the last frame from `node_id` (None if never)."""
        peer = self._peers.get(node_id)
        if peer is None or peer.last_heard is None:
            return None
        return self.loop.time() - peer.last_heard

    async def close(self) -> None:
        self.closed = True
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._peers.clear()

    # -- one outgoing stream per peer --

    def _phase(self, peer: _Peer, phase: str) -> None:
        peer.phase, peer.phase_since = phase, self.loop.time()

    def phases(self) -> dict[str, tuple[str, float]]:
        """node id -> (what the outgoing stream to it is doing, for how many seconds)."""
        now = self.loop.time()
        return {node_id: (p.phase, now - p.phase_since) for node_id, p in self._peers.items()}

    async def _run_peer(self, peer: _Peer) -> None:
        backoff = Backoff(first_s=0.05, max_s=1.0, rng=random.Random(self._rng.random()))
        while not self.closed:
            if self._accept is not None and (why := self._accept(peer.node_id)) is not None:
                if not peer.refused_logged:
                    peer.refused_logged = True
                    log.warning("raft %s: not streaming to %s: %s", self.group, peer.node_id, why)
                self._phase(peer, "refused")
                await asyncio.sleep(1.0)  # looked at again: a cut link heals (a revocation does not)
                continue
            peer.refused_logged = False
            self._phase(peer, "dialing")
            try:
                stub = self._dial(peer.node_id)
            except (ConnectionError, OSError) as exc:
                log.debug("raft %s: cannot dial %s: %s", self.group, peer.node_id, exc)
                stub = None
            if stub is not None:
                try:
                    await self._stream(peer, stub, backoff)
                except Exception as exc:  # noqa: BLE001 - whatever ended the stream, this task must live on
                    # An exception out of here would end this task for good, silently (it is referenced,
                    # so asyncio never reports it): the member would never stream to this peer again.
                    log.warning("raft %s: stream %s -> %s failed: %r; dialling again", self.group,
                                self.node_id, peer.node_id, exc)
            self._phase(peer, "backoff")
            await asyncio.sleep(backoff.next_delay_s())  # reconnect pacing

    async def _stream(self, peer: _Peer, stub: pb_grpc.RaftStub, backoff: Backoff) -> None:
        """Stream to `peer` until the stream ends."""
        call = peer.call = stub.Exchange(metadata=((GROUP_KEY, self.group),))
        writer: asyncio.Task | None = None
        reader: asyncio.Future | None = None
        self._phase(peer, "hello")
        try:
            hello = await call.read()
            if hello is grpc.aio.EOF:
                return
            self._phase(peer, "up")
            backoff.reset()
            peer.denied_logged = False
            self.counters.reconnects += 1
            peer.up = True
            self._notify(("up", peer.node_id))
            writer = asyncio.ensure_future(self._write(peer, call))
            reader = asyncio.ensure_future(call.read())  # ends when the stream does
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
            # Take every task's exception (one left unread is logged as "never retrieved"), raise the first.
            errors = [t.exception() for t in (writer, reader) if t.done() and not t.cancelled()]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
        except grpc.aio.AioRpcError as exc:
            denied = exc.code() is grpc.StatusCode.PERMISSION_DENIED
            level = logging.WARNING if denied and not peer.denied_logged else logging.DEBUG
            peer.denied_logged = peer.denied_logged or denied  # once until a stream is up again
            log.log(level, "raft %s: stream %s -> %s ended: %s %s", self.group, self.node_id, peer.node_id,
                    exc.code().name, exc.details())
        except (ConnectionError, OSError) as exc:  # refused to dial (fault injection, bad address)
            log.debug("raft %s: cannot stream to %s: %s", self.group, peer.node_id, exc)
        except asyncio.InvalidStateError as exc:
            # A write raced the end of the stream ("RPC already finished": the peer stopped or
            # restarted while frames were going out): the stream is over, like any other end.
            log.debug("raft %s: stream %s -> %s ended under a write: %s", self.group, self.node_id,
                      peer.node_id, exc)
        finally:
            for task in (writer, reader):  # also when this task is cancelled (the member was removed)
                if task is not None:
                    task.cancel()
                    if task.done() and not task.cancelled():
                        task.exception()  # taken, so it is not logged as "never retrieved"
            call.cancel()
            peer.call = None
            if peer.up:
                peer.up = False
                self._notify(("down", peer.node_id))
            self.counters.dropped_frames += len(peer.queue)
            peer.queue.clear()
            peer.queued_bytes = 0

    async def _write(self, peer: _Peer, call: Any) -> None:
        while True:
            await peer.ready.wait()
            peer.ready.clear()
            while peer.queue:
                frames: list[bytes] = []
                while peer.queue and len(frames) < MAX_FRAMES_PER_BATCH:
                    frame = peer.queue.popleft()
                    peer.queued_bytes -= len(frame)
                    frames.append(frame)
                self.counters.frames_out += len(frames)
                self.counters.bytes_out += sum(len(f) for f in frames)
                await call.write(pb.RaftBatch(frames=frames))

    def _notify(self, event: tuple[str, str]) -> None:
        if self._transport is not None:
            self._transport._post(event)


def coalesce(messages: list[tuple[str, dict]], max_entry_bytes: int = MAX_COALESCED_ENTRY_BYTES,
             max_entries: int | None = None) -> list[tuple[str, dict]]:
    """The same (node id, message) sequence with fewer messages: pure.

    A leader with unbatched appends sends each new entry to each follower in a message of its own,
    and a follower acknowledges each. Within one release, consecutive append_entries to the same peer
    that continue each other (the next starts where the previous ends, same term) become one message
    with all their entries and the latest commit index, and consecutive successful acknowledgements
    to the same peer become the last one. A follower handles the merged message exactly as it would
    the sequence (Raft's append_entries carries any number of entries), and answers it once. Order
    per peer is kept; nothing else is merged.
    """
    max_entries = MAX_COALESCED_ENTRIES if max_entries is None else max_entries  # read now: tests may set it
    out: list[tuple[str, dict]] = []
    last_for: dict[str, int] = {}  # node id -> position in `out` of the last message to it
    for node_id, message in messages:
        at = last_for.get(node_id)
        if at is not None:
            merged = _merge(out[at][1], message, max_entry_bytes, max_entries)
            if merged is not None:
                out[at] = (node_id, merged)
                continue
        last_for[node_id] = len(out)
        out.append((node_id, message))
    return out


class NoticeHolder:
    """Which commit notices a leader holds back, and until when (see `GrpcTransport`): pure, the time
    is passed in. `release` takes what pysyncobj sent since the last release and returns what leaves
    now, coalesced; what it holds goes out in front of the next release's messages to that member."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.held: list[tuple[str, dict]] = []  # in the order pysyncobj sent them
        self._sent_at: dict[str, float] = {}  # node id -> when a frame last left for it
        self._told: dict[str, int] = {}  # node id -> the highest commit index sent to it
        self._forwarded: dict[str, int] = {}  # node id -> log index of the last command it forwarded

    def forwarded(self, node_id: str, log_idx: int) -> None:
        """The leader appended a command `node_id` forwarded, at `log_idx`: that member answers its caller
        only once it learns the entry is committed, so no notice to it is held until it has been told."""
        self._forwarded[node_id] = max(self._forwarded.get(node_id, 0), log_idx)

    def release(self, messages: list[tuple[str, dict]], now: float) -> list[tuple[str, dict]]:
        out = coalesce(self.held + messages)
        self.held = []
        if self.hold_s <= 0:
            return out
        count = collections.Counter(node_id for node_id, _ in out)
        sent = []
        for node_id, message in out:
            if (count[node_id] == 1 and _is_notice(message)
                    and now - self._sent_at.get(node_id, -math.inf) < self.hold_s
                    and self._forwarded.get(node_id, 0) <= self._told.get(node_id, 0)):
                self.held.append((node_id, message))
                continue
            sent.append((node_id, message))
            self._sent_at[node_id] = now
            if message.get("type") == "append_entries":
                self._told[node_id] = max(self._told.get(node_id, 0), message.get("commit_index", 0))
        return sent


def _is_notice(message: dict) -> bool:
    """An append_entries that carries no entries (a commit notice, or a heartbeat)."""
    return message.get("type") == "append_entries" and _plain_append(message) and not message.get("entries")


def _plain_append(message: dict) -> bool:
    """An append_entries of log entries (not a chunk of a large entry, nor a snapshot)."""
    return "prevLogIdx" in message and "transmission" not in message and "serialized" not in message


def _merge(first: dict, second: dict, max_entry_bytes: int, max_entries: int) -> dict | None:
    """`first` and `second` as one message, or None if they are not two pieces of one append or ack."""
    kind = first.get("type")
    if kind != second.get("type"):
        return None
    if kind == "next_node_idx":
        both_succeeded = all(m.get("success") and not m.get("reset") for m in (first, second))
        if both_succeeded and second.get("next_node_idx", -1) >= first.get("next_node_idx", 0):
            return second
        return None
    if kind != "append_entries" or first.get("term") != second.get("term"):
        return None
    if not (_plain_append(first) and _plain_append(second)):
        return None
    entries_1, entries_2 = first.get("entries", []), second.get("entries", [])
    if entries_1:
        end_idx, end_term = entries_1[-1][1], entries_1[-1][2]
    else:
        end_idx, end_term = first["prevLogIdx"], first["prevLogTerm"]
    if second["prevLogIdx"] != end_idx or second["prevLogTerm"] != end_term:
        return None
    if entries_2 and len(entries_1) + len(entries_2) > max_entries:
        return None
    if entries_2 and sum(len(e[0]) for e in entries_1) + sum(len(e[0]) for e in entries_2) > max_entry_bytes:
        return None
    return {**first, "entries": list(entries_1) + list(entries_2),
            "commit_index": max(first["commit_index"], second["commit_index"])}


class GrpcTransport(Transport):
    """The tick-thread side: pysyncobj's Transport, built by SyncObj with
    ``transportClass=functools.partial(GrpcTransport, link=..., flush=...)``.

    `flush` makes the journal durable; it runs before any frame is released (group commit).
    `on_message(transport, node, message)` delivers an incoming message to pysyncobj (a hook
    for _pysyncobj_patch's receive rules); by default `_onMessageReceived`.

    Commit notices (`hold_s` > 0): a pysyncobj leader sends every follower an append_entries with
    no entries as soon as it applies an entry, only to tell it the new commit index, and each
    follower answers it; with one proposer that doubles the frames of a commit (two appends, two
    acknowledgements, two notices, two more acknowledgements), and a gRPC frame costs far more CPU
    than the Raft work it carries. Such a message, when it is the only one for that member in a
    release and the member was sent a frame less than `hold_s` ago, is held and goes out with the
    next frame for that member (one merged append_entries, one answer), or alone at the first
    release after `hold_s` has passed since that last frame: releases happen at least every tick, so
    a held notice waits at most `hold_s` plus `tick_period_s` (about 30 ms by default). Proposals
    that follow each other closely save a frame and its answer per follower; proposals further apart
    than that save nothing, and their followers apply up to that much later. Never held: any notice
    to a member that forwarded a command (`apply_command_response` with its log index) until it has
    been sent a commit index at least that far, since it answers its caller only once it learns the
    commit; anything with entries; every other message. Nothing else on a follower waits on the
    commit index but its own view (what it has applied, lag metrics), and Raft's safety never
    depends on when a commit index arrives. Order per member is kept: a held message leaves in
    front of, or merged into, the next message to that member.
    """

    def __init__(self, syncObj: Any, selfNode: MemberNode, otherNodes: Iterable[MemberNode], *,
                 link: RaftLink,
                 flush: Callable[[], None] = lambda: None,
                 on_message: Callable[[GrpcTransport, MemberNode, dict], None] | None = None,
                 hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._sync_obj = syncObj
        self._self = selfNode
        self._link = link
        self._loop = link.loop
        self._flush = flush
        self._on_message = on_message
        self._nodes: dict[str, MemberNode] = {}
        self._connected: set[str] = set()
        self._inbox: collections.deque[tuple] = collections.deque()
        self._outgoing: list[tuple[str, dict]] = []  # messages sent since the last release, encoded then
        self._wake_pending = False  # a wake-up of the tick thread is on its way (loop sets, _drain clears)
        self._flush_first = False  # _outgoing holds a frame that may leave only once the journal is durable
        self._lock = threading.Lock()  # guards _outgoing, _notices: send() may run outside the tick
        self._notices = NoticeHolder(hold_s)  # commit notices held back (see the class docstring)
        self._clock = clock
        self._notifier = PipeNotifier(syncObj._poller, self._drain)
        self._destroyed = False
        link._bind(self)
        for node in otherNodes:
            self.addNode(node)
        syncObj.addOnTickCallback(self._release)

    # -- pysyncobj's interface (tick thread) --

    def addNode(self, node: MemberNode) -> None:
        self._nodes[node.id] = node
        self._link.members = frozenset({self._self.id, *self._nodes})
        self._loop.call_soon_threadsafe(self._link._add_peer, node.id)

    def dropNode(self, node: MemberNode) -> None:
        self._nodes.pop(node.id, None)
        self._connected.discard(node.id)
        self._link.members = frozenset({self._self.id, *self._nodes})
        self._loop.call_soon_threadsafe(self._link._drop_peer, node.id)

    def send(self, node: MemberNode, message: dict) -> bool:
        if node.id not in self._connected:
            if message.get("type") == "apply_command" and "request_id" in message:
                # pysyncobj ignores a failed send and would wait for the leader's answer forever
                # (until the caller's deadline): answer it at once as the leader would, "not the
                # leader", so the proposal is retried with back-off instead.
                self._post(("message", node.id, {"type": "apply_command_response",
                                                  "request_id": message["request_id"],
                                                  "error": FAIL_REASON.NOT_LEADER}))
            return False
        with self._lock:
            self._outgoing.append((node.id, message))
            if message.get("type") not in _SENT_BEFORE_FLUSH:
                self._flush_first = True
            if message.get("type") == "apply_command_response" and "log_idx" in message:
                self._notices.forwarded(node.id, message["log_idx"])
        return True

    def destroy(self) -> None:
        self._destroyed = True
        self._sync_obj.removeOnTickCallback(self._release)

    # -- incoming, on the tick thread --

    def _post(self, item: tuple) -> None:
        """From the loop: queue an event for the tick thread and wake it (once until it drains: a pipe
        write is a system call, and the drain takes every queued event)."""
        self._inbox.append(item)
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the tick thread is due to drain
            self._notifier.notify()

    def _drain(self) -> None:
        # Cleared before draining: an event posted from here on wakes the tick thread again.
        self._wake_pending = False
        while self._inbox and not self._destroyed:
            kind, node_id, *rest = self._inbox.popleft()
            node = self._nodes.get(node_id)
            if node is None:
                continue  # not (or no longer) a member
            if kind == "up":
                self._connected.add(node_id)
                self._onNodeConnected(node)
            elif kind == "down":
                self._connected.discard(node_id)
                self._onNodeDisconnected(node)
            elif self._on_message is not None:
                self._on_message(self, node, rest[0])
            else:
                self._onMessageReceived(node, rest[0])
        self._release()

    def _release(self) -> None:
        """Let everything sent so far leave and make the journal durable (group commit): the flush first
        unless the batch is only append_entries (see the module docstring)."""
        with self._lock:
            messages, self._outgoing = self._outgoing, []
            flush_first, self._flush_first = self._flush_first, False
            messages = self._notices.release(messages, self._clock())
        if not messages:
            # Nothing to send, but entries may have been appended (a member alone in its group commits
            # them on its next tick): they must be durable all the same.
            self._flush()
            return
        batch = []
        for node_id, message in messages:
            try:
                batch.append((node_id, encode_message(message)))
            except FrameError as exc:  # as if lost on the network: Raft sends it again
                log.error("raft %s: not sending %s to %s: %s", self._link.group, message.get("type"), node_id,
                          exc)
        if flush_first:
            self._flush()
        if not self._destroyed:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the node is shutting down
                self._loop.call_soon_threadsafe(self._link._send, batch)
        if not flush_first:
            self._flush()


class RaftServicer(pb_grpc.RaftServicer):
    """The node's Raft service: routes each member's stream to this node's link of its group."""

    def __init__(self, links: Iterable[RaftLink] = ()) -> None:
        self._links = {link.group: link for link in links}

    def add(self, link: RaftLink) -> None:
        self._links[link.group] = link

    async def Exchange(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        group = metadata.get(GROUP_KEY, "")
        peer = peer_identity(context)
        link = self._links.get(group)
        who = f"{peer.role.value} {peer.name!r}" if peer else "an unauthenticated caller"
        if link is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"this node is not a member of Raft group {group!r}")
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        if peer is None or peer.role is not Role.NODE:
            link.counters.refused_streams += 1
            log.warning("raft %s: refused a stream from %s: Raft needs a node certificate", group, who)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Raft streams need a fleet node certificate")
            raise AssertionError("grpc's context.abort returned")  # it raises; this tells type checkers
        why = link.refusal(peer.name)
        if why is not None:
            link.counters.refused_streams += 1
            log.warning("raft %s: refused a stream from %s: %s", group, who, why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        await context.write(pb.RaftHello(group=group, node_id=link.node_id))
        async for batch in request_iterator:
            if link.closed or self._links.get(group) is not link:
                # This member stopped or restarted: the caller must dial its new self.
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{link.node_id} left Raft group {group}")
            if (why := link.refusal(peer.name)) is not None:  # revoked since the stream opened
                link.counters.refused_streams += 1
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            for frame in batch.frames:
                try:
                    link.receive(peer.name, frame)
                except FrameError as exc:
                    link.counters.refused_frames += 1
                    log.warning("raft %s: refused a frame from %s: %s; closing its stream", group, peer.name,
                                exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"refused Raft frame: {exc}")
