"""Sites mode (`[membership] pools = "sites"`): the site pool, the federation pool, and the
view that joins them for the node's shells.

Each site gossips in its own pool (a `site_only` SWIM core: a device's table holds its site
only). A few members of each site, its representatives (`choose_representatives`, sticky),
also run a second core in the federation pool, as Consul's servers join the WAN pool; it
carries the representatives' own metadata (what they hold, revocations, rollout notes), so
a version, a revocation or a rollout plan crosses a site boundary through them and spreads
inside the site from them. A device never holds another site's member list: a representative
sees its site plus the other sites' representatives, any other device its site only.

Representatives say so in their site metadata (`FEDERATION_SECTION`), so that every member
of the site computes the choice from the same `current` set and the site agrees on it once
its views agree.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence

from mesh.membership.config import FEDERATION_POOL, MembershipConfig
from mesh.membership.core import Membership
from mesh.membership.federation import choose_representatives, fetcher, site_of
from mesh.membership.messages import EventKind, Labels, MemberEvent, MemberView, State
from mesh.membership.sections import MetaError, read_section
from mesh.membership.service import Dial, MembershipServicer, SwimRunner
from mesh.membership.view import CoreView, MemberEventHandler, MetadataBoard

__all__ = ["FEDERATION_SECTION", "ROLLOUTS_CAPABLE_SECTION", "FederationMember", "MirroredBoard", "PoolsView"]

log = logging.getLogger("mesh.federation")

FEDERATION_SECTION = "fed"
"""Metadata section a representative sets (when its term began, ms) in its site pool."""
ROLLOUTS_CAPABLE_SECTION = "fedr"
"""Metadata section a node that runs its site's rollouts (it has `[raft]`) sets (b"1") in its site pool:
the site prefers such members as representatives, since a site leader asks its representatives for the
fleet views its rollouts need."""

_LIVE = (State.ALIVE, State.SUSPECT)
_EARLIEST_TENURE_MS = 1_577_836_800_000  # 2020-01-01

# How often a representative retries joining other sites and this site's unmet representatives: the
# push-pull interval, but at most this (Consul's `retry_interval`); the WAN push-pull interval is 60 s.
RETRY_S = 30.0


def retry_interval_s(config: MembershipConfig) -> float:
    """Seconds between joins of the federation pool retried through the same address."""
    return min(config.push_pull_interval_s, RETRY_S)


def _plausible(tenure_ms: int) -> bool:
    """A term that began before 2020 or more than an hour from now is a wrong clock or a lie (a claim of
    the longest term would keep the role for good): such a representative is not advertised, by the
    site or by itself, so both compute the same fetchers."""
    return _EARLIEST_TENURE_MS <= tenure_ms <= time.time_ns() // 1_000_000 + 3_600_000


class MirroredBoard:
    """This node's metadata, published in its site pool and, while it is a representative,
    in the federation pool too (the same bytes)."""

    def __init__(self, site: CoreView) -> None:
        self._site = site
        self._federation: CoreView | None = None
        self._meta = b""

    @property
    def meta_limit_bytes(self) -> int:
        return self._site.meta_limit_bytes

    def set_meta(self, meta: bytes) -> None:
        self._site.set_meta(meta)
        self._meta = bytes(meta)
        if self._federation is not None:
            self._federation.set_meta(meta)

    def attach(self, federation: CoreView | None) -> None:
        self._federation = federation
        if federation is not None and self._meta:
            federation.set_meta(self._meta)


class PoolsView:
    """What the shells see in sites mode: the site pool, plus, on a representative, the other
    sites' members of the federation pool (its own site's come from the site pool only)."""

    def __init__(self, site_view: CoreView, site: str,
                 federation: Callable[[], CoreView | None]) -> None:
        self._site_view = site_view
        self._site = site
        self._federation = federation

    def _foreign(self) -> list[MemberView]:
        fed = self._federation()
        if fed is None:
            return []
        return [m for m in fed.members() if site_of(m.labels) != self._site]

    @property
    def node_id(self) -> str:
        return self._site_view.node_id

    def members(self) -> list[MemberView]:
        return self._site_view.members() + self._foreign()

    def member(self, node_id: str) -> MemberView | None:
        found = self._site_view.member(node_id)
        if found is not None:
            return found
        fed = self._federation()
        member = fed.member(node_id) if fed is not None else None
        return member if member is not None and site_of(member.labels) != self._site else None

    def live_count(self) -> int:
        return self._site_view.live_count() + sum(m.state in _LIVE for m in self._foreign())

    def dissemination_s(self) -> float:
        """News from another site crosses the federation pool, then this site's pool."""
        fed = self._federation()
        return self._site_view.dissemination_s() + (fed.dissemination_s() if fed is not None else 0.0)


class FederationMember:
    """Keeps this node in the federation pool while its site chooses it as a representative.

    `on_member_events` (a site-pool handler) re-checks the choice: a node that becomes a
    representative starts a federation core, serves it on the node's Membership service and
    joins through `seeds` (other sites' nodes, from the config), its own site's other
    representatives, and whatever members of the pool a non-representative named when a join
    reached it; one that stops being one leaves the pool.

    Representatives advertise when their role began (`FEDERATION_SECTION`), so the whole site
    computes the choice from the same `current` set ordered by tenure, and the fetcher of a
    version (`crosses`) from the same advertised set, whatever each node's `representatives`.
    """

    def __init__(self, *, node_id: str, address: str, labels: Labels, site: str,
                 site_view: CoreView, config: MembershipConfig, representatives: int,
                 seeds: Sequence[str], servicer: MembershipServicer, dial: Dial,
                 board: MirroredBoard, rep_board: MetadataBoard,
                 on_events: MemberEventHandler, rng: random.Random,
                 revoked: Callable[[str], bool] = lambda node_id: False,
                 runs_rollouts: bool = False, capable_board: MetadataBoard | None = None) -> None:
        self.node_id = node_id
        self._address = address
        self._labels = labels
        self._site = site
        self._site_view = site_view
        self._config = config
        self._k = representatives
        self._seeds = list(seeds)
        self._learned: dict[str, None] = {}  # addresses non-representatives named (most recent last)
        self._servicer = servicer
        self._dial = dial
        self._board = board
        self._rep_board = rep_board
        self._on_events = on_events
        self._rng = rng
        self._revoked = revoked
        if runs_rollouts and capable_board is None:
            raise ValueError("a node that runs its site's rollouts needs capable_board to say so to its site")
        self._runs_rollouts = runs_rollouts
        if runs_rollouts and capable_board is not None:
            capable_board.set_meta(b"1")  # constant for the node's life: set once, gossiped with the rest
        self._runner: SwimRunner | None = None
        self._view: CoreView | None = None
        self._since_ms = 0  # when this node's current term as representative began
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False
        self._ready = False  # no choice before this node has heard from its site (see `start`)
        # Site members: node id -> (incarnation, meta_version, advertised tenure or None, runs rollouts).
        self._flags: dict[str, tuple[int, int, int | None, bool]] = {}
        self._rejoined_at: dict[str, float] = {}
        self._incarnation = 0  # this node's incarnation in its site pool, last seen
        self.representatives: tuple[str, ...] = ()
        self.changes = 0  # times this node joined or left the federation pool
        # Bytes the federation runners this node ran before its current one sent (bench figures).
        self.retired_bytes_out = 0
        self.retired_push_pull_bytes_out = 0

    # -- what the node reads ---------------------------------------------------

    @property
    def active(self) -> bool:
        return self._runner is not None

    @property
    def runner(self) -> SwimRunner | None:
        return self._runner

    def view(self) -> CoreView | None:
        return self._view

    def advertised(self) -> dict[str, int]:
        """Live members of the site that say they represent it, with when their term began (ms);
        this node too while it is one."""
        out = {node_id: tenure or 0 for node_id, (_, _, tenure, _) in self._flags.items()
               if tenure is not None and node_id != self.node_id}
        if self.active and _plausible(self._since_ms):  # as the rest of the site reads our flag
            out[self.node_id] = self._since_ms
        return out

    def crosses(self, name: str, version: str) -> bool:
        """Whether this node fetches `name` `version` from other sites: it is a representative and
        the site's fetcher for that version (`fetcher` over the advertised representatives, which
        every member of the site sees alike); the site's others fetch it inside the site."""
        return self.active and fetcher(self.advertised(), name, version) == self.node_id

    def redirect(self, pool: str) -> list[str]:
        """For the Membership service: a federation join reached this node, which is not in that pool:
        the addresses of its site's representatives."""
        if pool != FEDERATION_POOL:
            return []
        reps = self.advertised()
        return [m.address for m in self._site_view.members() if m.node_id in reps and m.state in _LIVE]

    # -- the choice --------------------------------------------------------------

    def preferred(self) -> set[str]:
        """Live members of the site that run its rollouts (this node too if it does)."""
        out = {node_id for node_id, (_, _, _, capable) in self._flags.items() if capable}
        if self._runs_rollouts:
            out.add(self.node_id)
        return out

    def _refresh_flags(self) -> bool:
        """Re-read the representative and rollouts flags of site members whose metadata changed; True if
        any flag changed (metadata updates are frequent during a release: only changed members are
        decoded)."""
        changed = False
        seen = set()
        for member in self._site_view.members():
            if member.node_id == self.node_id:
                continue
            seen.add(member.node_id)
            held = self._flags.get(member.node_id)
            live = member.state in _LIVE
            if held is not None and held[:2] == (member.incarnation, member.meta_version) and live:
                continue
            tenure: int | None = None
            capable = False
            if live:
                try:
                    raw = read_section(member.meta, FEDERATION_SECTION)
                    tenure = int(raw) if raw and raw.isdigit() and len(raw) <= 20 else None
                    capable = read_section(member.meta, ROLLOUTS_CAPABLE_SECTION) == b"1"
                except MetaError:
                    tenure, capable = None, False
                if tenure is not None and not _plausible(tenure):
                    tenure = None
            changed |= held is None or held[2:] != (tenure, capable)
            self._flags[member.node_id] = (member.incarnation, member.meta_version, tenure, capable)
        for gone in set(self._flags) - seen:
            _, _, tenure, capable = self._flags.pop(gone)
            changed |= tenure is not None or capable
        return changed

    def on_member_events(self, events: Sequence[MemberEvent] = ()) -> None:
        """Site-pool handler (it must not raise: it runs inside the site's SWIM loop)."""
        try:
            self._recheck(events)
        except Exception:  # a bug here must not stop the site's gossip
            log.exception("federation: re-checking the representatives of site %s failed", self._site)

    def _recheck(self, events: Sequence[MemberEvent]) -> None:
        if self._stopped:
            return
        if not self._ready:
            if not any(m.node_id != self.node_id for m in self._site_view.members()):
                return
            self._ready = True
        me = self._site_view.member(self.node_id)
        incarnation = me.incarnation if me is not None else 0
        if self.active and incarnation > self._incarnation:
            # This node refuted a suspicion or death: the site may have replaced it meanwhile, and a
            # node back from a false death must not evict its replacement, so its term starts now.
            self._since_ms = time.time_ns() // 1_000_000
            self._rep_board.set_meta(str(self._since_ms).encode())
        self._incarnation = incarnation
        flags_changed = self._refresh_flags()
        if events and not flags_changed and all(e.kind is EventKind.META for e in events):
            return  # holdings and health updates: nothing that moves the choice
        current = self.advertised()
        chosen = choose_representatives(self._site_view.members(), self._site, current, self._k,
                                        tenure=current, preferred=self.preferred())
        if chosen != self.representatives:
            log.info("site %s representatives: %s", self._site, ", ".join(chosen) or "none")
            self.representatives = chosen
        if self.node_id in chosen and not self.active:
            self._join()
        elif self.node_id not in chosen and self.active:
            self._retire()
        elif self.active:
            # This site's other representatives that our federation core has not met: join through them
            # (each side may have started its federation core before it knew the other).
            unmet = [m.address for m in self._site_view.members()
                     if m.node_id in current and m.node_id != self.node_id
                     and self._runner is not None and self._runner.core.member(m.node_id) is None]
            self._rejoin(unmet)

    @property
    def retry_s(self) -> float:
        return retry_interval_s(self._config)

    def _rejoin(self, addresses: list[str]) -> None:
        """Push-pull with `addresses`, each at most twice per `retry_s` (half of it apart: a join made
        between two of `_find_other_sites`'s rounds must not make it skip the next one)."""
        runner = self._runner
        if runner is None:
            return
        now = runner.now()
        every = self.retry_s
        due = [a for a in addresses if now - self._rejoined_at.get(a, -math.inf) >= every / 2]
        if due:
            for address in due:
                self._rejoined_at[address] = now
            self._rejoined_at = {a: t for a, t in self._rejoined_at.items() if now - t < 2 * every}
            runner.rejoin(due)

    def _redirected(self, addresses: list[str]) -> None:
        """A join reached a node of another site that is not a representative; it named its site's."""
        for address in addresses:
            if address != self._address:
                self._learned.pop(address, None)
                self._learned[address] = None
        while len(self._learned) > 32:
            self._learned.pop(next(iter(self._learned)))
        self._rejoin([a for a in addresses if a != self._address])

    # -- joining and leaving -----------------------------------------------------

    def _join(self) -> None:
        loop = asyncio.get_running_loop()
        core = Membership(self.node_id, self._address, self._labels, self._config, self._rng, loop.time(),
                          meta_version=time.time_ns() // 1_000_000)
        view = CoreView(core, revoked=self._revoked)

        def federation_events(events: list[MemberEvent]) -> None:
            # Other sites' members only: this site's are the site pool's business.
            foreign = [e for e in events
                       if (m := core.member(e.node_id)) is not None and site_of(m.labels) != self._site]
            if foreign:
                self._on_events(foreign)

        runner = SwimRunner(core, self._dial, on_events=federation_events, on_redirect=self._redirected)
        self._runner, self._view = runner, view
        self._since_ms = time.time_ns() // 1_000_000
        self._board.attach(view)
        self._servicer.serve(FEDERATION_POOL, runner)
        # Seeds: the configured ones (other sites), and this site's other representatives.
        mine = {m.node_id: m.address for m in self._site_view.members()}
        seeds = [a for a in self._seeds if a != self._address]
        seeds += [mine[r] for r in self.advertised() if r != self.node_id and r in mine]
        seeds = list(dict.fromkeys(seeds))
        runner.start(seeds)
        self._spawn(self._find_other_sites(runner))
        self._rep_board.set_meta(str(self._since_ms).encode())
        self.changes += 1
        log.info("node %s joined the federation pool for site %s (seeds: %s)", self.node_id, self._site,
                 ", ".join(seeds) or "none: it waits to be found")
        self._on_events([])

    def _retire(self) -> None:
        """Stop being a representative now (the choice moved); tell the pool in the background."""
        runner = self._runner
        if runner is None:
            return
        self._runner, self._view = None, None
        self._board.attach(None)
        self._rep_board.set_meta(b"")
        self._servicer.unserve(FEDERATION_POOL)
        self.retired_bytes_out += runner.counters.bytes_out
        self.retired_push_pull_bytes_out += runner.counters.push_pull_bytes_out
        self.changes += 1
        log.info("node %s left the federation pool (no longer a representative of site %s)",
                 self.node_id, self._site)
        self._spawn(self._leave(runner))
        self._on_events([])

    @staticmethod
    async def _leave(runner: SwimRunner, timeout_s: float = 2.0) -> None:
        try:
            await runner.leave(timeout_s)
        except TimeoutError:
            pass
        finally:
            await runner.stop()

    async def _find_other_sites(self, runner: SwimRunner) -> None:
        """While this federation member knows no live member of another site, ask the configured seeds
        (and the representatives non-representatives named) again every `retry_s`: SWIM
        retries its seeds only while it knows nobody, and this site's other representatives count."""
        warned = False
        while self._runner is runner:
            await asyncio.sleep(self.retry_s)
            if self._runner is not runner:
                return
            view = self._view
            if view is not None and any(site_of(m.labels) != self._site and m.state in _LIVE
                                        for m in view.members()):
                warned = False
                continue
            seeds = [a for a in self._seeds if a != self._address] + list(self._learned)
            seeds = list(dict.fromkeys(seeds))
            if not seeds:
                if not warned:
                    log.warning("federation pool: this site's representatives know no other site and have "
                                "no [membership] federation_seeds: other sites find it only if they list it")
                    warned = True
                continue
            if not warned:
                log.warning("federation pool: no representative of another site answers yet; asking %s again "
                            "every %.0f s (check [membership] federation_seeds: nodes of other sites)",
                            ", ".join(seeds), self.retry_s)
                warned = True
            self._rejoin(seeds)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro, name=f"federation-{self.node_id}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("federation task %s failed", task.get_name(), exc_info=task.exception())

    def start(self, has_seeds: bool, wait_s: float) -> None:
        """Choose at once if this node has no site seeds (the first of its site); otherwise once it has
        heard from its site, or after `wait_s` if it hears nothing. A node that chose before learning
        its site would see itself alone, call itself a representative and, being advertised, could
        displace one of the site's live representatives."""
        if not has_seeds:
            self._ready = True
            self.on_member_events()
            return

        async def fallback() -> None:
            await asyncio.sleep(wait_s)
            if not self._ready:
                log.warning("node %s heard nothing from its site in %.0f s; choosing representatives "
                            "from what it knows", self.node_id, wait_s)
                self._ready = True
                self.on_member_events()

        self._spawn(fallback())

    async def stop(self, leave: bool = True) -> None:
        """Leave the federation pool (told to its members when `leave`) and stop its runner."""
        self._stopped = True
        runner, self._runner, self._view = self._runner, None, None  # ends the seed watcher
        if runner is not None:
            self._servicer.unserve(FEDERATION_POOL)
            self._board.attach(None)
        for task in list(self._tasks):  # a leave in flight still stops its runner (its `finally`)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if runner is not None:
            if leave:
                await self._leave(runner)
            else:
                await runner.stop()
