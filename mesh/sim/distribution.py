"""How a new version reaches every device of a two-level fleet: across sites, then inside each.

The fleet is `sites` sites of about `devices / sites` devices. A version
crosses a site boundary once: one device per site, its *fetcher* (the first
of the site's representatives by rendezvous hash of the version), takes part
in the federation swarm: the fetchers of all sites and the origin, every
fetcher in a site of its own. Once a site's fetcher holds the version, the
site's other devices fetch it from inside the site: a site swarm seeded by the
fetcher. A device never fetches from another site.

Two tiers, each run by one of two engines:

- `cores`: the real `SwarmScheduler` of every node, in the discrete-event swarm
  of `mesh.sim.swarm` (upload caps as token buckets, upload slots, refusals and
  back-off, LAN/WAN latency, chunk announcements in 50 ms batches). The
  federation tier runs it when it has at most `CORES_MAX_FETCHERS` fetchers;
  the site tier always fits (sites of 10^2-10^4 devices).
- `model`: a vectorised slot model of the same swarm (below), for federations
  of 10^3-10^4 fetchers, validated against the cores where both run
  (`validate`, `bench/sim.py`).

Sites are alike (the same size, give or take one device), so the site tier
runs `site_samples` sites (each a different seed) and every site takes the
figures of one of them (site j: sample j mod site_samples). A site swarm starts
when its fetcher holds the whole version (store and forward): the real node
lets site devices fetch chunks its fetcher already holds, so the time reported
is an upper bound by up to one federation completion time.

The slot model. Time moves in steps of a quarter chunk time (chunk bytes /
upload cap). At each step every node that is not backing off asks for up to
`max_in_flight_total` chunks it lacks and has not asked for, rarest first
(ties at random), each of a random node that holds it; a chunk nobody holds is
asked of the origin by one node (the rendezvous node, a fixed random one per
chunk), at most two origin requests per node at once. An uploader accepts a
request while fewer than `max_uploads` of its uploads are pending and sends
them one after the other at its cap (finish = max(free, now + latency) + chunk
time); a refused node backs off `busy_backoff_s`. A chunk counts as held once it
arrives (after the latency), and then it is on offer at once.

What neither engine models: CPU, loss (chunks travel over TCP streams; `--loss`
applies to gossip), restarts, bad peers (the swarm's own tests cover those),
and a site's devices fetching before their fetcher is complete (see above).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mesh.sim.membership import peak_rss_mb, site_sizes
from mesh.sim.swarm import SimResult, simulate, split_model
from mesh.sim.validation import ModelVsCores
from mesh.transfer.scheduler import SchedulerConfig

__all__ = [
    "CORES_MAX_FETCHERS",
    "DistributionResult",
    "DistributionScenario",
    "DistributionValidationRow",
    "TierResult",
    "run",
    "run_tier",
    "validate_distribution",
]

CORES_MAX_FETCHERS = 200
"""Largest federation the real schedulers run by default (about a minute of wall time)."""
CORES_MAX_SITE_DEVICES = 2000
HAVE_BATCH_S = 0.05
_STEPS_PER_CHUNK = 4


@dataclass(frozen=True)
class DistributionScenario:
    devices: int
    sites: int
    seed: int = 1
    model_size_bytes: int = 5_500_000  # the hand landmark model of the measurements
    chunk_bytes: int = 256 * 1024
    upload_cap_bytes_per_s: float = 1_000_000.0
    site_samples: int = 4
    lan_latency_s: float = 0.002
    wan_latency_s: float = 0.02

    def __post_init__(self) -> None:
        if self.devices < 2:
            raise ValueError(f"devices must be >= 2, not {self.devices}")
        if not 1 <= self.sites <= self.devices // 2:
            raise ValueError(f"sites must be between 1 and devices/2 ({self.devices // 2}), not {self.sites}")
        if self.site_samples < 1:
            raise ValueError(f"site_samples must be >= 1, not {self.site_samples}")

    @property
    def chunk_sizes(self) -> list[int]:
        return split_model(self.model_size_bytes, self.chunk_bytes)

    @property
    def lower_bound_s(self) -> float:
        """One upload link sending one copy: no distribution beats it."""
        return self.model_size_bytes / self.upload_cap_bytes_per_s


@dataclass
class TierResult:
    """One swarm: per node, seconds from its start until it held the version; bytes in copies."""

    engine: str
    completion_s: np.ndarray
    origin_copies: float
    cross_site_copies: float  # bytes that entered from outside the node's site, in copies, summed
    wall_s: float


@dataclass
class DistributionResult:
    scenario: DistributionScenario
    federation: TierResult
    site_tier: list[TierResult]
    device_done_s: np.ndarray  # every device, seconds from publication until it holds the version
    cross_site_copies_by_site: np.ndarray
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def engine(self) -> str:
        engines = {self.federation.engine, *(t.engine for t in self.site_tier)}
        return (
            engines.pop()
            if len(engines) == 1
            else f"federation {self.federation.engine}, sites {self.site_tier[0].engine}"
        )

    @property
    def seconds_all_hold(self) -> float:
        return float(self.device_done_s.max())

    @property
    def origin_copies(self) -> float:
        return self.federation.origin_copies + sum(t.origin_copies for t in self.site_tier)

    def curves(self, points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seconds, share of devices that hold it, share of site fetchers that hold it)."""
        end = self.seconds_all_hold
        t = np.linspace(0.0, end * 1.02, points)
        devices = np.searchsorted(np.sort(self.device_done_s), t, side="right") / self.device_done_s.size
        fed = np.sort(self.federation.completion_s)
        return t, devices, np.searchsorted(fed, t, side="right") / fed.size

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        by_site = self.cross_site_copies_by_site
        return {
            "devices": sc.devices,
            "sites": sc.sites,
            "seed": sc.seed,
            "distribution_engine": self.engine,
            "model_size_bytes": sc.model_size_bytes,
            "upload_cap_bytes_per_s": sc.upload_cap_bytes_per_s,
            "seconds_all_hold": round(self.seconds_all_hold, 2),
            "seconds_federation_all_hold": round(float(self.federation.completion_s.max()), 2),
            "seconds_site_tier": round(max(float(t.completion_s.max()) for t in self.site_tier), 2),
            "all_hold_over_lower_bound": round(self.seconds_all_hold / sc.lower_bound_s, 2),
            "origin_copies": round(self.origin_copies, 3),
            "cross_site_copies_per_site": round(float(by_site.mean()), 3),
            "cross_site_copies_max_site": round(float(by_site.max()), 3),
            "distribution_wall_s": round(self.wall_s, 2),
        }


# -- the cores ------------------------------------------------------------------------------------


def _cores_tier(sc: DistributionScenario, nodes: int, *, seeded: bool, seed: int) -> TierResult:
    """The real schedulers: the federation (every fetcher its own site, the origin seeds it) or one
    site (one site, its fetcher seeds it; the origin is there but nobody should ask it)."""
    started = time.perf_counter()
    sizes = sc.chunk_sizes
    if seeded:
        result = simulate(
            nodes,
            sizes,
            sc.upload_cap_bytes_per_s,
            seed,
            n_sites=1,
            initial_have={0: range(len(sizes))},
            lan_latency_s=sc.lan_latency_s,
            wan_latency_s=sc.wan_latency_s,
            have_batch_s=HAVE_BATCH_S,
        )
    else:
        result = simulate(
            nodes,
            sizes,
            sc.upload_cap_bytes_per_s,
            seed,
            n_sites=nodes,
            lan_latency_s=sc.lan_latency_s,
            wan_latency_s=sc.wan_latency_s,
            have_batch_s=HAVE_BATCH_S,
        )
    if not result.all_complete:
        raise RuntimeError(f"seed {seed}: {nodes}-node swarm did not complete: {result.summary()}")
    return TierResult(
        "cores",
        _completion(result, nodes),
        result.origin_egress_ratio,
        result.cross_site_bytes / sc.model_size_bytes,
        time.perf_counter() - started,
    )


def _completion(result: SimResult, nodes: int) -> np.ndarray:
    return np.array([result.completion_s[f"n{i:02d}"] for i in range(nodes)])


# -- the model ------------------------------------------------------------------------------------


def _model_tier(
    sc: DistributionScenario,
    nodes: int,
    *,
    seeded: bool,
    seed: int,
    config: SchedulerConfig | None = None,
    max_uploads: int = 4,
) -> TierResult:
    """The slot model of one swarm (see the module docstring)."""
    started = time.perf_counter()
    config = config or SchedulerConfig()
    rng = np.random.default_rng([seed, nodes, 11])
    sizes = np.array(sc.chunk_sizes, dtype=np.float64)
    chunks = sizes.size
    chunk_s = sizes / sc.upload_cap_bytes_per_s
    latency_s = sc.lan_latency_s if seeded else sc.wan_latency_s
    step_s = float(chunk_s.max()) / _STEPS_PER_CHUNK
    have = np.zeros((nodes, chunks), dtype=bool)
    asked = np.zeros((nodes, chunks), dtype=bool)
    if seeded:
        have[0] = True
    done_at = np.full(nodes, np.inf)
    done_at[have.all(axis=1)] = 0.0
    in_flight = np.zeros(nodes, dtype=np.int64)
    origin_in_flight = np.zeros(nodes, dtype=np.int64)
    backoff_until = np.zeros(nodes)
    free_at = np.zeros(nodes + 1)  # when each uploader (the origin last) finishes its queue
    pending = np.zeros(nodes + 1, dtype=np.int64)
    rendezvous = rng.integers(0, nodes, chunks)
    # Transfers under way: arrays of (arrive_at, client, chunk, server).
    arrive = np.empty(0)
    client_of = np.empty(0, dtype=np.int64)
    chunk_of = np.empty(0, dtype=np.int64)
    server_of = np.empty(0, dtype=np.int64)
    origin_bytes = moved_bytes = 0.0
    now, steps, give_up = 0.0, 0, 100_000
    while not np.isfinite(done_at).all():
        steps += 1
        if steps > give_up:
            raise RuntimeError(f"seed {seed}: the slot model did not complete")
        now = steps * step_s
        # Arrivals and finished uploads.
        landed = arrive <= now
        if landed.any():
            c, k, s = client_of[landed], chunk_of[landed], server_of[landed]
            have[c, k] = True
            np.subtract.at(in_flight, c, 1)
            np.subtract.at(pending, s, 1)
            from_origin = s == nodes
            np.subtract.at(origin_in_flight, c[from_origin], 1)
            newly = np.unique(c)
            finished = newly[have[newly].all(axis=1) & ~np.isfinite(done_at[newly])]
            for node in finished:
                done_at[node] = arrive[landed][c == node].max()
            keep = ~landed
            arrive, client_of, chunk_of, server_of = (
                arrive[keep],
                client_of[keep],
                chunk_of[keep],
                server_of[keep],
            )
        avail = have.sum(axis=0)
        active = np.flatnonzero(
            ~np.isfinite(done_at) & (backoff_until <= now) & (in_flight < config.max_in_flight_total)
        )
        if not active.size:
            continue
        wanted = ~have[active] & ~asked[active]
        # Rarest first among chunks a peer holds; ties at random.
        score = np.where(wanted & (avail > 0), avail + rng.random((active.size, chunks)), np.inf)
        order = np.argsort(score, axis=1)
        room = config.max_in_flight_total - in_flight[active]
        req_client, req_chunk = [], []
        for rank in range(min(chunks, config.max_in_flight_total)):
            pick = order[:, rank]
            ok = np.isfinite(score[np.arange(active.size), pick]) & (room > rank)
            req_client.append(active[ok])
            req_chunk.append(pick[ok])
        clients = np.concatenate(req_client)
        wanted_chunks = np.concatenate(req_chunk)
        servers = np.empty(clients.size, dtype=np.int64)
        for k in np.unique(wanted_chunks):
            mine = wanted_chunks == k
            holders = np.flatnonzero(have[:, k])
            servers[mine] = holders[rng.integers(0, holders.size, int(mine.sum()))]
        # Chunks nobody holds or fetches: the rendezvous node asks the origin.
        if not seeded:
            unheld = np.flatnonzero((avail == 0) & ~asked.any(axis=0))
            asker = rendezvous[unheld]
            ok = (origin_in_flight[asker] < config.max_in_flight_origin) & ~np.isfinite(done_at[asker])
            unheld, asker = unheld[ok], asker[ok]
            # One origin request per node per step keeps the two-at-once cap exact.
            _, first = np.unique(asker, return_index=True)
            unheld, asker = unheld[first], asker[first]
            clients = np.concatenate((clients, asker))
            wanted_chunks = np.concatenate((wanted_chunks, unheld))
            servers = np.concatenate((servers, np.full(asker.size, nodes)))
        if not clients.size:
            continue
        # Each uploader takes requests in random order while it has a free upload slot.
        shuffle = rng.permutation(clients.size)
        clients, wanted_chunks, servers = clients[shuffle], wanted_chunks[shuffle], servers[shuffle]
        by_server = np.argsort(servers, kind="stable")
        s_sorted = servers[by_server]
        starts = np.searchsorted(s_sorted, s_sorted, side="left")
        position = np.arange(s_sorted.size) - starts
        accepted = np.zeros(clients.size, dtype=bool)
        accepted[by_server] = pending[s_sorted] + position < max_uploads
        refused_clients = np.setdiff1d(clients[~accepted], clients[accepted])
        backoff_until[refused_clients] = now + config.busy_backoff_s
        c, k, s = clients[accepted], wanted_chunks[accepted], servers[accepted]
        if not s.size:
            continue
        order_s = np.lexsort((np.arange(s.size), s))
        c, k, s = c[order_s], k[order_s], s[order_s]
        # Uploads of one server go out one after the other at its cap.
        first = np.r_[True, s[1:] != s[:-1]]
        group = np.cumsum(first) - 1
        durations = chunk_s[k]
        group_start = np.maximum(free_at[s[first]], now + latency_s)
        cumulative = np.cumsum(durations)
        before_group = (cumulative - durations)[first]
        finish = group_start[group] + cumulative - before_group[group]
        free_at[s[first]] = finish[np.r_[first[1:], True]]
        np.add.at(pending, s, 1)
        np.add.at(in_flight, c, 1)
        np.add.at(origin_in_flight, c[s == nodes], 1)
        asked[c, k] = True
        origin_bytes += float(sizes[k[s == nodes]].sum())
        moved_bytes += float(sizes[k].sum())
        arrive = np.concatenate((arrive, finish + latency_s))
        client_of = np.concatenate((client_of, c))
        chunk_of = np.concatenate((chunk_of, k))
        server_of = np.concatenate((server_of, s))
    model_bytes = float(sizes.sum())
    # The federation puts every fetcher in a site of its own, so all its bytes cross a boundary;
    # inside a site only the origin's do.
    cross = origin_bytes if seeded else moved_bytes
    return TierResult(
        "model", done_at, origin_bytes / model_bytes, cross / model_bytes, time.perf_counter() - started
    )


def run_tier(sc: DistributionScenario, nodes: int, *, seeded: bool, seed: int, engine: str) -> TierResult:
    if engine == "cores":
        return _cores_tier(sc, nodes, seeded=seeded, seed=seed)
    if engine == "model":
        return _model_tier(sc, nodes, seeded=seeded, seed=seed)
    raise ValueError(f"engine must be cores or model, not {engine!r}")


# -- both tiers -----------------------------------------------------------------------------------


def _tier_engines(sc: DistributionScenario, engine: str) -> tuple[str, str]:
    if engine == "auto":
        site = max(site_sizes(sc.devices, sc.sites))
        return (
            "cores" if sc.sites <= CORES_MAX_FETCHERS else "model",
            "cores" if site <= CORES_MAX_SITE_DEVICES else "model",
        )
    if engine in ("cores", "model"):
        return engine, engine
    raise ValueError(f"engine must be auto, cores or model, not {engine!r}")


def run(sc: DistributionScenario, engine: str = "auto") -> DistributionResult:
    """Both tiers for the scenario (see the module docstring)."""
    started = time.perf_counter()
    fed_engine, site_engine = _tier_engines(sc, engine)
    sizes = np.array(site_sizes(sc.devices, sc.sites))
    # A fleet of one site has no federation: its one fetcher is the origin's only client.
    federation = run_tier(sc, sc.sites, seeded=False, seed=sc.seed, engine=fed_engine)
    samples = min(sc.site_samples, sc.sites)
    largest = int(sizes.max())
    site_tier = [
        run_tier(sc, largest, seeded=True, seed=sc.seed * 1000 + i + 1, engine=site_engine)
        for i in range(samples)
    ]
    done = np.empty(sc.devices)
    at = 0
    fed_done = federation.completion_s
    for j, size in enumerate(sizes):
        times = site_tier[j % samples].completion_s
        done[at] = fed_done[j]  # the fetcher
        done[at + 1 : at + size] = fed_done[j] + times[1:size]
        at += size
    # Bytes into each site from outside: its fetcher's share of the federation's cross-site bytes
    # (every fetcher is a site of its own there) plus what its site swarm took from the origin.
    per_fetcher = federation.cross_site_copies / sc.sites
    by_site = np.full(sc.sites, per_fetcher)
    for j in range(sc.sites):
        by_site[j] += site_tier[j % samples].cross_site_copies
    return DistributionResult(
        sc,
        federation,
        site_tier,
        done,
        by_site,
        wall_s=time.perf_counter() - started,
        peak_rss_mb=peak_rss_mb(),
    )


# -- validation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributionValidationRow(ModelVsCores):
    devices: int
    sites: int
    cores: dict[str, float] = field(default_factory=dict)
    model: dict[str, float] = field(default_factory=dict)

    FIGURES = ("seconds_all_hold", "origin_copies", "cross_site_copies_per_site")

    def to_json(self) -> dict[str, Any]:
        out = self.figures_json(3)
        out["cores_wall_s"] = round(self.cores["wall_s"], 1)
        out["model_wall_s"] = round(self.model["wall_s"], 1)
        return out


def validate_distribution(
    devices: int,
    sites: int,
    seeds: list[int],
    *,
    site_samples: int = 2,
    progress: Callable[[str], None] | None = None,
) -> DistributionValidationRow:
    """Cores and model on the same scenarios: mean over seeds of each figure."""
    figures: dict[str, dict[str, list[float]]] = {"cores": {}, "model": {}}
    for seed in seeds:
        sc = DistributionScenario(devices, sites, seed=seed, site_samples=site_samples)
        for engine in ("cores", "model"):
            if progress:
                progress(f"distribution: {devices} devices, {sites} sites, seed {seed}: {engine}")
            data = run(sc, engine)
            js = data.to_json()
            for f in (*DistributionValidationRow.FIGURES, "wall_s"):
                value = data.wall_s if f == "wall_s" else float(js[f])
                figures[engine].setdefault(f, []).append(value)
    mean = {e: {f: statistics.mean(v) for f, v in d.items()} for e, d in figures.items()}
    return DistributionValidationRow(devices, sites, mean["cores"], mean["model"])
