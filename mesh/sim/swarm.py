"""Discrete-event simulator of one model version spreading through a swarm.

N nodes start with no chunks (or some, for delta and resume), an origin holds
the whole model, and every node runs the real `SwarmScheduler`. Simulated time
only: a heap of events, no sleeps, deterministic under `seed`.

What is modelled:

- Upload and download caps per node as `TokenBucket`s. An upload is served in
  the order it was accepted (debt-based bucket), so a node's uploads go out one
  after another at its cap, as they would with a small `max_uploads`.
- `UploadSlots` per node: a request beyond `max_uploads` (the origin has
  `origin_max_uploads`) is refused with UNAVAILABLE and the requester backs off.
- Latency: `lan_latency_s` within a site, `wan_latency_s` across sites and to
  the origin (one way).
- Holdings: at start everyone knows everyone's holdings (membership has
  converged); afterwards each verified chunk is announced to every other node
  after `gossip_delay_s` (x uniform 0.5..1.5), as the holdings metadata would.
  With `have_batch_s`, announcements go out in batches every `have_batch_s`
  instead (as a node's HAVE messages to its transfer peers), and each node
  re-plans once per batch: the same swarm, many fewer scheduler calls.
- Who sees whom (`sees`): by default every node sees every other node's
  chunks; a rule can hide some (say, other sites' chunks from a device that
  may only fetch inside its site). mesh.sim.distribution does not need it: it
  runs each tier as a swarm of its own.
- Bad nodes download normally but serve corrupted bytes; the receiver's hash
  check fails and its scheduler bans them.
- Restarts: a node killed at `at_s` loses its in-flight transfers but keeps its
  verified chunks; others notice after `failure_detect_s`; after `down_s` it
  starts a fresh scheduler with the chunks on disk (resume) and re-announces.

What it reports (`SimResult`): origin egress / model size, bytes that crossed
a site boundary (the origin is a site of its own), total chunk bytes
on the wire / the minimum (every node receives each chunk it lacks once), and
the last node's completion time / (model size / upload cap), the time the
origin needs to push out one copy, which no swarm can beat.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from mesh.transfer.ratelimit import TokenBucket, UploadSlots
from mesh.transfer.scheduler import (
    ChunkDone,
    FailureReason,
    PeerBanned,
    PeerBenched,
    RequestCancelled,
    SchedulerConfig,
    SwarmScheduler,
)

__all__ = ["BanRecord", "Restart", "SimResult", "simulate", "split_model"]

log = logging.getLogger(__name__)

ORIGIN_ID = "origin"
ORIGIN_SITE = "cloud"


def split_model(size_bytes: int, chunk_bytes: int = 256 * 1024) -> list[int]:
    """Chunk sizes of a model cut in fixed `chunk_bytes` pieces (the last one shorter)."""
    if size_bytes <= 0 or chunk_bytes <= 0:
        raise ValueError(f"model and chunk sizes must be positive, got {size_bytes} and {chunk_bytes}")
    full, rest = divmod(size_bytes, chunk_bytes)
    return [chunk_bytes] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Restart:
    """Kill node `node` (an index) at `at_s` and start it again `down_s` later."""

    node: int
    at_s: float
    down_s: float


@dataclass(frozen=True)
class BanRecord:
    at_s: float
    node_id: str  # who banned
    peer_id: str  # whom
    index: int  # the chunk that failed its hash check


@dataclass(frozen=True)
class SimResult:
    seed: int
    n_nodes: int
    model_size_bytes: int
    upload_cap_bytes_per_s: float
    origin_egress_bytes: int
    total_bytes: int  # chunk bytes sent to nodes, wasted ones included
    min_bytes: int  # bytes the nodes lacked at start
    completion_s: Mapping[str, float]  # node id -> time it held every chunk
    all_complete: bool
    bans: tuple[BanRecord, ...]
    requests: int
    refused: int  # requests refused for lack of an upload slot
    sim_time_s: float
    cross_site_bytes: int = 0  # chunk bytes whose server was in another site than the receiver
    cross_site_bytes_by_site: Mapping[str, int] = field(default_factory=dict)  # by the receiver's site
    benched: int = 0  # times a node set a peer's claims aside (it failed request after request)

    @property
    def lower_bound_s(self) -> float:
        return self.model_size_bytes / self.upload_cap_bytes_per_s

    @property
    def last_completion_s(self) -> float:
        return max(self.completion_s.values(), default=math.inf) if self.all_complete else math.inf

    @property
    def origin_egress_ratio(self) -> float:
        return self.origin_egress_bytes / self.model_size_bytes

    @property
    def total_bytes_ratio(self) -> float:
        return self.total_bytes / self.min_bytes if self.min_bytes else math.inf

    @property
    def completion_ratio(self) -> float:
        return self.last_completion_s / self.lower_bound_s

    def summary(self) -> str:
        return (
            f"seed={self.seed} nodes={self.n_nodes} model={self.model_size_bytes}B "
            f"origin egress={self.origin_egress_ratio:.3f}x model, "
            f"total bytes={self.total_bytes_ratio:.3f}x minimum, "
            f"last node done at {self.last_completion_s:.2f}s = {self.completion_ratio:.2f}x "
            f"(model/upload cap = {self.lower_bound_s:.2f}s), requests={self.requests} "
            f"refused={self.refused} bans={len(self.bans)} benched={self.benched} "
            f"complete={self.all_complete}"
        )


@dataclass
class _Node:
    node_id: str
    site: str
    have: bytearray  # verified chunks on disk; survives restarts
    up: TokenBucket
    down: TokenBucket
    slots: UploadSlots
    bad: bool = False
    is_origin: bool = False
    alive: bool = True
    epoch: int = 0  # bumped by every kill and restart
    scheduler: SwarmScheduler | None = None
    timer_at: float = math.inf
    done_at: float | None = None
    # (server id, chunk) -> id of the live request; an answer with another id is stale.
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    upload_ends: list[float] = field(default_factory=list)  # heap: when each running upload finishes


class _Swarm:
    def __init__(
        self,
        *,
        n_nodes: int,
        chunk_sizes: Sequence[int],
        upload_cap_bytes_per_s: float,
        download_cap_bytes_per_s: float,
        origin_upload_cap_bytes_per_s: float,
        seed: int,
        n_sites: int,
        max_uploads: int,
        origin_max_uploads: int,
        gossip_delay_s: float,
        lan_latency_s: float,
        wan_latency_s: float,
        bad_nodes: Collection[int],
        config: SchedulerConfig,
        initial_have: Mapping[int, Collection[int]],
        failure_detect_s: float,
        burst_bytes: int,
        use_node_ids: bool,
        retry_hints: bool,
        sites: Sequence[str] | None = None,
        sees: Callable[[str, str, int], bool] | None = None,
        have_batch_s: float | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.sizes = list(chunk_sizes)
        self.config = config
        self.gossip_delay_s = gossip_delay_s
        self.lan_latency_s = lan_latency_s
        self.wan_latency_s = wan_latency_s
        self.failure_detect_s = failure_detect_s
        self.use_node_ids = use_node_ids
        self.retry_hints = retry_hints
        self.now = 0.0
        self._heap: list[tuple[float, int, str, tuple]] = []
        self._seq = 0
        self._request_ids = 0
        self.requests = 0
        self.refused = 0
        self.total_bytes = 0
        self.origin_egress_bytes = 0
        self.cross_site_bytes = 0
        self.cross_site_bytes_by_site: dict[str, int] = {}
        self.sees = sees
        self.have_batch_s = have_batch_s
        self._pending_have: list[tuple[str, int, int]] = []  # (node id, epoch, chunk) awaiting the next batch
        self.bans: list[BanRecord] = []
        self.benched = 0
        self.lifecycle_pending = 0  # kills and restarts still to come
        n = len(self.sizes)

        def make(node_id: str, site: str, have: bytearray, up_rate: float, slots: int) -> _Node:
            return _Node(
                node_id,
                site,
                have,
                TokenBucket(up_rate, burst_bytes, 0.0),
                TokenBucket(download_cap_bytes_per_s, burst_bytes, 0.0),
                UploadSlots(slots),
            )

        self.origin = make(
            ORIGIN_ID, ORIGIN_SITE, bytearray([1]) * n, origin_upload_cap_bytes_per_s, origin_max_uploads
        )
        self.origin.is_origin = True
        self.nodes: dict[str, _Node] = {ORIGIN_ID: self.origin}
        self.peers: list[_Node] = []
        for i in range(n_nodes):
            have = bytearray(n)
            for c in initial_have.get(i, ()):
                have[c] = 1
            site = sites[i] if sites is not None else f"site-{i % n_sites}"
            node = make(f"n{i:02d}", site, have, upload_cap_bytes_per_s, max_uploads)
            node.bad = i in bad_nodes
            self.nodes[node.node_id] = node
            self.peers.append(node)
        self.min_bytes = sum(self.sizes[c] for node in self.peers for c in range(n) if not node.have[c])

    # -- event plumbing ------------------------------------------------------

    def _at(self, t: float, kind: str, *args: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, args))

    def _latency_s(self, a: _Node, b: _Node) -> float:
        return self.lan_latency_s if a.site == b.site else self.wan_latency_s

    def _shown(self, viewer: _Node, holder: _Node) -> list[int]:
        """The chunks of `holder` that `viewer` is told about."""
        present = _present(holder.have)
        if self.sees is None:
            return present
        return [i for i in present if self.sees(viewer.node_id, holder.node_id, i)]

    def _gossip_s(self) -> float:
        return self.gossip_delay_s * self.rng.uniform(0.5, 1.5)

    def run(self, time_limit_s: float) -> None:
        for node in self.peers:
            self._start(node)
        for node in self.peers:
            self._pump(node)
        while self._heap:
            t, _, kind, args = heapq.heappop(self._heap)
            if t > time_limit_s:
                break
            self.now = t
            getattr(self, "_on_" + kind)(*args)
            if self._finished():
                break

    def _finished(self) -> bool:
        return self.lifecycle_pending == 0 and all(
            node.alive and node.done_at is not None for node in self.peers
        )

    # -- node lifecycle ------------------------------------------------------

    def _start(self, node: _Node) -> None:
        """A fresh scheduler with the chunks on disk, told what every live node holds."""
        node.scheduler = SwarmScheduler(
            self.sizes,
            [bool(x) for x in node.have],
            self_site=node.site,
            config=self.config,
            rng=random.Random(self.rng.random()),
            self_id=node.node_id if self.use_node_ids else None,
            now=self.now,
        )
        for other in self.nodes.values():
            if other is not node and other.alive:
                node.scheduler.peer_update(
                    other.node_id,
                    site=other.site,
                    have=self._shown(node, other),
                    is_origin=other.is_origin,
                    now=self.now,
                )
        node.timer_at = math.inf
        node.requests.clear()
        if node.scheduler.done and node.done_at is None:
            node.done_at = self.now

    def _on_kill(self, node_id: str) -> None:
        self.lifecycle_pending -= 1
        node = self.nodes[node_id]
        node.alive = False
        node.epoch += 1
        node.scheduler = None
        node.slots = UploadSlots(node.slots.max_concurrent)
        node.upload_ends.clear()
        for other in self.peers:
            if other is not node:
                self._at(self.now + self.failure_detect_s, "gone", other.node_id, node_id, node.epoch)

    def _on_restart(self, node_id: str) -> None:
        self.lifecycle_pending -= 1
        node = self.nodes[node_id]
        node.alive = True
        node.epoch += 1
        self._start(node)
        for other in self.peers:
            if other is not node:
                self._at(self.now + self._gossip_s(), "hello", other.node_id, node_id, node.epoch)
        self._pump(node)

    def _on_gone(self, node_id: str, gone_id: str, gone_epoch: int) -> None:
        node, gone = self.nodes[node_id], self.nodes[gone_id]
        if node.alive and gone.epoch == gone_epoch and node.scheduler is not None:
            node.scheduler.peer_gone(gone_id, self.now)
            self._pump(node)

    def _on_hello(self, node_id: str, peer_id: str, peer_epoch: int) -> None:
        node, peer = self.nodes[node_id], self.nodes[peer_id]
        if node.alive and peer.alive and peer.epoch == peer_epoch and node.scheduler is not None:
            node.scheduler.peer_update(peer_id, site=peer.site, have=self._shown(node, peer), now=self.now)
            self._pump(node)

    # -- the client side -----------------------------------------------------

    def _pump(self, node: _Node) -> None:
        """Let the node's scheduler act on what changed: send requests, handle events, re-arm its timer."""
        scheduler = node.scheduler
        if scheduler is None or not node.alive:
            return
        for request in scheduler.next_requests(self.now):
            server = self.nodes[request.peer_id]
            self._request_ids += 1
            self.requests += 1
            node.requests[(server.node_id, request.index)] = self._request_ids
            self._at(
                self.now + self._latency_s(node, server),
                "request",
                server.node_id,
                server.epoch,
                node.node_id,
                node.epoch,
                request.index,
                self._request_ids,
            )
        for event in scheduler.drain_events():
            if isinstance(event, RequestCancelled):
                node.requests.pop((event.peer_id, event.index), None)
            elif isinstance(event, PeerBanned):
                log.info(
                    "%s banned %s until %.1fs: chunk %d (%s)",
                    node.node_id,
                    event.peer_id,
                    event.until,
                    event.index,
                    event.reason.value,
                )
                self.bans.append(BanRecord(self.now, node.node_id, event.peer_id, event.index))
            elif isinstance(event, PeerBenched):
                self.benched += 1
            elif isinstance(event, ChunkDone):
                if self.have_batch_s is not None:
                    if not self._pending_have:
                        tick = (math.floor(self.now / self.have_batch_s) + 1) * self.have_batch_s
                        self._at(tick, "flush")
                    self._pending_have.append((node.node_id, node.epoch, event.index))
                    continue
                for other in self.peers:
                    if other is not node and (
                        self.sees is None or self.sees(other.node_id, node.node_id, event.index)
                    ):
                        self._at(
                            self.now + self._gossip_s(),
                            "have",
                            other.node_id,
                            node.node_id,
                            node.epoch,
                            event.index,
                        )
        if scheduler.done and node.done_at is None:
            node.done_at = self.now
        deadline = scheduler.next_deadline()
        if deadline != node.timer_at:
            node.timer_at = deadline
            if deadline < math.inf:
                self._at(deadline, "timer", node.node_id, node.epoch, deadline)

    def _on_timer(self, node_id: str, epoch: int, deadline: float) -> None:
        node = self.nodes[node_id]
        if node.epoch == epoch and node.timer_at == deadline:
            node.timer_at = math.inf
            self._pump(node)

    def _on_have(self, node_id: str, peer_id: str, peer_epoch: int, index: int) -> None:
        node = self.nodes[node_id]
        if node.alive and node.scheduler is not None and self.nodes[peer_id].epoch == peer_epoch:
            node.scheduler.peer_has(peer_id, index, self.now)
            self._pump(node)

    def _on_flush(self) -> None:
        """Deliver the batch of announcements, then let each node that learned something re-plan once."""
        batch, self._pending_have = self._pending_have, []
        for other in self.peers:
            if not other.alive or other.scheduler is None:
                continue
            learned = False
            for holder_id, epoch, index in batch:
                if holder_id == other.node_id or self.nodes[holder_id].epoch != epoch:
                    continue
                if self.sees is None or self.sees(other.node_id, holder_id, index):
                    other.scheduler.peer_has(holder_id, index, self.now)
                    learned = True
            if learned:
                self._pump(other)

    def _answer_for(
        self, client: _Node, client_epoch: int, server_id: str, index: int, request_id: int
    ) -> bool:
        return (
            client.alive
            and client.epoch == client_epoch
            and client.scheduler is not None
            and client.requests.get((server_id, index)) == request_id
        )

    def _on_chunk(
        self,
        client_id: str,
        client_epoch: int,
        server_id: str,
        server_epoch: int,
        index: int,
        request_id: int,
        corrupt: bool,
    ) -> None:
        client, server = self.nodes[client_id], self.nodes[server_id]
        if server.epoch != server_epoch:
            return  # the server died mid-upload: the stream broke, the client will time out
        size = self.sizes[index]
        self.total_bytes += size
        if server.is_origin:
            self.origin_egress_bytes += size
        if server.site != client.site:
            self.cross_site_bytes += size
            self.cross_site_bytes_by_site[client.site] = (
                self.cross_site_bytes_by_site.get(client.site, 0) + size
            )
        if not self._answer_for(client, client_epoch, server_id, index, request_id):
            return
        del client.requests[(server_id, index)]
        assert client.scheduler is not None
        if corrupt:
            client.scheduler.failed(server_id, index, FailureReason.BAD_CHUNK, self.now)
        else:
            client.have[index] = 1
            client.scheduler.completed(server_id, index, self.now)
        self._pump(client)

    def _on_refused(
        self,
        client_id: str,
        client_epoch: int,
        server_id: str,
        index: int,
        request_id: int,
        retry_after_s: float | None,
    ) -> None:
        client = self.nodes[client_id]
        if self._answer_for(client, client_epoch, server_id, index, request_id):
            del client.requests[(server_id, index)]
            assert client.scheduler is not None
            client.scheduler.failed(
                server_id, index, FailureReason.BUSY, self.now, retry_after_s=retry_after_s
            )
            self._pump(client)

    # -- the server side -----------------------------------------------------

    def _on_request(
        self,
        server_id: str,
        server_epoch: int,
        client_id: str,
        client_epoch: int,
        index: int,
        request_id: int,
    ) -> None:
        server, client = self.nodes[server_id], self.nodes[client_id]
        if not server.alive or server.epoch != server_epoch:
            return  # nobody answers: the client times out or hears the server is gone
        latency_s = self._latency_s(server, client)
        if not server.have[index] or not server.slots.try_acquire():
            self.refused += 1
            # The refusal says when a slot frees, as a server would from its own upload queue.
            retry_after_s = (
                max(0.0, server.upload_ends[0] - self.now - latency_s)
                if self.retry_hints and server.upload_ends
                else None
            )
            self._at(
                self.now + latency_s,
                "refused",
                client_id,
                client_epoch,
                server_id,
                index,
                request_id,
                retry_after_s,
            )
            return
        size = self.sizes[index]
        sent_at = self.now + max(server.up.reserve(size, self.now), client.down.reserve(size, self.now))
        heapq.heappush(server.upload_ends, sent_at)
        self._at(sent_at, "uploaded", server_id, server.epoch)
        self._at(
            sent_at + latency_s,
            "chunk",
            client_id,
            client_epoch,
            server_id,
            server.epoch,
            index,
            request_id,
            server.bad,
        )

    def _on_uploaded(self, server_id: str, server_epoch: int) -> None:
        server = self.nodes[server_id]
        if server.epoch == server_epoch:
            server.slots.release()
            heapq.heappop(server.upload_ends)


def _present(have: bytearray) -> list[int]:
    return [i for i, x in enumerate(have) if x]


def simulate(
    n_nodes: int,
    chunk_sizes: Sequence[int],
    upload_cap_bytes_per_s: float,
    seed: int,
    *,
    download_cap_bytes_per_s: float | None = None,
    origin_upload_cap_bytes_per_s: float | None = None,
    n_sites: int = 3,
    max_uploads: int = 4,
    origin_max_uploads: int = 4,
    gossip_delay_s: float = 0.05,
    lan_latency_s: float = 0.002,
    wan_latency_s: float = 0.02,
    bad_nodes: Collection[int] = (),
    config: SchedulerConfig | None = None,
    initial_have: Mapping[int, Collection[int]] | None = None,
    restarts: Sequence[Restart] = (),
    failure_detect_s: float = 1.0,
    burst_bytes: int = 64 * 1024,
    use_node_ids: bool = True,
    retry_hints: bool = False,
    time_limit_s: float = 3600.0,
    sites: Sequence[str] | None = None,
    sees: Callable[[str, str, int], bool] | None = None,
    have_batch_s: float | None = None,
) -> SimResult:
    """Spread one model (`chunk_sizes`) from an origin to `n_nodes` nodes and measure it.

    Every node (the origin too, unless `origin_upload_cap_bytes_per_s`) uploads at
    `upload_cap_bytes_per_s`; downloads are capped at 4x that unless
    `download_cap_bytes_per_s`. `initial_have` maps node index -> chunks it already
    holds (delta from a previous version, or resume). `use_node_ids=False` gives the
    schedulers no node id, which turns origin rendezvous off (for comparison).
    `sites` names each node's site (default: node i in site i % n_sites); `sees(viewer,
    holder, chunk)` says whether `viewer` is told that `holder` has `chunk` (default: all);
    `have_batch_s` batches chunk announcements (see the module docstring).
    `retry_hints=True` makes a refusal carry when the server's next slot frees
    (`failed(..., retry_after_s=...)`); measured, it brings refused nodes back
    together and raises both refusals and completion time, so it is off.
    """
    if n_nodes < 1:
        raise ValueError(f"a swarm needs at least one node, got {n_nodes}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if sites is not None and len(sites) != n_nodes:
        raise ValueError(f"sites names {len(sites)} sites for {n_nodes} nodes")
    if have_batch_s is not None and not have_batch_s > 0:
        raise ValueError(f"have_batch_s must be positive, got {have_batch_s}")
    swarm = _Swarm(
        n_nodes=n_nodes,
        chunk_sizes=chunk_sizes,
        upload_cap_bytes_per_s=upload_cap_bytes_per_s,
        download_cap_bytes_per_s=download_cap_bytes_per_s or 4 * upload_cap_bytes_per_s,
        origin_upload_cap_bytes_per_s=origin_upload_cap_bytes_per_s or upload_cap_bytes_per_s,
        seed=seed,
        n_sites=n_sites,
        max_uploads=max_uploads,
        origin_max_uploads=origin_max_uploads,
        gossip_delay_s=gossip_delay_s,
        lan_latency_s=lan_latency_s,
        wan_latency_s=wan_latency_s,
        bad_nodes=frozenset(bad_nodes),
        config=config or SchedulerConfig(),
        initial_have=initial_have or {},
        failure_detect_s=failure_detect_s,
        burst_bytes=burst_bytes,
        use_node_ids=use_node_ids,
        retry_hints=retry_hints,
        sites=sites,
        sees=sees,
        have_batch_s=have_batch_s,
    )
    for restart in restarts:
        if not 0 <= restart.node < n_nodes:
            raise ValueError(f"restart names node {restart.node}, but nodes are 0..{n_nodes - 1}")
        node_id = swarm.peers[restart.node].node_id
        swarm._at(restart.at_s, "kill", node_id)
        swarm._at(restart.at_s + restart.down_s, "restart", node_id)
        swarm.lifecycle_pending += 2
    swarm.run(time_limit_s)
    completion = {node.node_id: node.done_at for node in swarm.peers if node.done_at is not None}
    return SimResult(
        seed=seed,
        n_nodes=n_nodes,
        model_size_bytes=sum(chunk_sizes),
        upload_cap_bytes_per_s=upload_cap_bytes_per_s,
        origin_egress_bytes=swarm.origin_egress_bytes,
        total_bytes=swarm.total_bytes,
        min_bytes=swarm.min_bytes,
        completion_s=completion,
        all_complete=len(completion) == n_nodes and all(node.alive for node in swarm.peers),
        bans=tuple(swarm.bans),
        requests=swarm.requests,
        refused=swarm.refused,
        sim_time_s=swarm.now,
        cross_site_bytes=swarm.cross_site_bytes,
        cross_site_bytes_by_site=dict(swarm.cross_site_bytes_by_site),
        benched=swarm.benched,
    )
