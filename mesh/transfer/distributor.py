"""The swarm download driver: turns what peers announce into verified chunks on disk.

The decisions are the pure cores': which chunk from which peer, bans, when to
ask the origin and when to wake up are the `SwarmScheduler`'s; which versions
to fetch and keep is `retention.kept_versions`. This shell feeds the scheduler
peers' holdings from the membership view, runs the FetchChunk calls it asks
for, verifies and stores what arrives, and publishes this node's own holdings
on its membership metadata board so that others can fetch from it.

Everything it talks to is given at construction: the membership view and
board, the dialer, what the node pins (`pinned`), and whom to tell when a
version completes (`on_complete`) or is collected (`on_removed`).

What a peer with a valid certificate but hostile intent can make this node do
with announcements (they are only claims until a manifest signed by the
fleet's publisher backs them):

- Only versions whose manifest verified (fetched from the announcer and checked
  in memory, never stored before it verifies) compete for "newest"; an
  unverifiable 9.0 never displaces a genuine 2.0.
- An announcer whose manifest is refused is remembered: its announcements of
  that model are ignored for `ban_s`, and after `MAX_STRIKES` refusals all of
  its announcements are, so it costs this node at most a few small manifest
  fetches per ban period. At most `MAX_CHECKS` manifest checks run at once.
- A refused version shows in `mesh model status` as "refused" with the reason
  and the announcer, without counting as a failed download.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Literal

import grpc

from mesh._proto import transfer_pb2 as pb
from mesh._proto import transfer_pb2_grpc as pb_grpc
from mesh.artifacts.bitfield import Bitfield, BitfieldError
from mesh.artifacts.manifest import ArtifactError, Manifest, ManifestError, SignedManifest, verify_manifest
from mesh.artifacts.store import (
    ArtifactStore,
    BadChunkError,
    ManifestConflictError,
    StoreError,
    version_order_key,
)
from mesh.identity.signing import TrustedKeys
from mesh.membership.messages import MemberView, State
from mesh.membership.sections import MetaError, read_section
from mesh.membership.view import MembershipView, MetadataBoard
from mesh.transfer.haves import HaveExchange, Holder, believed
from mesh.transfer.holdings import Holding, HoldingsError, decode_holdings, encode_holdings, gossip_view
from mesh.transfer.pacing import Pacer
from mesh.transfer.retention import VersionKey, kept_versions
from mesh.transfer.scheduler import (
    FailureReason,
    PeerBanned,
    PeerBenched,
    RequestCancelled,
    SchedulerConfig,
    SwarmScheduler,
)
from mesh.transfer.service import VERSION_NOT_HELD, VERSION_NOT_HELD_BEFORE

log = logging.getLogger("mesh.transfer")

DialTransfer = Callable[[str, str], pb_grpc.TransferStub]
VersionHook = Callable[[str, str], None]

# The membership metadata section this node's holdings are published in.
HOLDINGS_SECTION = "holdings"
# Manifest checks of announced versions running at once, and verified manifests kept in memory.
MAX_CHECKS = 4
MAX_CHECKED = 64
# Refused manifests after which all of an announcer's announcements are ignored for ban_s.
MAX_STRIKES = 3
# A check that could not reach the announcer is retried after this long.
CHECK_RETRY_S = 5.0

# How often the store is listed for versions that `mesh model publish` (another process)
# wrote into it. Publishing is rare and an operator waits seconds for it anyway.
RESCAN_INTERVAL_S = 1.0


def _no_hook(name: str, version: str) -> None:
    return None


def _nothing_pinned() -> Set[VersionKey]:
    return frozenset()


def _nothing_uploaded(name: str, version: str) -> int:
    return 0


class Phase(enum.Enum):
    MANIFEST = "manifest"
    CHUNKS = "chunks"
    ASSEMBLING = "assembling"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass
class Progress:
    """One version's download, as `mesh model status` shows it."""

    name: str
    version: str
    phase: Phase
    have_chunks: int = 0
    total_chunks: int = 0
    bytes_have: int = 0
    size_bytes: int = 0
    bytes_downloaded: int = 0
    started_at: float = 0.0
    error: str = ""
    bytes_from: dict[str, int] = field(default_factory=dict)  # peer id -> bytes received from it


@dataclass
class DownloadCounters:
    """What this node received, for metrics (they only grow): chunk bytes by the sender's role,
    chunks verified and refused by reason, and bans by reason with when each ban ends."""

    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    bytes_from_other_sites: int = 0  # of the above two, from a sender of another site (label `site`)
    holdings_updates: int = 0  # times what this node gossips of its holdings changed
    chunks_verified: int = 0
    chunks_refused: dict[str, int] = field(default_factory=lambda: {"hash_mismatch": 0, "size_mismatch": 0})
    # false_claim: it announced chunks it then said it did not hold (SchedulerConfig.max_false_claims)
    bans: dict[str, int] = field(
        default_factory=lambda: {"hash_mismatch": 0, "protocol": 0, "false_claim": 0}
    )
    banned_until: dict[str, float] = field(default_factory=dict)  # peer id -> end of its latest ban (now())
    # Peers whose chunk claims were set aside: they failed request after request (busy, timed out)
    # without delivering one (SchedulerConfig.unresponsive_failures); not a ban, they may be honest.
    benched: int = 0
    last_refusal: dict[str, str] = field(default_factory=dict)  # peer id -> why its last chunk was refused

    def banned_now(self, now: float) -> int:
        """Peers whose ban has not run out at `now`."""
        return sum(1 for until in list(self.banned_until.values()) if until > now)


@dataclass(frozen=True)
class Refusal:
    """A version refused here: why, who announced it, when."""

    why: str
    announcer: str
    at: float


# How often a low-priority download that is waiting for others looks again whether it still must wait.
YIELD_RECHECK_S = 1.0


# gRPC statuses that are not a peer's answer (transport, deadline, our own cancel): the scheduler counts
# them against a peer only while someone else answers this node.
_NO_ANSWER = (None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.UNKNOWN)

def failure_of(code: grpc.StatusCode | None, details: str) -> FailureReason:
    """What a failed FetchChunk tells the scheduler (`code` None: the connection broke)."""
    if code is grpc.StatusCode.NOT_FOUND:  # it announced the chunk and does not hold it
        # It collected the whole version (or never had it): no lie, its claims just go.
        gone = details.startswith((VERSION_NOT_HELD, VERSION_NOT_HELD_BEFORE))
        return FailureReason.WITHDRAWN if gone else FailureReason.NOT_HELD
    oversized = details.startswith("Received message larger")  # gRPC's own words, on our side
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and not oversized:
        return FailureReason.BUSY  # no upload slot now, or the origin's "ask a peer"
    if code in _NO_ANSWER:
        return FailureReason.UNAVAILABLE  # we could not reach it, or it did not answer in time
    return FailureReason.ERROR  # it answered, with an error of its own (or an oversized message)


HAVE_TIMEOUT_S = 5.0  # a GetHave answer is a few bytes: a peer that takes longer is asked again later


@dataclass(frozen=True)
class TransferSettings:
    max_in_flight_per_peer: int = 2
    request_timeout_s: float = 30.0
    ban_s: float = 300.0
    download_rate_bytes_per_s: float | None = None
    fetch_all: bool = True  # fetch every announced version (until rollouts decide what is wanted)
    # Versions of each model kept on disk (the newest ones): the active one and
    # the previous one for rollback. Older versions are neither fetched nor kept.
    keep_per_model: int = 2
    # Registry-style baseline for the distribution benchmark: fetch only from the
    # origin, as if every device pulled from a central server.
    origin_only: bool = False
    # Sites mode: how long a version only other sites announce waits for the site's fetcher before
    # any representative fetches it across sites (at least three dissemination times).
    cross_fallback_s: float = 60.0
    origin_fallback_s: float = 60.0  # SchedulerConfig.origin_fallback_s
    # Chunk progress travels between transfer peers: gossip says a holding's progress in eighths
    # (`holdings.gossip_view`), and a downloader asks up to `have_peers` partial holders for their chunk
    # lists (GetHave). False: every chunk stored changes the gossiped bitfield, as older nodes do.
    stepped_holdings: bool = True
    have_peers: int = 8


class Distributor:
    """One node's side of peer-to-peer distribution: announce, fetch, verify, store."""

    def __init__(self, *, node_id: str, site: str, store: ArtifactStore, trusted: TrustedKeys,
                 view: MembershipView, board: MetadataBoard, dial: DialTransfer, settings: TransferSettings,
                 rng: random.Random, now: Callable[[], float],
                 pinned: Callable[[], Set[VersionKey]] = _nothing_pinned,
                 unwanted: Callable[[], Set[VersionKey]] = _nothing_pinned,
                 background: Callable[[], Set[VersionKey]] = _nothing_pinned,
                 on_complete: VersionHook = _no_hook, on_removed: VersionHook = _no_hook,
                 uploaded: Callable[[str, str], int] = _nothing_uploaded,
                 crosses: Callable[[str, str], bool] | None = None) -> None:
        """`pinned()`: versions the node needs whatever their age (the active and previous model,
        a rollout's baseline and target). `unwanted()`: versions not to start fetching now, however
        new (a rollout's target outside this device's wave when its plan says not to prefetch, the
        target of an aborted rollout). `background()`: versions fetched at low priority, asking for no
        chunk while any other download runs here (a rollout's target prefetched outside this device's
        wave, so the fetch of what it must serve now is never slowed by it). `on_complete`/`on_removed`:
        told when a version is complete here / was garbage-collected. `uploaded(name, version)`: bytes
        of it this node has served (the Transfer service counts them). `crosses(name, version)`, in sites
        mode: whether this node fetches that version from nodes of other sites (only the site's fetcher
        for it, one of its representatives; the others wait for it to land in their site); no node fetches
        across sites a version whose origin is in its own site. None (flat mode): every peer counts."""
        self.node_id = node_id
        self._crosses = crosses
        self._foreign_since: dict[VersionKey, float] = {}  # versions only other sites announce: since when
        # Per manifest (name, version, digest): chunks the site's other members hold, and since when.
        self._site_progress: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._cross_poke: asyncio.TimerHandle | None = None
        self._crossing: set[VersionKey] = set()  # versions this node fetches across sites by the fallback
        self.site = site
        self.store = store
        self.trusted = trusted
        self.settings = settings
        self._view = view
        self._board = board
        self._dial = dial
        self._rng = rng
        self._now = now
        self._pinned = pinned
        self._unwanted = unwanted
        self._background = background
        self._on_complete = on_complete
        self._on_removed = on_removed
        self._uploaded = uploaded
        self._download = Pacer(settings.download_rate_bytes_per_s)
        self._wake = asyncio.Event()
        # One event per running download: a poke must reach every waiter, including one that
        # was busy (not waiting) when it came, so each clears only its own before it looks.
        self._download_wakes: set[asyncio.Event] = set()
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._origin: set[tuple[str, str]] = set()
        self._refused: dict[tuple[str, str, str], Refusal] = {}  # (name, version, digest) -> why
        self._checked: OrderedDict[tuple[str, str, str], SignedManifest] = OrderedDict()
        self._checking: dict[tuple[str, str, str], asyncio.Task] = {}
        self._check_failed_at: dict[tuple[str, str, str], float] = {}
        self._bans: dict[tuple[str, str], float] = {}  # (announcer, model or "") -> until
        self._strikes: dict[str, int] = {}
        self._bad_meta_logged: set[str] = set()
        self._decoded: dict[str, tuple[tuple[int, int], list[Holding]]] = {}
        self._complete: set[tuple[str, str]] = set()  # versions assembled and verified here
        self._rescanned_at = -float("inf")
        self._holdings: dict[tuple[str, str], Holding] = {}
        self._announced: dict[tuple[str, str], Holding] = {}  # what gossip says of each (steps)
        self._announced_blob = b""
        self._gc_pending = False
        self.progress: dict[tuple[str, str], Progress] = {}
        self.counters = DownloadCounters()
        self._loop_task: asyncio.Task | None = None
        self.completed = asyncio.Condition()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._load_holdings()
        self._announce()
        self._loop_task = asyncio.create_task(self._run(), name=f"transfer-{self.node_id}")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks.values(), *self._checking.values())
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._cross_poke is not None:
            self._cross_poke.cancel()

    def poke(self) -> None:
        """Something changed (a peer's holdings, joins, deaths, what the node pins): look again."""
        self._wake.set()
        for wake in self._download_wakes:
            wake.set()

    def on_member_events(self, events: object) -> None:
        """Membership event handler: any change may bring new holdings."""
        self.poke()

    # -- what we hold ------------------------------------------------------------

    def add_published(self, signed: SignedManifest) -> None:
        """A version published at this node (the origin): announce it."""
        self.add_local(signed, origin=True)

    def add_local(self, signed: SignedManifest, *, origin: bool) -> None:
        """A complete version put into the store by hand: announce it, as origin or as a plain seeder."""
        manifest = signed.manifest
        if origin:
            self.store.mark_origin(manifest.name, manifest.version)
            self._origin.add((manifest.name, manifest.version))
        if self.store.is_complete(manifest):
            self._complete.add((manifest.name, manifest.version))
            self._on_complete(manifest.name, manifest.version)
        self._set_holding(manifest, self.store.bitfield(manifest))
        self._announce()
        self._gc_pending = True
        self.poke()

    def is_origin(self, name: str, version: str) -> bool:
        return (name, version) in self._origin


    def holdings(self) -> list[Holding]:
        return list(self._holdings.values())

    def have_of(self, name: str, version: str, manifest_digest: str) -> Bitfield | None:
        """The chunks of `name` `version` (of that manifest) this node holds now, for GetHave; None if it
        holds no such version."""
        holding = self._holdings.get((name, version))
        if holding is None or holding.manifest_digest != manifest_digest:
            return None
        return holding.have.copy()

    def model_status(self) -> list[dict]:
        """Every stored or downloading version with its progress (the admin Models rows)."""
        rows = {}
        for status in self.store.versions():
            key = (status.name, status.version)
            rows[key] = dict(name=status.name, version=status.version,
                             phase=(Phase.COMPLETE if status.complete else Phase.CHUNKS).value,
                             have_chunks=status.have_chunks, total_chunks=status.total_chunks,
                             bytes_have=status.bytes_have, size_bytes=status.size_bytes,
                             # The store's mark, not only what the loop has picked up yet: a version
                             # published here is reported as origin as soon as it shows complete.
                             origin=key in self._origin or (status.complete
                                                            and self.store.is_origin(*key)),
                             manifest_digest=status.digest)
        for key, progress in self.progress.items():
            row = rows.setdefault(key, dict(name=progress.name, version=progress.version,
                                            origin=False, have_chunks=0, total_chunks=0))
            if row.get("phase") != Phase.COMPLETE.value:
                row["phase"] = progress.phase.value
            row["error"] = progress.error if progress.phase is Phase.FAILED else ""
            row["bytes_downloaded"] = progress.bytes_downloaded
        for (name, version, digest), refusal in self._refused.items():
            if (name, version) not in rows:
                rows[(name, version)] = dict(name=name, version=version, phase="refused", origin=False,
                                             have_chunks=0, total_chunks=0, manifest_digest=digest,
                                             error=f"{refusal.why} (announced by {refusal.announcer})")
        for key, row in rows.items():
            row["bytes_uploaded"] = self._uploaded(*key)
        return [rows[k] for k in sorted(rows)]

    def phase_counts(self) -> dict[str, int]:
        """Versions by download phase: those held complete, and the rest by their download's phase."""
        counts = {phase.value: 0 for phase in Phase}
        complete = set(self._complete)
        counts[Phase.COMPLETE.value] = len(complete)
        for key, progress in list(self.progress.items()):
            if key not in complete and progress.phase is not Phase.COMPLETE:
                counts[progress.phase.value] += 1
        return counts

    async def collect_garbage(self) -> int:
        """Remove versions (and chunks) no longer kept; return bytes freed.

        Not while a download runs: its chunks land before its manifest is on disk, and the
        sweep would take them for garbage. It is retried when the loop next wakes."""
        if self._tasks:
            self._gc_pending = True
            return 0
        # Read on the loop, used in the sweep's thread.
        downloading, pinned = set(self._tasks), set(self._pinned())
        keep_per_model = self.settings.keep_per_model
        try:
            kept, freed = await asyncio.to_thread(
                self.store.collect, lambda stored: kept_versions(stored, keep_per_model=keep_per_model,
                                                                 pinned=pinned, downloading=downloading),
                wait=False)
        except BlockingIOError:  # a publish is writing into the store: never block the loop on it
            self._gc_pending = True
            return 0
        except StoreError as exc:
            log.error("garbage collection skipped: %s", exc)
            return 0
        dropped = [key for key in self._holdings if key not in kept]
        for key in dropped:
            del self._holdings[key]
            self._origin.discard(key)
            self._complete.discard(key)
            self._on_removed(*key)
        if dropped:
            log.info("removed %s (%d bytes freed)", ", ".join(f"{n} {v}" for n, v in dropped), freed)
            self._announce()
        return freed

    def _rescan(self) -> bool:
        """Pick up versions written into the store by `mesh model publish` while we run; True if any.
        At most once per RESCAN_INTERVAL_S: it lists the store's directories."""
        now = self._now()
        if now - self._rescanned_at < RESCAN_INTERVAL_S:
            return False
        self._rescanned_at = now
        changed = False
        try:
            with self.store.locked(exclusive=False, wait=False):
                for name, version in self.store.stored_versions():
                    key = (name, version)
                    if key in self._tasks and self.store.model_path(name, version).exists():
                        self.poke()  # a publish here wrote the whole version a download is fetching
                    if key in self._tasks or key in self._complete:
                        continue
                    # New, or held incomplete but now whole (a publish that was midway when we
                    # started, or one run again after it was cut short).
                    if key not in self._holdings or self.store.model_path(name, version).exists():
                        changed |= self._pick_up(name, version)
        except BlockingIOError:
            return False  # a publish is writing: look again next time
        except StoreError as exc:
            log.warning("cannot rescan the store: %s", exc)
            return False
        if changed:
            self._announce()
        return changed

    def _pick_up(self, name: str, version: str) -> bool:
        """Hold a version found in the store; True if that changed what we announce (newly held,
        or newly complete)."""
        try:
            manifest = self.store.load_manifest(name, version).manifest
        except (FileNotFoundError, ArtifactError, OSError):
            return False
        changed = (name, version) not in self._holdings
        if self.store.is_complete(manifest):
            changed = True
            self._complete.add((name, version))
            if self.store.is_origin(name, version):
                self._origin.add((name, version))
                log.info("announcing %s %s, published here", name, version)
            self._on_complete(name, version)
        if changed:
            self._set_holding(manifest, self.store.bitfield(manifest))
        return changed

    def _load_holdings(self) -> None:
        for signed in self.store.manifests():
            self._pick_up(signed.manifest.name, signed.manifest.version)

    def _set_holding(self, manifest: Manifest, have: Bitfield) -> None:
        key = (manifest.name, manifest.version)
        self._holdings[key] = Holding(manifest.name, manifest.version, manifest.digest, have,
                                      key in self._origin)

    def _announce(self) -> None:
        """Publish our holdings in membership metadata. If they do not fit, partial holdings go
        first and versions we originate go last: they are what peers most need from us. With
        `stepped_holdings`, a partial holding's progress in eighths (it changes in gossip at most nine
        times per version, not once per chunk)."""
        if self.settings.stepped_holdings:
            self._announced = {
                key: gossip_view(h, self._announced.get(key)) for key, h in self._holdings.items()
            }
            shown = list(self._announced.values())
        else:
            shown = list(self._holdings.values())
        holdings = sorted(shown, key=lambda h: (not h.origin, not h.complete))
        blob = b""
        while holdings:
            blob = encode_holdings(holdings)
            if len(blob) <= self._board.meta_limit_bytes:
                break
            holdings.pop()
            blob = b""
        if blob != self._announced_blob:  # what gossip carries changed: one more update for the pool
            self.counters.holdings_updates += 1
            self._announced_blob = blob
        self._board.set_meta(blob)

    # -- what peers hold ---------------------------------------------------------

    def _peer_holdings(self) -> list[tuple[MemberView, list[Holding]]]:
        out = []
        for member in self._view.members():
            # A SUSPECT member is most likely alive and slow: dropping it would cancel
            # its uploads half-way and refetch those chunks elsewhere.
            if member.node_id == self.node_id or member.state not in (State.ALIVE, State.SUSPECT) \
                    or not member.meta:
                continue
            # Decoding every peer's metadata on every wake-up showed in profiles: cache by version.
            version = (member.incarnation, member.meta_version)
            cached = self._decoded.get(member.node_id)
            if cached is not None and cached[0] == version:
                out.append((member, cached[1]))
                continue
            try:
                holdings = decode_holdings(read_section(member.meta, HOLDINGS_SECTION))
            except (HoldingsError, MetaError) as exc:
                if member.node_id not in self._bad_meta_logged:
                    self._bad_meta_logged.add(member.node_id)
                    log.warning("ignoring holdings of %s: %s", member.node_id, exc)
                continue
            self._decoded[member.node_id] = (version, holdings)
            out.append((member, holdings))
        if len(self._decoded) > len(out):  # members that died or left: forget their holdings
            current = {m.node_id for m, _ in out}
            self._decoded = {k: v for k, v in self._decoded.items() if k in current}
        if self._crosses is None:
            return out
        # Sites mode: another site's holdings count only for versions this node fetches across sites
        # (it is the site's fetcher for them), or that the site has not made progress on for
        # `cross_fallback_s`: nobody in it announced the version (the fetcher does not want it, or
        # the site disagrees on who it is), or the chunks the site's other members hold stopped
        # growing while other sites offer chunks it lacks (the fetcher cannot reach them). While this
        # node's download of a version it crosses for runs, it keeps crossing. Only announcements of a
        # verified manifest, of its chunk count, by members not banned count as the site's; a version
        # this node does not want starts no timer; never crosses a version whose origin is in the site.
        ours = [dict(m.labels).get("site", "") == self.site for m, _ in out]
        if all(ours):  # no other site in view (any device but a representative): nothing to decide
            self._foreign_since.clear()
            return out
        now = self._now()
        fallback_s = max(self.settings.cross_fallback_s, 3 * self._view.dissemination_s())
        chunks: dict[tuple[str, str, str], int] = {ident: len(signed.manifest.chunks)
                                                   for ident, signed in self._checked.items()}
        for h in self._holdings.values():
            chunks[(*h.key, h.manifest_digest)] = len(h.have)
        in_site_origin = set(self._origin)
        union: dict[tuple[str, str, str], Bitfield] = {}  # per manifest: chunks the site's others hold
        complete = {key for key, h in self._holdings.items() if h.complete}
        for (member, hs), mine in zip(out, ours, strict=True):
            if not mine:
                continue
            for h in hs:
                ident = (*h.key, h.manifest_digest)
                if chunks.get(ident) != len(h.have) or ident in self._refused \
                        or self._banned(member.node_id, h.name, now):
                    continue
                union[ident] = union[ident] | h.have if ident in union else h.have.copy()
                if h.origin:
                    in_site_origin.add(h.key)
                if h.complete:
                    complete.add(h.key)
        in_site = {ident[:2] for ident in union}
        for ident, bits in union.items():  # progress is growth only: a holder gone is not progress
            count = bits.count()
            if ident not in self._site_progress or count > self._site_progress[ident][0]:
                self._site_progress[ident] = (count, now)
        self._site_progress = {k: v for k, v in self._site_progress.items() if k in union}
        self._crossing &= set(self._tasks)  # only while this node's download of it runs
        unwanted = set(self._unwanted())
        foreign_only: set[VersionKey] = set()
        flips: list[float] = []  # when a version still waiting would start to count

        def after(key: VersionKey, since: float) -> bool:
            if now - since >= fallback_s:
                if key in self._tasks and key not in self._crossing:
                    log.info("%s %s: no progress in this site for %.0f s; fetching it from other sites",
                             *key, fallback_s)
                    self._crossing.add(key)
                return True
            flips.append(since + fallback_s)
            return False

        def counts(h: Holding) -> bool:
            if h.key in in_site_origin:
                return False
            if h.key in self._crossing or (self._crosses is not None and self._crosses(*h.key)):
                return True
            if h.key in complete or h.key in unwanted:
                return False
            if h.key in in_site:  # the site is fetching it: cross only if that stalled and they have more
                ident = (*h.key, h.manifest_digest)
                site = union.get(ident)
                if site is None or len(site) != len(h.have) or not (h.have - site).count():
                    return False
                return after(h.key, self._site_progress[ident][1])
            foreign_only.add(h.key)
            return after(h.key, self._foreign_since.setdefault(h.key, now))

        result = [(m, hs if mine else [h for h in hs if counts(h)])
                  for (m, hs), mine in zip(out, ours, strict=True)]
        self._foreign_since = {k: v for k, v in self._foreign_since.items() if k in foreign_only}
        if flips:  # look again then: nothing else may wake this node when a fallback comes due
            loop = asyncio.get_running_loop()
            due = loop.time() + max(0.0, min(flips) - now) + 0.05
            handle = self._cross_poke
            if handle is None or handle.cancelled() or not loop.time() <= handle.when() <= due + 0.01:
                if handle is not None:
                    handle.cancel()
                self._cross_poke = loop.call_later(due - loop.time(), self.poke)
        return result

    # -- the loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._rescan() or self._gc_pending:
                self._gc_pending = False
                await self.collect_garbage()
            if self.settings.fetch_all:
                self._start_wanted()
            # Woken by pokes (membership, pins); otherwise at the next store rescan.
            try:
                async with asyncio.timeout(max(0.0, self._rescanned_at + RESCAN_INTERVAL_S - self._now())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _start_wanted(self) -> None:
        now = self._now()
        known = set(self._holdings)  # what we hold was verified when it was stored
        announced: set[tuple[str, str]] = set()
        unverified: dict[tuple[str, str, str], MemberView] = {}
        for member, holdings in self._peer_holdings():
            for holding in holdings:
                ident = (*holding.key, holding.manifest_digest)
                if ident in self._refused or self._banned(member.node_id, holding.name, now):
                    continue
                if holding.key in self._holdings or ident in self._checked:
                    known.add(holding.key)
                    announced.add(holding.key)
                else:
                    unverified.setdefault(ident, member)
        wanted = kept_versions(known, keep_per_model=self.settings.keep_per_model, pinned=self._pinned(),
                               downloading=self._tasks) - set(self._unwanted())
        for key in sorted(wanted & announced):
            if key not in self._tasks and key not in self._complete:
                self.fetch(*key)
        # Verify the announcements that would be wanted if they are genuine, newest first.
        for ident, member in sorted(unverified.items(), key=lambda im: version_order_key(im[0][1]),
                                    reverse=True):
            if len(self._checking) >= MAX_CHECKS:
                break
            key = ident[:2]
            if ident in self._checking or key not in kept_versions(known | {key}, pinned=self._pinned(),
                                                                  keep_per_model=self.settings.keep_per_model):
                continue
            if now - self._check_failed_at.get(ident, -math.inf) < CHECK_RETRY_S:
                continue
            task = asyncio.create_task(self._check(ident, member), name=f"check-{key[0]}-{key[1]}")
            self._checking[ident] = task
            task.add_done_callback(functools.partial(self._check_done, ident))

    def _banned(self, announcer: str, model: str, now: float) -> bool:
        return (self._bans.get((announcer, model), -math.inf) > now
                or self._bans.get((announcer, ""), -math.inf) > now)

    def _refuse(self, ident: tuple[str, str, str], announcer: str, why: str) -> None:
        """Refuse a version for good, and ignore its announcer's announcements of that model (of
        everything after MAX_STRIKES refusals) for ban_s."""
        name, version, _digest = ident
        now = self._now()
        self._refused[ident] = Refusal(why, announcer, now)
        strikes = self._strikes[announcer] = self._strikes.get(announcer, 0) + 1
        self._bans[(announcer, name)] = now + self.settings.ban_s
        scope = f"announcements of {name}"
        if strikes >= MAX_STRIKES:
            self._bans[(announcer, "")] = now + self.settings.ban_s
            scope = "announcements"
        log.error("refusing %s %s announced by %s: %s; ignoring its %s for %.0fs", name, version, announcer,
                  why, scope, self.settings.ban_s)

    def _check_done(self, ident: tuple[str, str, str], _task: asyncio.Task[None]) -> None:
        self._checking.pop(ident, None)

    async def _check(self, ident: tuple[str, str, str], member: MemberView) -> None:
        """Fetch and verify the manifest `member` announced, in memory; a genuine one may then
        compete for newest, a bad one is refused and its announcer ignored for a while."""
        name, version, digest = ident
        try:
            reply = await self._dial(member.address, member.node_id).GetManifest(
                pb.ManifestRequest(name=name, version=version), timeout=self.settings.request_timeout_s)
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            log.debug("manifest check of %s %s at %s failed: %s", name, version, member.node_id, exc)
            self._check_failed_at[ident] = self._now()
            return
        try:
            signed = SignedManifest.from_json(reply.signed_manifest)
            if (signed.manifest.name, signed.manifest.version) != (name, version):
                raise ManifestError(f"it served the manifest of {signed.manifest.label} for {name} {version}")
            if signed.digest != digest:
                raise ManifestError(f"it served a manifest with digest {signed.digest[:16]}..., "
                                    f"but announced {digest[:16]}...")
            verify_manifest(signed, self.trusted)
        except ManifestError as exc:
            self._refuse(ident, member.node_id, str(exc))
            return
        self._checked[ident] = signed
        while len(self._checked) > MAX_CHECKED:
            self._checked.popitem(last=False)
        self.poke()

    def fetch(self, name: str, version: str) -> asyncio.Task:
        """Start (or return the running) download of name/version."""
        key = (name, version)
        task = self._tasks.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._fetch(name, version), name=f"fetch-{name}-{version}")
            self._tasks[key] = task
        return task

    async def wait_complete(self, name: str, version: str) -> Progress:
        """Until name/version is complete here (or its download failed)."""
        key = (name, version)
        async with self.completed:
            await self.completed.wait_for(
                lambda: key in self.progress and self.progress[key].phase in (Phase.COMPLETE, Phase.FAILED))
        return self.progress[key]

    async def _finish(self, progress: Progress, phase: Phase, error: str = "") -> None:
        progress.phase, progress.error = phase, error
        async with self.completed:
            self.completed.notify_all()

    async def _fetch(self, name: str, version: str) -> None:
        key = (name, version)
        progress = self.progress.get(key)
        if progress is None or progress.phase is Phase.FAILED:
            progress = self.progress[key] = Progress(name, version, Phase.MANIFEST, started_at=self._now())
        try:
            manifest = await self._get_manifest(name, version, progress)
            if manifest is None:
                return
            await self._get_chunks(manifest, progress)
            progress.phase = Phase.ASSEMBLING
            await asyncio.to_thread(self.store.assemble, manifest)
            self._complete.add(key)
            if self.store.is_origin(name, version):  # finished by a publish here, not by peers
                self._origin.add(key)
            self._set_holding(manifest, Bitfield.full(len(manifest.chunks)))
            self._announce()
            log.info("%s %s complete: %d bytes, %d downloaded, in %.2fs", name, version, manifest.size_bytes,
                     progress.bytes_downloaded, self._now() - progress.started_at)
            await self._finish(progress, Phase.COMPLETE)
            self._on_complete(name, version)
            await self.collect_garbage()
        except StoreError as exc:
            # Disk full or an I/O error: the store keeps what it had; retry on a later announcement.
            log.error("download of %s %s failed: %s", name, version, exc)
            await self._finish(progress, Phase.FAILED, str(exc))
        except Exception as exc:  # a download must end in COMPLETE or FAILED, never vanish
            log.exception("download of %s %s failed unexpectedly", name, version)
            await self._finish(progress, Phase.FAILED, f"unexpected error: {exc}")
        finally:
            self._tasks.pop(key, None)
            # A low-priority download waiting for this one goes on. Only the downloads: waking the main
            # loop here would restart a failed download at once (a full disk would spin).
            for wake in self._download_wakes:
                wake.set()

    async def _get_manifest(self, name: str, version: str, progress: Progress) -> Manifest | None:
        try:
            return self.store.load_manifest(name, version).manifest
        except FileNotFoundError:
            pass
        except ManifestError as exc:  # unreadable here: fetch it again (save_manifest replaces it)
            log.warning("stored manifest of %s %s is unreadable (%s); fetching it again", name, version, exc)
        checked = [(ident, signed) for ident, signed in self._checked.items() if ident[:2] == (name, version)]
        for ident, signed in checked:  # verified when it was checked: store it (verified again)
            try:
                manifest = await asyncio.to_thread(self.store.save_manifest, signed, trusted=self.trusted)
            except (ManifestConflictError, ManifestError) as exc:
                log.error("not storing %s %s: %s", name, version, exc)
                self._checked.pop(ident, None)
                continue
            self._set_holding(manifest, self.store.bitfield(manifest))
            self._announce()
            return manifest
        holders = self._holders(name, version)
        for member, holding in holders:
            try:
                reply = await self._dial(member.address, member.node_id).GetManifest(
                    pb.ManifestRequest(name=name, version=version), timeout=self.settings.request_timeout_s)
                signed = SignedManifest.from_json(reply.signed_manifest)
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                log.debug("manifest of %s %s from %s failed: %s", name, version, member.node_id, exc)
                continue
            except ManifestError as exc:
                log.warning("%s served a malformed manifest for %s %s: %s", member.node_id, name, version,
                            exc)
                continue
            if (signed.manifest.name, signed.manifest.version) != (name, version):
                # A genuine manifest of another version under this one's name would make us
                # believe we hold a version we never fetched.
                log.warning("%s served the manifest of %s for %s %s; ignoring it", member.node_id,
                            signed.manifest.label, name, version)
                continue
            if signed.digest != holding.manifest_digest:
                log.warning("%s served a manifest for %s %s with digest %s..., but announced %s...",
                            member.node_id, name, version, signed.digest[:16], holding.manifest_digest[:16])
                continue
            try:
                manifest = await asyncio.to_thread(self.store.save_manifest, signed, trusted=self.trusted)
            except (ManifestConflictError, ManifestError) as exc:
                # Not signed by the fleet's publisher (or clashing with a stored version):
                # refuse it for good, whoever offers it.
                why = str(exc)
                self._refuse((name, version, holding.manifest_digest), member.node_id, why)
                await self._finish(progress, Phase.FAILED, why)
                return None
            # Announce at once, even with no chunks: peers' schedulers count who is fetching.
            self._set_holding(manifest, self.store.bitfield(manifest))
            self._announce()
            return manifest
        await self._finish(progress, Phase.FAILED, "no peer could serve the manifest yet")
        return None

    def _holders(self, name: str, version: str) -> list[tuple[MemberView, Holding]]:
        """Peers announcing name/version, same site first, then origin last."""
        found = [(m, h) for m, hs in self._peer_holdings() for h in hs
                 if h.key == (name, version) and (h.origin or not self.settings.origin_only)]
        return sorted(found, key=lambda mh: (mh[1].origin, dict(mh[0].labels).get("site") != self.site,
                                             self._rng.random()))

    async def _get_chunks(self, manifest: Manifest, progress: Progress) -> None:
        have = self.store.bitfield(manifest)
        sizes = [c.size_bytes for c in manifest.chunks]
        progress.phase = Phase.CHUNKS
        progress.total_chunks, progress.size_bytes = len(sizes), manifest.size_bytes
        # Resume and delta: chunks already verified on disk (from an earlier run, or
        # shared with a version we hold) are never asked for.
        scheduler = SwarmScheduler(sizes, set(have.present()), self_site=self.site, rng=self._rng,
                                   self_id=self.node_id, now=self._now(),
                                   config=SchedulerConfig(
                                       max_in_flight_per_peer=self.settings.max_in_flight_per_peer,
                                       request_timeout_s=self.settings.request_timeout_s,
                                       ban_s=self.settings.ban_s,
                                       origin_fallback_s=self.settings.origin_fallback_s,
                                       origin_holdoff_s=self._view.dissemination_s()))
        addresses: dict[str, str] = {}
        running: dict[tuple[str, int], asyncio.Task] = {}
        known_peers: set[str] = set()
        # Partial holders announce progress in steps: their exact chunk lists come from GetHave.
        exchange = HaveExchange(self_site=self.site, rng=self._rng, k=self.settings.have_peers)
        asking: dict[str, asyncio.Task] = {}
        site_told = Bitfield(len(sizes))  # sites mode: chunks same-site members said they hold

        def refresh_peers() -> list[Holder]:
            nonlocal site_told
            now = self._now()
            seen = set()
            holders = []
            for member, holding in self._holders(manifest.name, manifest.version):
                if holding.manifest_digest != manifest.digest or len(holding.have) != len(sizes):
                    continue
                seen.add(member.node_id)
                addresses[member.node_id] = member.address
                site = dict(member.labels).get("site", "")
                told = None if holding.progress is None else exchange.known(member.node_id, holding.progress)
                if site == self.site:  # what the site's members said in gossip: not news when asked
                    site_told = site_told | holding.have
                claimed = believed(holding.have, told)  # its snapshot, and what it said since
                scheduler.peer_update(member.node_id, site=site, have=list(claimed.present()),
                                      is_origin=holding.origin, now=now)
                holders.append(Holder(member.node_id, site, holding.progress, holding.complete,
                                      holding.origin))
            # A peer missing from this round's holders may only look dead to an overloaded
            # failure detector; a request still running to it will end by itself (and
            # fail if the peer is really gone). Cancelling it would waste its bytes.
            busy = {peer_id for peer_id, _ in running}
            for gone in known_peers - seen - busy:
                # Still a live member: it stopped announcing the version (collected it), so claims of it
                # that were masked are forgotten; a member that looks dead keeps its masks, as its bans.
                still = self._view.member(gone)
                withdrew = still is not None and still.state in (State.ALIVE, State.SUSPECT)
                scheduler.peer_gone(gone, now, withdrew=withdrew)
                known_peers.discard(gone)
            known_peers.update(seen)
            return holders

        counters = self.counters

        def handle_events() -> None:
            for event in scheduler.drain_events():
                if isinstance(event, RequestCancelled):
                    log.debug("cancelling chunk %d from %s: %s", event.index, event.peer_id, event.why)
                    task = running.pop((event.peer_id, event.index), None)
                    if task is not None:
                        task.cancel()
                elif isinstance(event, PeerBanned):
                    if event.reason is FailureReason.NOT_HELD:
                        reason = "false_claim"
                    elif counters.last_refusal.get(event.peer_id) == "size_mismatch":
                        reason = "protocol"
                    else:
                        reason = "hash_mismatch"
                    counters.bans[reason] += 1
                    counters.banned_until[event.peer_id] = max(event.until,
                                                               counters.banned_until.get(event.peer_id, 0.0))
                    log.warning("banned %s from %s %s until %.0fs from now (%s on chunk %d)", event.peer_id,
                                manifest.name, manifest.version, event.until - self._now(),
                                event.reason.value, event.index)
                elif isinstance(event, PeerBenched):
                    counters.benched += 1
                    log.info("peer %s announces chunks of %s %s but failed %d requests in a row over %.0fs "
                             "(busy, an error or no answer); asking others and the origin for them for %.0fs",
                             event.peer_id, manifest.name, manifest.version, event.failures, event.over_s,
                             event.until - self._now())

        progress.have_chunks = have.count()
        progress.bytes_have = sum(sizes[i] for i in have.present())
        wake = asyncio.Event()
        self._download_wakes.add(wake)
        try:
            while not scheduler.done:
                wake.clear()  # before looking: a poke from here on is not lost
                if self.store.is_complete(manifest):
                    break  # a `mesh model publish` here (re)wrote the whole version meanwhile
                holders = refresh_peers()
                # Low priority: no new request while a download of anything else runs (those in flight end).
                yielding = self._yields((manifest.name, manifest.version))
                requests = () if yielding else scheduler.next_requests(self._now())
                # Its cancellations first (a role flip in refresh_peers, a timeout in next_requests): they
                # name requests sent before, and a re-sent request may have the same peer and chunk.
                handle_events()
                for request in requests:
                    key = (request.peer_id, request.index)
                    if (old := running.pop(key, None)) is not None:  # (not expected: the scheduler ended it)
                        old.cancel()
                    running[key] = asyncio.create_task(self._fetch_chunk(
                        manifest, request.peer_id, addresses[request.peer_id], request.index, progress,
                        from_origin=request.is_origin))
                # Chunk lists of the partial holders it may fetch from (more often while it has nothing to
                # do); while yielding too, so that a site's progress between eighths is seen.
                for peer_id in exchange.to_ask(holders, self._now(), starving=not requests and not running):
                    if peer_id not in asking:  # (an ask from before it left the exchange still runs)
                        asking[peer_id] = asyncio.create_task(
                            self._ask_have(manifest, peer_id, addresses[peer_id]))
                if scheduler.done:
                    break
                # Wake for an answer, a poke (new holdings, another download ended) or the scheduler's next
                # deadline; while yielding, look again every YIELD_RECHECK_S too: the device's wave may
                # have come (nothing pokes the distributor when steering changes).
                waiting = asyncio.ensure_future(wake.wait())
                deadline = min(self._now() + YIELD_RECHECK_S if yielding else scheduler.next_deadline(),
                               exchange.next_due(self._now()))  # and the next chunk-list ask
                timeout_s = None if math.isinf(deadline) else max(0.0, deadline - self._now())
                done, _ = await asyncio.wait({*running.values(), *asking.values(), waiting},
                                             timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                for peer_id, task in list(asking.items()):
                    if task not in done:
                        continue
                    del asking[peer_id]
                    answer = None if task.cancelled() else task.result()  # (a channel closed under it)
                    if answer is None or answer == "busy":
                        exchange.failed(peer_id, self._now(), counts=answer is None)
                    elif answer is False:
                        exchange.forget(peer_id, self._now())  # it holds the version no more
                    else:
                        sender = self._view.member(peer_id)
                        if sender is not None and dict(sender.labels).get("site", "") == self.site:
                            grown = (answer - site_told).count() > 0
                            site_told = site_told | answer
                            if grown:  # the site holds a chunk none of its members had said before
                                self._site_made_progress(manifest, peer_id)
                        exchange.answered(peer_id, answer, self._now())
                for key, task in list(running.items()):
                    if task not in done:
                        continue
                    del running[key]
                    peer_id, index = key
                    reason = task.result()  # StoreError propagates: disk full fails the download
                    now = self._now()
                    if reason is None:
                        scheduler.completed(peer_id, index, now)
                        have.set(index)
                        progress.have_chunks += 1
                        progress.bytes_have += sizes[index]
                        self._set_holding(manifest, have.copy())
                        self._announce()
                    else:
                        scheduler.failed(peer_id, index, reason, now)
                handle_events()
            stats = scheduler.stats
            log.info("%s %s: %d requests, %d bytes downloaded, %d wasted, failures %s", manifest.name,
                     manifest.version, stats.requests, stats.downloaded_bytes, stats.wasted_bytes,
                     {k.value: v for k, v in stats.failures.items()})
        finally:
            self._download_wakes.discard(wake)
            for task in [*running.values(), *asking.values()]:
                task.cancel()
            await asyncio.gather(*running.values(), *asking.values(), return_exceptions=True)

    async def _ask_have(self, manifest: Manifest, peer_id: str,
                        address: str) -> Bitfield | Literal[False, "busy"] | None:
        """A partial holder's chunk list (GetHave): the bitfield; False if it holds the version no more;
        "busy" if it refused for this node's ask budget; None if the ask failed (both retried later)."""
        try:
            reply = await self._dial(address, peer_id).GetHave(
                pb.HaveRequest(name=manifest.name, version=manifest.version,
                               manifest_digest=bytes.fromhex(manifest.digest)),
                timeout=min(self.settings.request_timeout_s, HAVE_TIMEOUT_S))
            have = Bitfield.from_bytes(reply.chunk_count, reply.bitfield)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return False
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "busy"  # our asks (of every version) over its per-asker budget: not its fault
            log.debug("chunk list of %s from %s: %s", manifest.label, peer_id, exc.code().name)
            return None
        except (ConnectionError, BitfieldError) as exc:
            log.debug("chunk list of %s from %s: %s", manifest.label, peer_id, exc)
            return None
        if len(have) != len(manifest.chunks):
            log.warning("%s gave a chunk list of %d chunks for %s, which has %d; ignoring it", peer_id,
                        len(have), manifest.label, len(manifest.chunks))
            return None
        return have

    def _site_made_progress(self, manifest: Manifest, sender: str) -> None:
        """Sites mode: same-site members' chunk lists (GetHave) that together hold a chunk none held before
        are the site's progress on the version, which stepped gossip shows only an eighth at a time (a
        large model's eighth can take longer than `cross_fallback_s`): it holds off the cross-site
        fallback as the growth of the site's gossiped holdings does."""
        member = self._view.member(sender)
        ident = (manifest.name, manifest.version, manifest.digest)
        if self._crosses is None or member is None or dict(member.labels).get("site", "") != self.site:
            return
        if ident in self._site_progress:
            self._site_progress[ident] = (self._site_progress[ident][0], self._now())

    def _yields(self, key: VersionKey) -> bool:
        """Is `key` a low-priority download while another download runs here?"""
        background = self._background()
        return key in background and any(
            other != key and other not in background and not task.done()
            for other, task in self._tasks.items()
        )

    async def _fetch_chunk(self, manifest: Manifest, peer_id: str, address: str, index: int,
                           progress: Progress, *, from_origin: bool = False) -> FailureReason | None:
        """Fetch, verify and store one chunk; None on success, else why it failed.

        A StoreError (disk full, I/O) is not the peer's fault: it propagates and
        fails the whole download, leaving the store as it was.
        """
        ref = manifest.chunks[index]
        pieces: list[bytes] = []
        received = 0
        sender = self._view.member(peer_id)  # now: it may have left the view when the chunk ends
        other_site = sender is not None and dict(sender.labels).get("site", "") != self.site
        try:
            stub = self._dial(address, peer_id)
            async with asyncio.timeout(self.settings.request_timeout_s):
                call = stub.FetchChunk(pb.ChunkRequest(name=manifest.name, version=manifest.version,
                                                       index=index))
                async for piece in call:
                    received += len(piece.data)
                    if received > ref.size_bytes:
                        call.cancel()  # frees the peer's upload slot now; the short data fails verification
                        break
                    await self._download.pace(len(piece.data))
                    pieces.append(piece.data)
        except TimeoutError:
            return FailureReason.TIMEOUT
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            log.debug("chunk %d of %s from %s failed: %s", index, manifest.label, peer_id,
                      code.name if code else exc)
            details = (exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "") or ""
            return failure_of(code, details)
        finally:
            progress.bytes_downloaded += received
            progress.bytes_from[peer_id] = progress.bytes_from.get(peer_id, 0) + received
            if from_origin:
                self.counters.bytes_from_origin += received
            else:
                self.counters.bytes_from_peers += received
            if other_site:
                self.counters.bytes_from_other_sites += received
        data = b"".join(pieces)
        try:
            await asyncio.to_thread(self.store.put_manifest_chunk, manifest, index, data)
        except BadChunkError as exc:
            reason = "size_mismatch" if len(data) != ref.size_bytes else "hash_mismatch"
            self.counters.chunks_refused[reason] += 1
            self.counters.last_refusal[peer_id] = reason
            log.warning("peer %s served a bad chunk %d of %s (%s); banning it for %.0fs", peer_id, index,
                        manifest.label, exc, self.settings.ban_s)
            return FailureReason.BAD_CHUNK
        self.counters.chunks_verified += 1
        return None
