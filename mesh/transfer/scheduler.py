"""Swarm download scheduler: which chunk to ask of which peer, without I/O.

Rules of this module (everything that decides what a node downloads from whom
lives here):

- Pure. No sockets, clocks, threads or asyncio. Every method takes `now`
  (monotonic seconds) and all randomness comes from the injected
  `random.Random`. The adapter sends the `Request`s that `next_requests(now)`
  returns, verifies each chunk against the manifest before it reports
  `completed` (or `failed(..., BAD_CHUNK)`), feeds peers' holdings in with
  `peer_update`/`peer_has`/`peer_gone`, aborts what `RequestCancelled` names,
  and calls `tick(now)` by `next_deadline()`.
- Peers are the other nodes that hold or are fetching this version (a holding
  with an empty bitfield counts: it says "I am fetching"). The origin is a
  peer with `is_origin=True`. Chunk indexes are those of the manifest.
- Never requested: a chunk we hold, a chunk already in flight (there is no
  endgame duplication, so every byte downloaded is needed unless a request
  times out and its answer still arrives), a banned peer, a backed-off peer,
  more than `max_in_flight_per_peer` requests at one peer, or more than
  `max_in_flight_total` in all.
- Order: rarest first. A chunk's availability is the number of non-banned,
  non-origin peers that announce it; ties are broken by the seeded rng so that
  nodes starting together fetch different chunks and the swarm spreads them.
  Rarest-first keeps every chunk's copies growing evenly, so no chunk ends up
  held by one slow peer that everyone queues behind.
- Peer choice for a chunk: same-site peers first (LAN bytes are cheap and
  fast), then the least loaded, then the rng.
- The origin serves a chunk only when no non-banned, non-origin peer has it.
  Busy peers do not count as absent: we wait for them rather than go to the
  origin, whose egress is the scarce resource.
- Origin egress near one copy (`origin_rendezvous`): when N empty nodes start
  together, "only what no peer has" alone still sends N requests for the
  first chunks to the origin. So for each chunk no peer has, exactly one node
  asks the origin: the one with the highest rendezvous hash of (chunk, node
  id) among itself and the non-banned, non-origin peers it knows. Every node
  computes the same answer from the same roster, so the origin uploads each
  chunk about once and the swarm spreads it (peers announce new chunks with
  `peer_has`). If the chosen node is gone or banned it drops out of the
  roster and the next one takes over. If the swarm stalls, no chunk newly
  offered by a peer and none received for `origin_fallback_s` while some chunk
  is still only at the origin (a roster we disagree on, a chosen node that is
  stuck but not yet gone), any node may ask the origin for it. The clock is the
  swarm's progress, not the chunk's age: with a slow origin the last chunks
  may wait minutes for their turn, and they should not all be fetched N times.
  No origin request goes out before `origin_holdoff_s` after the start (about one
  gossip dissemination time, so that the roster the rendezvous runs on holds the
  peers that learned of the release with us); `next_deadline` includes it.
- Failures: BAD_CHUNK bans the peer for `ban_s` (`PeerBanned` names it),
  cancels its other requests and re-queues the chunk elsewhere; bans outlive
  `peer_gone`. TIMEOUT, UNAVAILABLE and IO_ERROR re-queue the chunk and back
  the peer off for `busy_backoff_s`, doubling per consecutive failure up to
  `max_backoff_s`; a completed chunk resets it. A refusal that says when the
  peer's next upload slot frees (`retry_after_s`) is believed instead, with
  up to 50% jitter, still capped at `max_backoff_s`. NOT_HELD (the peer
  denies a chunk it announced) backs off too and masks that claim until the
  peer's announcements drop the chunk; `max_false_claims` denials ban it
  (`PeerBanned` with NOT_HELD). WITHDRAWN (it holds the version no more)
  masks all its claims, with no count against it.
- A claim no answer backs. A run of failures of a non-origin peer (BUSY, ERROR,
  UNAVAILABLE, IO_ERROR, TIMEOUT; a timeout counts as a whole run, and the run
  starts when that request was sent) ends when it delivers a chunk we lacked. A
  failure while another request to the same peer is in flight does not count if
  the peer delivered us a chunk within `request_timeout_s` (or was first asked
  less than that ago): it is serving us, and the refusal is its slot limit. A
  timeout always counts. The peer is benched for `bench_s` (`PeerBenched`: its
  claims count for nothing, so a chunk only it claims is treated as one no peer
  has) when the run has `unresponsive_failures` failures, began
  `unresponsive_after_s` ago, the peer is the only one claiming some chunk we
  lack, and nothing moves here for as long (no chunk arrived, no other peer
  announced one, no request to another peer is in flight). Not a ban: an honest
  peer may be that busy, and a chunk it delivers ends the bench. A benched peer
  stays in the origin rendezvous roster (usually it fetched those chunks from
  the origin: dropping it would fetch them again), and the stall fallback's
  clock for its chunks runs from the run's start, so bench cycles do not restart
  it. A run that has lasted `origin_fallback_s` while no other peer delivered or
  announced for as long (the origin's chunks, through the stall fallback, do not
  count), or `DISTRUST_CAP` times that whatever else happens, benches the peer
  and takes it out of the roster until it delivers: not counted on to fetch from
  the origin either, and its claims count for nothing until then (it is still
  asked for chunks others claim too). For that first measure a lone delivery
  does not end the run: the peer's trouble ends only after
  `unresponsive_after_s` of deliveries with no failure between them, or once its
  deliveries since the trouble began average one per `unresponsive_after_s` (a
  peer that hands over one chunk after each bench must not restart the clock it
  is judged on). Runs with no answer at all (timeouts, broken connections) count
  only while someone (the peer itself included) answered us in the last
  `unresponsive_after_s`: otherwise the trouble is more likely our own link.
  Stalls are timed from the first answer after such a deaf spell, and the cap
  from the last time the origin did not answer either. A run that reaches the
  cap with no answer from anyone asks the origin for one chunk first, whoever
  claims it (the one exception to the origin rules above): its answer shows our
  link works, and the next failure counts. A denial of a chunk we asked for on
  the peer's claim counts even if its announcements dropped the chunk meanwhile,
  and announcements of chunks we hold are no progress for the stall fallback.
  Runs, benches and distrust outlive a withdrawal and a role flip (both are the
  peer's own doing); a run ends when the peer has not been asked for longer than
  a timeout, a back-off and a bench. So a peer that claims chunks and answers
  "busy" to every request delays a download by about `unresponsive_after_s`
  (chunks only it claims) to `origin_fallback_s` (chunks the rendezvous gave it)
  past the point where nothing else moves; one that never answers, by about
  `DISTRUST_CAP` x `origin_fallback_s` or more (known: the cap is checked when a
  failure comes in, and a bench that runs out needs a new failure).
- No endgame mode: the last chunks are not requested twice. Duplicates would
  cost bytes (the goal is <= 1.05x the minimum) and the simulator shows the
  tail is short without them.
- Resume and delta: construct with the chunks already verified on disk (from
  a previous run, or shared with a version we hold); they are never requested.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "ChunkDone",
    "FailureReason",
    "PeerBanned",
    "PeerBenched",
    "PeerView",
    "Request",
    "RequestCancelled",
    "SchedulerConfig",
    "SchedulerError",
    "SwarmScheduler",
    "TransferComplete",
    "TransferStats",
    "rendezvous_score",
]


# A peer failing every request is distrusted (out of the origin roster) after at most this many
# origin_fallback_s of failures, however much other peers announce meanwhile.
DISTRUST_CAP = 3


class SchedulerError(ValueError):
    """An input the scheduler cannot accept (bad config, chunk index, peer id); the text says which."""


class FailureReason(enum.Enum):
    BAD_CHUNK = "bad-chunk"      # bytes did not match the manifest hash: ban the peer
    TIMEOUT = "timeout"          # no answer by request_timeout_s
    BUSY = "busy"                # the peer answered: no upload slot now (RESOURCE_EXHAUSTED)
    ERROR = "error"              # the peer answered with an error of its own (INTERNAL, a bad message)
    UNAVAILABLE = "unavailable"  # no answer we could read: unreachable, or a fault of the peer's own
    IO_ERROR = "io-error"        # connection reset, stream broken, local write failed
    # The peer says it does not hold a chunk it announced (NOT_FOUND): its claim to that chunk is
    # dropped until its announcements drop the chunk too, and `max_false_claims` such denials ban it.
    # Otherwise a peer that announces chunks it never serves (a hostile one, with a valid
    # certificate) would keep them "available" and the origin would never be asked.
    NOT_HELD = "not-held"
    # The peer no longer holds the version at all (it collected it, or lost its store): every claim
    # it made is dropped as above, without counting against it; its gossip says so soon after.
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class SchedulerConfig:
    max_in_flight_per_peer: int = 4
    max_in_flight_total: int = 16
    # Origin requests per node at once; the origin's own slot cap is the real limit.
    max_in_flight_origin: int = 2
    request_timeout_s: float = 30.0
    ban_s: float = 600.0
    # Short and capped: a refusing peer is usually just busy for one chunk's upload time, and a
    # long backoff leaves a node idle while the only holders of its rarest chunks are busy.
    busy_backoff_s: float = 0.25
    max_backoff_s: float = 1.0
    prefer_same_site: bool = True
    origin_rendezvous: bool = True
    origin_fallback_s: float = 60.0
    # No origin request before this long after the download starts: peers that learned of the
    # release with us need about one gossip dissemination time to announce "I am fetching", and
    # the origin rendezvous only spreads origin uploads over nodes that know each other. Chunks
    # that peers already hold are fetched meanwhile. 0 disables the hold-off.
    origin_holdoff_s: float = 0.0
    # Chunks a peer may deny having, after announcing them, before it is banned for this download
    # (an honest peer denies a chunk whose file rotted; one that collected the whole version says
    # WITHDRAWN instead).
    max_false_claims: int = 3
    # A peer whose claims no answer backs (see the module rules): this many failed requests in a row (a
    # timeout counts as all of them), the first this long ago, while nothing else moves here, and its
    # claims are set aside for `bench_s`. 8 refusals span 2-8 s of back-offs: the time bounds decide.
    unresponsive_failures: int = 8
    unresponsive_after_s: float = 15.0
    bench_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_in_flight_per_peer", "max_in_flight_total", "max_in_flight_origin",
                     "max_false_claims", "unresponsive_failures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SchedulerError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("request_timeout_s", "ban_s", "busy_backoff_s", "max_backoff_s", "origin_fallback_s",
                     "unresponsive_after_s", "bench_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or value <= 0:
                raise SchedulerError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.origin_holdoff_s, bool) or not isinstance(self.origin_holdoff_s, (int, float)) \
                or not 0 <= self.origin_holdoff_s < math.inf:
            raise SchedulerError(f"origin_holdoff_s must be a finite number of seconds >= 0, got "
                                 f"{self.origin_holdoff_s!r}")
        if self.max_backoff_s < self.busy_backoff_s:
            raise SchedulerError(f"max_backoff_s ({self.max_backoff_s}) is below busy_backoff_s "
                                 f"({self.busy_backoff_s})")


@dataclass(frozen=True)
class Request:
    """Ask `peer_id` for chunk `index` (`size_bytes` long)."""

    peer_id: str
    index: int
    size_bytes: int = 0
    is_origin: bool = False


@dataclass(frozen=True)
class ChunkDone:
    index: int
    peer_id: str
    size_bytes: int
    at: float


@dataclass(frozen=True)
class TransferComplete:
    at: float
    downloaded_bytes: int  # this run's bytes, wasted ones included


@dataclass(frozen=True)
class PeerBanned:
    peer_id: str
    until: float
    reason: FailureReason
    index: int  # the chunk that earned the ban


@dataclass(frozen=True)
class RequestCancelled:
    """The adapter should abort this request (if still running) and ignore its answer."""

    peer_id: str
    index: int
    why: str  # "timed out", "done elsewhere", "peer gone", "peer banned"


@dataclass(frozen=True)
class PeerBenched:
    """`peer_id` claims chunks and failed `failures` requests in a row over `over_s` (one timeout weighs as
    a whole run): its claims count for nothing until `until` (or until it delivers one). Not a ban: it may
    be an honest, busy peer."""

    peer_id: str
    until: float
    failures: int
    over_s: float


Event = ChunkDone | TransferComplete | PeerBanned | PeerBenched | RequestCancelled


@dataclass
class TransferStats:
    """Counters for metrics, the simulator and tests; they only ever grow."""

    downloaded_bytes: int = 0   # every chunk body received, good, bad or duplicate
    origin_bytes: int = 0
    wasted_bytes: int = 0       # bad chunks and duplicates
    requests: int = 0
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    failures: dict[FailureReason, int] = field(default_factory=dict)
    bans: int = 0
    benched: int = 0


@dataclass(frozen=True)
class PeerView:
    peer_id: str
    site: str
    is_origin: bool
    have_count: int
    in_flight: int
    banned_until: float | None
    backoff_until: float


@dataclass
class _Peer:
    peer_id: str
    site: str
    is_origin: bool
    have: bytearray
    have_count: int = 0
    in_flight: int = 0
    backoff_until: float = -math.inf
    backoff_s: float = 0.0


def rendezvous_score(node_id: str, index: int) -> int:
    """Stable across processes (unlike hash()): every node ranks (chunk, node) pairs alike."""
    digest = hashlib.blake2b(f"{index}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _indexes(have: object, n: int, what: str) -> list[int]:
    """Chunk indexes from a set/sequence of ints, a bool sequence of length n, or a Bitfield."""
    present = getattr(have, "present", None)
    if callable(present):
        have = list(present())
    items = list(have)  # type: ignore[call-overload]
    if items and all(isinstance(x, bool) for x in items):
        if len(items) != n:
            raise SchedulerError(f"{what}: a bool list must have one entry per chunk ({n}), got {len(items)}")
        return [i for i, x in enumerate(items) if x]
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            raise SchedulerError(f"{what}: chunk index {x!r} is outside 0..{n - 1}")
    return sorted(set(items))


class SwarmScheduler:
    """One node's download of one version: feed it holdings, answers and time; send what it returns."""

    def __init__(self, chunk_sizes: list[int], have: Iterable[int] | Iterable[bool] = (), *, self_site: str,
                 config: SchedulerConfig | None = None, rng: random.Random, self_id: str | None = None,
                 now: float = 0.0) -> None:
        """`self_id` enables origin rendezvous (without it, any node may ask the origin for a
        chunk no peer has). `now` starts the clock for `origin_fallback_s`."""
        if not chunk_sizes:
            raise SchedulerError("a transfer needs at least one chunk")
        for i, size in enumerate(chunk_sizes):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise SchedulerError(f"chunk {i} size must be a whole number of bytes >= 0, got {size!r}")
        self.config = config or SchedulerConfig()
        self.self_site = self_site
        self.self_id = self_id
        self.stats = TransferStats()
        self._rng = rng
        self._sizes = list(chunk_sizes)
        n = len(chunk_sizes)
        self._have = bytearray(n)
        for i in _indexes(have, n, "initial chunks"):
            self._have[i] = 1
        self._missing = n - sum(self._have)
        self._peers: dict[str, _Peer] = {}
        self._banned_until: dict[str, float] = {}
        # Per peer id, chunks it announced and then said it does not hold: masked until an announcement of
        # it lacks them (kept across a reconnect, as bans); and how many denials it made (they ban it).
        self._denied: dict[str, set[int]] = {}
        self._false_claims: dict[str, int] = {}
        self._withdrawals: dict[str, int] = {}  # WITHDRAWN answers per peer: from the second, a strike
        # Per peer id, failed requests in a row since its last delivered chunk (timeouts weigh more) and
        # when the first failed; peers benched (their claims set aside) until when; peers whose failures
        # have lasted `origin_fallback_s` (out of the origin roster). All outlive `peer_gone`, as bans.
        # `_delivered_at`: when the last new chunk arrived, from anyone.
        self._streaks: dict[str, tuple[int, float, float, int]] = {}  # (weight, since, last fail, requests)
        # Per peer id, its trouble: a run's start that a lone delivery does not end (a peer that hands over
        # one chunk after each bench must not restart the stall clock it is judged on), the last failure,
        # when its current spell of deliveries with no failure began (one of `unresponsive_after_s` ends the
        # trouble), and its deliveries since the trouble began (one per `unresponsive_after_s` ends it too).
        self._trouble: dict[str, tuple[float, float, float | None, int]] = {}
        self._asked_since: dict[str, float] = {}  # per non-origin peer: when we first asked it for a chunk
        self._delivered_by: dict[str, float] = {}  # per non-origin peer: its last chunk we lacked
        self._answered_at = -math.inf  # when any peer, or the origin, last answered us (anything)
        self._hearing_since = -math.inf  # start of the current spell of answers (no gap over the patience)
        self._deaf_at = -math.inf  # last failure with no answer while nobody answered lately
        self._link_down_at = -math.inf  # last time the origin too failed with no answer while nobody answered
        self._probe_origin = False  # ask the origin for one chunk, whoever claims it (see _note_failure)
        self._benched_until: dict[str, float] = {}
        self._distrusted: set[str] = set()
        self._delivered_at = now
        self._started_at = now
        self._announced_at: dict[str, float] = {}  # per non-origin peer: when it last announced a new chunk
        # Non-origin peers announcing each chunk (banned ones too; they are skipped), in
        # announcement order: dicts, not sets, so that iteration never depends on str hashing.
        self._holders: list[dict[str, None]] = [{} for _ in range(n)]
        self._available = [0] * n  # non-banned, non-origin holders
        self._in_flight: dict[tuple[str, int], float] = {}  # (peer, chunk) -> deadline
        self._in_flight_by_chunk: dict[int, dict[str, None]] = {}
        self._unavailable_since: dict[int, float] = {}
        self._now = now  # latest time seen; deadlines at or before it are already handled
        # Last time the swarm visibly moved (a chunk newly offered by a peer, or one we got):
        # the origin fallback waits for the swarm to stall, not for a chunk to be old.
        self._progress_at = now
        self._origin_not_before = now + self.config.origin_holdoff_s
        self._assignee: dict[int, str] = {}
        self._events: list[Event] = []
        self._complete_emitted = False
        if self._missing == 0:
            self._complete_emitted = True
            self._events.append(TransferComplete(now, 0))

    # -- queries -------------------------------------------------------------

    @property
    def n_chunks(self) -> int:
        return len(self._sizes)

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes)

    @property
    def done(self) -> bool:
        return self._missing == 0

    @property
    def have(self) -> frozenset[int]:
        return frozenset(i for i, x in enumerate(self._have) if x)

    @property
    def missing(self) -> frozenset[int]:
        return frozenset(i for i, x in enumerate(self._have) if not x)

    @property
    def missing_bytes(self) -> int:
        return sum(s for s, x in zip(self._sizes, self._have, strict=True) if not x)

    @property
    def in_flight(self) -> tuple[Request, ...]:
        return tuple(self._request(peer_id, index) for peer_id, index in self._in_flight)

    def has(self, index: int) -> bool:
        return bool(self._have[index])

    def availability(self, index: int) -> int:
        """Non-banned, non-origin peers that announce chunk `index`."""
        return self._available[index]

    def peers(self) -> list[PeerView]:
        return [PeerView(p.peer_id, p.site, p.is_origin, p.have_count, p.in_flight,
                         self._banned_until.get(p.peer_id), p.backoff_until) for p in self._peers.values()]

    def is_banned(self, peer_id: str, now: float) -> bool:
        until = self._banned_until.get(peer_id)
        return until is not None and until > now

    def is_benched(self, peer_id: str, now: float) -> bool:
        until = self._benched_until.get(peer_id)
        return until is not None and until > now

    def drain_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float:
        """Earliest `now` at which `tick` or `next_requests` may have new work (`math.inf` if none)."""
        if self.done:
            return math.inf
        candidates = [*self._in_flight.values(), *self._banned_until.values(), *self._benched_until.values(),
                      *(p.backoff_until for p in self._peers.values()), self._origin_not_before]
        if self._uses_rendezvous():
            fallback_s, progress_at = self.config.origin_fallback_s, self._progress_at
            candidates += [max(since, progress_at) + fallback_s for since in self._unavailable_since.values()]
        return min((t for t in candidates if t > self._now), default=math.inf)

    # -- inputs: peers -------------------------------------------------------

    def peer_update(self, peer_id: str, *, site: str, have: Iterable[int] | Iterable[bool],
                    is_origin: bool = False, now: float) -> None:
        """A peer's full holdings (its bitfield, as indexes); replaces what we knew."""
        if peer_id == self.self_id:
            raise SchedulerError(f"peer_update about ourselves ({peer_id!r}); only other nodes are peers")
        indexes = _indexes(have, self.n_chunks, f"holdings of peer {peer_id!r}")
        peer = self._peers.get(peer_id)
        if peer is not None and peer.is_origin != is_origin:
            self._forget(peer)
            peer = None
            # The origin is never benched; its run and distrust stay (a peer flipping its role must not
            # wipe them: the flag is whatever it gossips).
            if self._benched_until.pop(peer_id, None) is not None:
                self._count_claims(peer_id, +1)
        if peer is None:
            peer = _Peer(peer_id, site, is_origin, bytearray(self.n_chunks))
            self._peers[peer_id] = peer
            self._assignee.clear()
        peer.site = site
        new = bytearray(self.n_chunks)
        for i in indexes:
            new[i] = 1
        denied = self._denied.get(peer_id)
        if denied and not is_origin:  # the origin's holdings are what it is told, never masked
            still = {i for i in denied if new[i]}  # dropped from its claims: unmasked
            if still != denied:
                self._denied[peer_id] = denied = still
                self._assignee.clear()
            for i in denied:
                new[i] = 0
        for i in range(self.n_chunks):
            if new[i] != peer.have[i]:
                if new[i]:
                    self._add_holding(peer, i, now)
                else:
                    self._remove_holding(peer, i)

    def peer_has(self, peer_id: str, index: int, now: float) -> None:
        """A known peer announced one more chunk (BitTorrent's HAVE). Unknown peers are ignored:
        their full holdings arrive with `peer_update`."""
        self._check_index(index)
        peer = self._peers.get(peer_id)
        if peer is not None and not peer.have[index] and index not in self._denied.get(peer_id, ()):
            self._add_holding(peer, index, now)

    def peer_gone(self, peer_id: str, now: float, *, withdrew: bool = False) -> None:
        """The peer left or died: forget its holdings and re-queue what we asked of it. A ban stays, and
        so do claims it denied, unless `withdrew`: it is alive and announces the version no more, so a
        later claim of it is a new one (the count of its denials stays)."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._forget(peer)
        if withdrew:
            self._denied.pop(peer_id, None)  # its run of failures and distrust stay, as its bans

    # -- inputs: answers -----------------------------------------------------

    def completed(self, peer_id: str, index: int, now: float) -> None:
        """`peer_id` delivered chunk `index` and the adapter verified its hash (and stored it)."""
        self._check_index(index)
        size = self._sizes[index]
        peer = self._peers.get(peer_id)
        self._end_request(peer_id, index)
        self._note_answer(now)
        self._count_bytes(peer_id, size, peer is not None and peer.is_origin)
        if peer is not None:
            peer.backoff_s = 0.0
            peer.backoff_until = -math.inf
        if self._have[index]:
            self.stats.wasted_bytes += size
            return
        self._forgive(peer_id, now)  # it delivered something we lacked: whatever it is, it serves
        self._have[index] = 1
        self._missing -= 1
        self._delivered_at = max(self._delivered_at, now)
        if peer is None or not peer.is_origin:
            self._delivered_by[peer_id] = max(self._delivered_by.get(peer_id, now), now)
        self._unavailable_since.pop(index, None)
        self._progress_at = max(self._progress_at, now)
        self._events.append(ChunkDone(index, peer_id, size, now))
        for other in list(self._in_flight_by_chunk.get(index, ())):
            self._end_request(other, index)
            self._events.append(RequestCancelled(other, index, "done elsewhere"))
        if self._missing == 0 and not self._complete_emitted:
            self._complete_emitted = True
            self._events.append(TransferComplete(now, self.stats.downloaded_bytes))

    def failed(self, peer_id: str, index: int, reason: FailureReason, now: float, *,
               retry_after_s: float | None = None) -> None:
        """A request to `peer_id` for `index` failed; the chunk goes back in the queue.

        `retry_after_s` is the peer's own hint with a refusal (when its next upload slot
        frees); we wait that long (plus up to half again, so refused nodes do not all come
        back at once) instead of guessing with exponential backoff.
        """
        self._check_index(index)
        if not isinstance(reason, FailureReason):
            raise SchedulerError(f"failure reason must be a FailureReason, got {reason!r}")
        deadline = self._in_flight.get((peer_id, index))
        self._end_request(peer_id, index)
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        if reason not in (FailureReason.TIMEOUT, FailureReason.UNAVAILABLE, FailureReason.IO_ERROR):
            self._note_answer(now)  # it answered (busy, not held, bad bytes)
        else:
            self._note_silence(peer_id, now)
        if reason is FailureReason.BAD_CHUNK:
            size = self._sizes[index]
            peer = self._peers.get(peer_id)
            self._count_bytes(peer_id, size, peer is not None and peer.is_origin)
            self.stats.wasted_bytes += size
            self._ban(peer_id, index, now)
        elif reason in (FailureReason.NOT_HELD, FailureReason.WITHDRAWN):
            self._back_off(peer_id, now, retry_after_s)
            peer = self._peers.get(peer_id)
            if peer is None or peer.is_origin:  # the origin's holdings are what it is told, not claims
                return
            if reason is FailureReason.NOT_HELD:
                if not peer.have[index]:  # its own announcement dropped the chunk meanwhile: no claim left
                    if deadline is None:
                        return
                    dropped, strike = [], True  # but we asked on its claim: a denial all the same
                else:
                    dropped, strike = [index], True
            else:  # a second withdrawal in one download is a claim made again and denied again
                dropped = [i for i in range(self.n_chunks) if peer.have[i]]
                self._withdrawals[peer_id] = self._withdrawals.get(peer_id, 0) + 1
                strike = self._withdrawals[peer_id] > 1
                self._denied.setdefault(peer_id, set()).update(range(self.n_chunks))  # no claim believed
            denied = self._denied.setdefault(peer_id, set())
            for i in dropped:
                denied.add(i)
                self._remove_holding(peer, i)
            self._assignee.clear()  # the origin roster leaves it out for those chunks
            if strike:
                self._false_claims[peer_id] = self._false_claims.get(peer_id, 0) + 1
                claims = self._false_claims[peer_id]
                if claims >= self.config.max_false_claims and not self.is_banned(peer_id, now):
                    self._ban(peer_id, index, now, FailureReason.NOT_HELD)
        else:
            self._back_off(peer_id, now, retry_after_s)
            sent_at = deadline - self.config.request_timeout_s if deadline is not None else None
            self._note_failure(peer_id, now, reason, sent_at=sent_at)

    def tick(self, now: float) -> None:
        """Expire timed-out requests and lift bans that ran out; calling early is harmless."""
        self._now = max(self._now, now)
        expired = [(key, deadline) for key, deadline in self._in_flight.items() if deadline <= now]
        for (peer_id, index), deadline in expired:
            self._end_request(peer_id, index)
            self.stats.failures[FailureReason.TIMEOUT] = self.stats.failures.get(FailureReason.TIMEOUT, 0) + 1
            self._back_off(peer_id, now)
            self._note_silence(peer_id, now)
            self._events.append(RequestCancelled(peer_id, index, "timed out"))
            self._note_failure(peer_id, now, FailureReason.TIMEOUT,
                               sent_at=deadline - self.config.request_timeout_s)
        for until_by_peer in (self._banned_until, self._benched_until):
            for peer_id in [p for p, until in until_by_peer.items() if until <= now]:
                del until_by_peer[peer_id]
                self._count_claims(peer_id, +1)

    # -- output --------------------------------------------------------------

    def next_requests(self, now: float) -> list[Request]:
        """Requests to send now (they count as in flight until an answer, a failure or a timeout)."""
        self.tick(now)
        budget = self.config.max_in_flight_total - len(self._in_flight)
        if self.done or budget <= 0:
            return []
        out: list[Request] = []
        if self._probe_origin:  # before the others: the chunk it asks may be one a silent peer claims
            probe = self._probe(now)
            if probe is not None:
                out.append(probe)
                budget -= 1
        wanted = [i for i in range(self.n_chunks) if not self._have[i] and i not in self._in_flight_by_chunk]
        rng = self._rng
        order = sorted(wanted, key=lambda i: (self._available[i], rng.random()))
        for index in order:
            if budget == 0:
                break
            if self._available[index] > 0:
                self._unavailable_since.pop(index, None)
                peer = self._pick_peer(index, now)
            else:
                self._unavailable_since.setdefault(index, now)
                peer = self._pick_origin(index, now)
            if peer is None:
                continue
            if not peer.is_origin:
                self._asked_since.setdefault(peer.peer_id, now)
            peer.in_flight += 1
            self._in_flight[(peer.peer_id, index)] = now + self.config.request_timeout_s
            self._in_flight_by_chunk.setdefault(index, {})[peer.peer_id] = None
            self.stats.requests += 1
            out.append(self._request(peer.peer_id, index))
            budget -= 1
        return out

    def _probe(self, now: float) -> Request | None:
        """One request to a usable origin for a missing chunk not in flight (rarest first), if any."""
        cap = min(self.config.max_in_flight_per_peer, self.config.max_in_flight_origin)
        origins = [p for p in self._peers.values() if p.is_origin and self._usable(p, now, cap)]
        wanted = sorted((i for i in range(self.n_chunks)
                         if not self._have[i] and i not in self._in_flight_by_chunk),
                        key=lambda i: self._available[i])
        for index in wanted:
            origin = next((p for p in origins if p.have[index]), None)
            if origin is not None:
                self._probe_origin = False
                origin.in_flight += 1
                self._in_flight[(origin.peer_id, index)] = now + self.config.request_timeout_s
                self._in_flight_by_chunk.setdefault(index, {})[origin.peer_id] = None
                self.stats.requests += 1
                return self._request(origin.peer_id, index)
        return None

    # -- internals -----------------------------------------------------------

    def _request(self, peer_id: str, index: int) -> Request:
        peer = self._peers.get(peer_id)
        return Request(peer_id, index, self._sizes[index], peer is not None and peer.is_origin)

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n_chunks:
            raise SchedulerError(f"chunk index {index!r} is outside 0..{self.n_chunks - 1}")

    def _usable(self, peer: _Peer, now: float, cap: int) -> bool:
        return (peer.in_flight < cap and peer.backoff_until <= now
                and not self.is_banned(peer.peer_id, now) and not self.is_benched(peer.peer_id, now))

    def _pick_peer(self, index: int, now: float) -> _Peer | None:
        cap = self.config.max_in_flight_per_peer
        best, best_key = None, None
        for peer_id in self._holders[index]:
            peer = self._peers[peer_id]
            if not self._usable(peer, now, cap):
                continue
            other_site = self.config.prefer_same_site and peer.site != self.self_site
            key = (other_site, peer.in_flight, self._rng.random())
            if best_key is None or key < best_key:
                best, best_key = peer, key
        return best

    def _pick_origin(self, index: int, now: float) -> _Peer | None:
        if now < self._origin_not_before or not self._origin_ours(index, now):
            return None
        cap = min(self.config.max_in_flight_per_peer, self.config.max_in_flight_origin)
        best, best_key = None, None
        for peer in self._peers.values():
            if not peer.is_origin or not peer.have[index] or not self._usable(peer, now, cap):
                continue
            key = (peer.in_flight, self._rng.random())
            if best_key is None or key < best_key:
                best, best_key = peer, key
        return best

    def _uses_rendezvous(self) -> bool:
        return self.config.origin_rendezvous and self.self_id is not None

    def _origin_ours(self, index: int, now: float) -> bool:
        """Whether this node is the one that fetches `index` from the origin (see the module rules)."""
        if not self._uses_rendezvous():
            return True
        since = max(self._unavailable_since.get(index, now), self._progress_at)
        if now - since >= self.config.origin_fallback_s:
            return True
        assignee = self._assignee.get(index)
        if assignee is None:
            assert self.self_id is not None
            assignee, best = self.self_id, rendezvous_score(self.self_id, index)
            for peer in self._peers.values():
                # A peer that denied this chunk (or withdrew the version) is not counted on to fetch it.
                if peer.is_origin or self.is_banned(peer.peer_id, now) or peer.peer_id in self._distrusted \
                        or index in self._denied.get(peer.peer_id, ()):
                    continue
                score = rendezvous_score(peer.peer_id, index)
                if score > best or (score == best and peer.peer_id > assignee):
                    assignee, best = peer.peer_id, score
            self._assignee[index] = assignee
        return assignee == self.self_id

    def _add_holding(self, peer: _Peer, index: int, now: float) -> None:
        peer.have[index] = 1
        peer.have_count += 1
        if peer.is_origin:
            return
        self._announced_at[peer.peer_id] = max(self._announced_at.get(peer.peer_id, now), now)
        self._holders[index][peer.peer_id] = None
        if self._counted(peer.peer_id):
            self._available[index] += 1
            if self._available[index] == 1 and not self._have[index]:  # news only if we lack it
                self._progress_at = max(self._progress_at, now)
            self._unavailable_since.pop(index, None)

    def _remove_holding(self, peer: _Peer, index: int) -> None:
        peer.have[index] = 0
        peer.have_count -= 1
        if peer.is_origin:
            return
        del self._holders[index][peer.peer_id]
        if self._counted(peer.peer_id):
            self._available[index] -= 1

    def _forget(self, peer: _Peer) -> None:
        for i in range(self.n_chunks):
            if peer.have[i]:
                self._remove_holding(peer, i)
        for peer_id, index in [key for key in self._in_flight if key[0] == peer.peer_id]:
            self._end_request(peer_id, index)
            self._events.append(RequestCancelled(peer_id, index, "peer gone"))
        del self._peers[peer.peer_id]
        self._assignee.clear()

    def _end_request(self, peer_id: str, index: int) -> None:
        if self._in_flight.pop((peer_id, index), None) is None:
            return  # late answer to a request that timed out or was cancelled
        by_chunk = self._in_flight_by_chunk[index]
        del by_chunk[peer_id]
        if not by_chunk:
            del self._in_flight_by_chunk[index]
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.in_flight -= 1

    def _count_bytes(self, peer_id: str, size: int, is_origin: bool) -> None:
        self.stats.downloaded_bytes += size
        self.stats.bytes_by_peer[peer_id] = self.stats.bytes_by_peer.get(peer_id, 0) + size
        if is_origin:
            self.stats.origin_bytes += size

    def _back_off(self, peer_id: str, now: float, retry_after_s: float | None = None) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if retry_after_s is not None and math.isfinite(retry_after_s) and retry_after_s >= 0:
            wait_s = min(self.config.max_backoff_s, retry_after_s * self._rng.uniform(1.0, 1.5))
            peer.backoff_until = max(peer.backoff_until, now + wait_s)
            return
        peer.backoff_s = min(self.config.max_backoff_s, max(self.config.busy_backoff_s, peer.backoff_s * 2))
        peer.backoff_until = now + peer.backoff_s

    def _ban(self, peer_id: str, index: int, now: float,
             reason: FailureReason = FailureReason.BAD_CHUNK) -> None:
        until = now + self.config.ban_s
        was_counted = self._counted(peer_id)
        self._banned_until[peer_id] = max(until, self._banned_until.get(peer_id, until))
        self.stats.bans += 1
        self._events.append(PeerBanned(peer_id, until, reason, index))
        for pid, i in [key for key in self._in_flight if key[0] == peer_id]:
            self._end_request(pid, i)
            self._events.append(RequestCancelled(pid, i, "peer banned"))
        if was_counted:
            self._count_claims(peer_id, -1)
        self._assignee.clear()

    def _counted(self, peer_id: str) -> bool:
        """Whether the peer's claims count in `_available` (entries leave the maps in `tick`; distrust
        ends with a delivery)."""
        return (peer_id not in self._banned_until and peer_id not in self._benched_until
                and peer_id not in self._distrusted)

    def _count_claims(self, peer_id: str, sign: int) -> None:
        """A ban or bench began (-1) or ended (+1): its claims stop or start counting, if now counted."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.is_origin or (sign > 0 and not self._counted(peer_id)):
            return
        for i in range(self.n_chunks):
            if peer.have[i]:
                self._available[i] += sign
                if sign > 0:
                    self._unavailable_since.pop(i, None)
        self._assignee.clear()

    def _forgive(self, peer_id: str, now: float) -> None:
        """Forget a peer's run of failures, bench and distrust (not its bans or denial counts); its trouble
        ends only after `unresponsive_after_s` of deliveries with no failure between them, or when its
        deliveries during it average one per `unresponsive_after_s`."""
        self._streaks.pop(peer_id, None)
        trouble = self._trouble.get(peer_id)
        if trouble is not None:
            since, last, clean_since, delivered = trouble
            delivered += 1
            if clean_since is None:
                self._trouble[peer_id] = (since, last, now, delivered)
            else:
                self._trouble[peer_id] = (since, last, clean_since, delivered)
            if (clean_since is not None and now - clean_since >= self.config.unresponsive_after_s) \
                    or delivered * self.config.unresponsive_after_s >= now - since:
                del self._trouble[peer_id]
        was_counted = self._counted(peer_id)
        if peer_id in self._distrusted:
            self._distrusted.discard(peer_id)
            self._assignee.clear()
        self._benched_until.pop(peer_id, None)
        if not was_counted:
            self._count_claims(peer_id, +1)  # counts again unless banned

    def _note_failure(self, peer_id: str, now: float, reason: FailureReason, *,
                      sent_at: float | None = None) -> None:
        """A request to the peer failed without a verdict on its bytes: bench it when its run of failures
        is long and nothing else moves here, or distrust it when the run has lasted origin_fallback_s."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.is_origin:
            return
        config = self.config
        if reason is not FailureReason.TIMEOUT and peer.in_flight > 0:
            # It is serving us another chunk: a refusal now is its slot limit, not a refusal of us. Unless it
            # has not delivered for a request timeout: then it is holding a request open to excuse the rest.
            served_at = self._delivered_by.get(peer_id, self._asked_since.get(peer_id, now))
            if now - served_at < config.request_timeout_s:
                return
        # A run of failures starts when its first failed request was sent.
        start = min(now, sent_at) if sent_at is not None else now
        count, since, last, requests = self._streaks.get(peer_id, (0, start, now, 0))
        stale_s = config.request_timeout_s + config.max_backoff_s + config.bench_s
        if now - last > stale_s:
            count, since, requests = 0, start, 0  # not asked for a long while: an old run says nothing now
        trouble_since, trouble_last, _, delivered = self._trouble.get(peer_id, (since, now, None, 0))
        if now - trouble_last > stale_s:
            trouble_since, delivered = since, 0
        trouble_since = min(trouble_since, since)
        self._trouble[peer_id] = (trouble_since, now, None, delivered)  # a failure ends a clean spell
        # A timeout is a long silence already: it counts as a whole run.
        count += config.unresponsive_failures if reason is FailureReason.TIMEOUT else 1
        requests += 1
        self._streaks[peer_id] = (count, since, now, requests)
        if count < config.unresponsive_failures or self.is_banned(peer_id, now):
            return
        # Failures with no answer at all (timeouts, broken connections) while nobody else answered us
        # either say more about our own link than about the peer.
        # Our link worked if someone answered while this request was out, or lately (its own "busy" too).
        recent = now - self._answered_at <= config.unresponsive_after_s
        heard = recent or (sent_at is not None and self._answered_at >= sent_at)
        stall_since = max(since, self._hearing_since)  # the swarm's stall only counts while we hear it
        # Failing for origin_fallback_s while the swarm did not move for as long (no other peer delivered
        # us a chunk, the origin's through the stall fallback aside, and no other peer announced one): not
        # counted on for anything. Its own lone deliveries do not end that clock (its trouble's). Peers that
        # keep announcing can hold that off, but not past DISTRUST_CAP x origin_fallback_s of failures.
        fallback_s = config.origin_fallback_s
        others_at = max((t for p, t in self._announced_at.items()
                         if p != peer_id and p in self._peers and self._counted(p)), default=-math.inf)
        others_delivered_at = max((t for p, t in self._delivered_by.items() if p != peer_id),
                                  default=self._started_at)
        troubled_since = max(trouble_since, self._hearing_since)
        capped = now - max(since, self._link_down_at) >= DISTRUST_CAP * fallback_s
        lasting = (heard and capped) or (recent and now - troubled_since >= fallback_s and (
            now - others_delivered_at >= fallback_s and now - others_at >= fallback_s))
        if capped and not heard:
            # Nobody has answered us for a while: our own link, or a peer that never answers while we
            # ask no one else? One chunk from the origin tells: an answer makes the next failure count.
            self._probe_origin = True
        was_counted = self._counted(peer_id)
        if lasting and peer_id not in self._distrusted:
            # Not counted on to fetch anything from the origin, and its claims count for nothing until it
            # delivers (it is still asked for chunks others claim too): no cycles of benches running out.
            self._distrusted.add(peer_id)
            self._assignee.clear()
            self._set_aside(peer, since, was_counted)
            was_counted = False
        if peer_id in self._benched_until:
            return
        patience_s = config.unresponsive_after_s
        # Benching helps only if some chunk we lack has no other counted claimant: otherwise it costs us
        # a busy peer that may free up (slow swarms are full of those), and gains nothing.
        alone = self._counted(peer_id) and any(
            peer.have[i] and not self._have[i] and self._available[i] == 1 for i in range(self.n_chunks))
        still = (recent and alone and now - stall_since >= patience_s
                 and now - self._delivered_at >= patience_s and now - others_at >= patience_s
                 and not any(other != peer_id for other, _ in self._in_flight))
        if not (lasting or still):
            return
        until = now + config.bench_s
        self._benched_until[peer_id] = until
        self.stats.benched += 1
        self._events.append(PeerBenched(peer_id, until, requests, now - since))
        self._set_aside(peer, since, was_counted)

    def _note_answer(self, now: float) -> None:
        if self._deaf_at > self._answered_at:
            self._hearing_since = now  # answers again after a deaf spell: stalls are timed from here
        self._answered_at = max(self._answered_at, now)
        self._probe_origin = False  # an answer is what the probe was for

    def _note_silence(self, peer_id: str, now: float) -> None:
        if now - self._answered_at <= self.config.unresponsive_after_s:
            return
        self._deaf_at = now  # no answer, and nobody else answered lately
        peer = self._peers.get(peer_id)
        if peer is not None and peer.is_origin:
            self._link_down_at = now  # the origin did not answer either: our own link

    def _set_aside(self, peer: _Peer, since: float, was_counted: bool) -> None:
        """The peer's claims stopped counting (benched or distrusted since its run began at `since`)."""
        if was_counted:
            self._count_claims(peer.peer_id, -1)
        # The stall fallback's clock for chunks only it claimed runs from its first failure, not from
        # now: a bench that runs out and comes back must not restart it.
        for i in range(self.n_chunks):
            if peer.have[i] and not self._have[i] and self._available[i] == 0:
                self._unavailable_since[i] = min(self._unavailable_since.get(i, since), since)
