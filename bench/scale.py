"""Scale benchmark: gossip load per node as the fleet grows, and false suspicions with a third
of the fleet slow, Lifeguard on vs off (issue 10, "What it must show").

Real nodes (grpc.aio over loopback with mTLS, the SWIM runner, the distributor), so it fits
this 2-core machine; byte counts do not depend on the CPU's speed.

1. Gossip load, N = 10, 20, 40, 60, 80 (in one process, one size after another, up to the
   first size whose view does not converge on this machine):
   membership bytes sent per node per second (every membership RPC payload a node sends:
   requests and replies, `SwimRunner.counters.bytes_out`, exported as
   `fleetmesh_gossip_bytes{direction="out"}`), in steady state over one push-pull interval,
   and during a release: the origin publishes a model (hand_landmark_full, 5.5 MB) and every
   node fetches it (1 MB/s upload cap per node), measured from the publish until the last
   node holds it. Between sizes, the growth exponent: the slope of log(bytes) over log(N);
   0 is flat, 1 grows as N. Goal of issue 10: flat within +-20%. Today chunk holdings ride in
   every member's gossip metadata, so each chunk a node stores is an update broadcast to the
   whole fleet (O(N x chunks) updates per node per release). The piggyback budget
   (`max_gossip_bytes` per message) caps what a node can send per second, so near that
   ceiling the rate flattens while updates are dropped or coalesced instead: the bench prints
   the ceiling beside the figures, and the gossip bytes per node for the whole release.
   Push-pull (pages of the member list, which grow with N by design and run less often as N
   grows) is included in the totals and printed apart.

   Both pool layouts run side by side, size after size (`--pools both`, the default): `flat`
   (one pool, 3 site labels) and `sites` (`[membership] pools = "sites"`: N // `--site-size`
   sites of 10, each its own pool, 3 representatives each in the federation pool, one fetcher
   per site for the release). The JSON line's unsuffixed figures are the sites mode's (the
   architecture meant to stay flat); `*_flat` are the flat pool's. With `--holdings both`,
   `*_live` are those of live holdings (`stepped_holdings = false`) and `*_flat_live` both; a
   ratio over a zero figure prints the two figures instead.

2. False suspicions with a third of the nodes slow: two clusters of 30 side by side, one
   with Lifeguard and one without, in two processes: every third node of both clusters lives
   in a "slow" process whose event loop is blocked 600 ms of every second (time.sleep on the
   loop: its nodes miss timers and messages alike, as a device whose CPU is taken by
   inference), the others in a healthy process. Both clusters get exactly the same stalls.
   A stall must outlast the probe interval (0.5 s: direct probe plus indirect probes) to fail
   a probe cycle: with 300 ms of each second neither cluster saw any suspicion (measured).
   A false suspicion is a SUSPECT or DEAD event, at any observer, about a node that is
   running (no node fails in this run), counted per node-hour. Goal of issue 10: >= 10x
   fewer with Lifeguard. The bench also says who accuses whom (probes failed by slow vs
   healthy nodes, suspicions about slow vs healthy members, false DEADs).

Measured on this 2-core machine, both layouts (`--sizes 10 20 40`, 7.3 min, 2026-12-07):

- sites (sites of 10, 3 representatives each): steady 227, 238, 264 B/s/node (exponent
  +0.11, goal |x| <= 0.13 over x4), gossip per node per release 174, 194, 190 KB (+0.06);
  flat: steady 169, 273, 277 (+0.36), per release 153, 184, 229 KB (+0.29). Per-second
  release rates fall with N in both (-0.61, -0.43): the one process is CPU-bound at N = 40
  (flat already at 20: more suspicions than members), so releases take longer. Lifeguard
  x2.42 (6,584 vs 15,903 false suspicions per node-hour; false DEAD 1,160 vs 6,523).

Measured before sites mode existed (full run, 8 min):

- Gossip: steady SWIM load (probes, acks, gossip) is flat, 62 B/s/node at N = 10..60
  (exponent 0.00, no suspicion in any steady window); push-pull pages grow with N (the
  interval doubles above 32 members, hence the step), so total steady load grows (168, 273,
  276, 386 B/s/node; exponent ~0.4). During a release of hand_landmark_full (18 chunks),
  gossip bytes per node per release grow from 155 KB to 270-310 KB from N = 10 to 20
  (exponent 0.8-1.0: every stored chunk is a metadata update for the whole fleet), 90x the
  steady rate (15-23 KB/s/node). From N = 40 the one process cannot move 40 x 1 MB/s over
  mTLS and keep every node's timers: suspicions appear, the release is CPU-bound and
  per-second figures fall with N, so the release exponent over all sizes is not a protocol
  figure (the bench flags those sizes). N = 80 does not converge in one process here.
- Lifeguard, quiet machine: x0.96 and x1.36 in two runs (6,237 vs 6,468 and 7,316 vs 5,378
  per node-hour), no false DEAD either way. Every false suspicion was a healthy prober
  suspecting a stalled node that really gave no answer in a whole probe cycle; the stalled
  nodes accused no one (their acks arrive on time through gRPC's C core and are read as the
  loop resumes), so Lifeguard's local health multiplier (which slows an accuser that is
  itself late) has nothing to act on, early notice only speeds a refutation the suspect
  sends anyway within the plain timeout, and the confirmation-scaled timeout only delays
  DEAD, which did not happen. Lifeguard does not try to stop healthy members suspecting a
  member that does not answer (the simulator, tests/membership/test_slow_nodes.py, finds
  1.1-1.4x for blocked loops too).
- Lifeguard, machine loaded by other work (load average 10-15): x2.1 per node-hour; about
  healthy members 8,543 vs 2,914 (x2.9) and false DEADs 5,241 vs 950 (x5.5): there the
  healthy nodes' loops were late too and accused each other, which is what Lifeguard is for.
  The paper's large factors count members declared failed; this bench counts every SUSPECT.
The ratio is reported as measured; the bench is not tuned to reach 10x.

It prints the tables and ratios; its last line is one JSON object.

    python bench/scale.py                     # N = 10 20 40 60 80 (while they fit); 2 x 30 nodes, 120 s
    python bench/scale.py --quick             # smoke test: small sizes, a small model (< 60 s)
    python bench/scale.py --sizes 10 20 --lifeguard-nodes 15 --lifeguard-duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

# gRPC's C core logs every refused connection; keep the tables readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mesh.artifacts.publish import publish
from mesh.identity.ca import Credentials, load_credentials
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.membership.config import MembershipConfig
from mesh.membership.core import push_pull_interval_s
from mesh.membership.messages import EventKind, State
from mesh.node.config import NodeConfig, TransferSection
from mesh.node.local import SITES, LocalCluster, LocalFleet, wait_for

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.models import mediapipe_model  # noqa: E402

# LAN-default structure at twice the speed, as bench/membership.py and bench/distribution.py.
BENCH_TIMINGS = MembershipConfig(probe_interval_s=0.5, probe_timeout_s=0.25, gossip_interval_s=0.1,
                                 push_pull_interval_s=10.0)
ACCUSATIONS = (EventKind.SUSPECT, EventKind.DEAD)


class GrpcErrorLogs(logging.Handler):
    """Counts ERROR records from gRPC's own loggers (the ExecuteBatchError tracebacks of issue 10)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("grpc"):
            self.count += 1
            if self.first is None:
                self.first = record.getMessage()[:200]


def count_grpc_errors() -> GrpcErrorLogs:
    handler = GrpcErrorLogs()
    logging.getLogger().addHandler(handler)
    return handler


# -- 1. gossip load ---------------------------------------------------------------------------

class ReleaseCluster(LocalCluster):
    """Every node with the same upload cap, as bench/distribution.py's swarm."""

    def __init__(self, *args, upload_cap: int, stepped: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.upload_cap = upload_cap
        self.stepped = stepped

    def config(self, node_id: str, *, site: str, seeds: list[str], **pools) -> NodeConfig:
        base = super().config(node_id, site=site, seeds=seeds, **pools)
        transfer = TransferSection(upload_rate_bytes_per_s=self.upload_cap, max_uploads=4,
                                   max_in_flight_per_peer=2, request_timeout_s=60.0,
                                   stepped_holdings=self.stepped)
        return base.model_copy(update={"transfer": transfer})


def sent(cluster: LocalCluster) -> tuple[int, int, int]:
    """(membership bytes sent in both pools, of which push-pull, false suspicions seen) by all nodes."""
    suspicions = sum(e.kind in ACCUSATIONS for n in cluster.nodes.values() for e in n.events)
    return (*cluster.bytes_sent(), suspicions)


async def gossip_load(fleet: LocalFleet, workdir: Path, n: int, *, model: Path, upload_cap: int,
                      steady_window_s: float | None, timings: MembershipConfig, pools: str = "flat",
                      site_size: int = 10, stepped: bool = True) -> dict:
    """Flat: one pool of n nodes labelled with 3 sites. Sites: n // site_size sites of `site_size`,
    each its own pool, 3 representatives each in the federation pool. `stepped`: `[transfer]
    stepped_holdings` (false: every stored chunk changes the gossiped holdings, as older nodes do)."""
    sites = 3 if pools == "flat" else max(1, n // site_size)
    cluster = ReleaseCluster(fleet, workdir / f"{pools}-{'stepped' if stepped else 'live'}-n{n}", timings,
                             seed=n, upload_cap=upload_cap, pools=pools, stepped=stepped)
    try:
        await cluster.start(n, sites=sites)
        await wait_for(cluster.settled, 60 + n, interval_s=0.05, what=f"{n}-node convergence ({pools})")
        pool = n if pools == "flat" else n // sites
        await asyncio.sleep(timings.dissemination_s(pool) * 2)   # join gossip drains

        window_s = steady_window_s or push_pull_interval_s(timings, pool)
        (out0, pp0, sus0), t0 = sent(cluster), time.perf_counter()
        await asyncio.sleep(window_s)
        (out1, pp1, sus1), t1 = sent(cluster), time.perf_counter()
        steady_s = t1 - t0

        origin = cluster.nodes["node-00"]
        key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
        signed = publish(model, name="bench", version="1", key=key, store=origin.store)
        manifest = signed.manifest
        (out2, pp2, sus2), t2 = sent(cluster), time.perf_counter()
        updates0 = sum(node.distributor.counters.holdings_updates for node in cluster.nodes.values())
        origin.distributor.add_published(signed)
        await wait_for(lambda: all(node.store.is_complete(manifest) for node in cluster.nodes.values()),
                       300.0 + 5 * n, interval_s=0.05, what=f"every one of {n} nodes holding the model")
        (out3, pp3, sus3), t3 = sent(cluster), time.perf_counter()
        updates = sum(node.distributor.counters.holdings_updates for node in cluster.nodes.values())
        updates -= updates0
        release_s = t3 - t2
        return {
            "n": n, "pools": pools, "sites": sites, "chunks": len(manifest.chunks),
            "size_bytes": manifest.size_bytes,
            "steady_s": steady_s, "release_s": release_s,
            "steady_bytes_per_node_s": (out1 - out0) / steady_s / n,
            "steady_push_pull_bytes_per_node_s": (pp1 - pp0) / steady_s / n,
            "release_bytes_per_node_s": (out3 - out2) / release_s / n,
            "release_push_pull_bytes_per_node_s": (pp3 - pp2) / release_s / n,
            "release_bytes_per_node": (out3 - out2) / n,
            "holdings_updates_per_node": updates / n,
            "steady_suspicions": sus1 - sus0,
            "release_suspicions": sus3 - sus2,
        }
    finally:
        await cluster.close()


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y over log x: the growth exponent (0 flat, 1 linear)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def gossip_ceiling_bytes_per_node_s(timings: MembershipConfig) -> float:
    """What the piggyback budget lets one node send per second in gossip rounds alone
    (gossip_nodes messages of up to max_gossip_bytes every gossip interval); probes, acks
    and push-pull come on top."""
    return timings.gossip_nodes * timings.max_gossip_bytes / timings.gossip_interval_s


# -- 2. false suspicions with slow nodes, Lifeguard on vs off --------------------------------

@dataclasses.dataclass(frozen=True)
class Side:
    """One of the two clusters compared: its node ids, which are slow, and its timings."""

    label: str
    timings: MembershipConfig
    ids: tuple[str, ...]
    slow: frozenset[str]


class EnrolledFleet:
    """A fleet whose node credentials were enrolled by the parent process (LocalCluster's
    `fleet`, duck-typed: a child process must not re-create the CA)."""

    def __init__(self, directory: Path, credential_dirs: dict[str, Path]) -> None:
        self.directory = directory
        self._dirs = credential_dirs

    def node_credentials(self, node_id: str) -> Credentials:
        return load_credentials(self._dirs[node_id])


async def stall_loop(stall_s: float, period_s: float) -> None:
    """Block this process's event loop for `stall_s` of every `period_s`: every node on it
    misses its timers and its messages alike."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        time.sleep(stall_s)  # on the loop, on purpose
        due += period_s
        await asyncio.sleep(max(0.0, due - loop.time()))


async def _host(conn, *, slow_host: bool, sides: list[Side], fleet: EnrolledFleet, workdir: Path,
                stall_s: float, period_s: float) -> None:
    """One process's nodes of both sides. Protocol with the parent over `conn`:
    (healthy host) -> seeds; (slow host) <- seeds; -> "converged"; <- duration; -> report; <- "stop"."""
    grpc_errors = count_grpc_errors()
    clusters = {s.label: LocalCluster(fleet, workdir / s.label / ("slow" if slow_host else "healthy"),
                                      s.timings, seed=7) for s in sides}
    mine = {s.label: [i for i in s.ids if (i in s.slow) == slow_host] for s in sides}
    try:
        if slow_host:
            seeds = conn.recv()
        else:
            seeds = {}
            for s in sides:
                first = mine[s.label][0]
                node = await clusters[s.label].add(first, site=SITES[0], seeds=[])
                seeds[s.label] = node.address
            conn.send(seeds)
        for s in sides:
            cluster = clusters[s.label]
            for i in mine[s.label]:
                if i not in cluster.nodes:
                    await cluster.add(i, site=SITES[s.ids.index(i) % 3], seeds=[seeds[s.label]])

        def converged() -> bool:
            return all({m.node_id for m in node.membership.members() if m.state is State.ALIVE} == set(s.ids)
                       for s in sides for node in clusters[s.label].nodes.values())

        await wait_for(converged, 120.0, interval_s=0.1, what="both clusters converged")
        conn.send("converged")
        duration_s = await asyncio.get_running_loop().run_in_executor(None, conn.recv)

        nodes = {(s.label, i): node for s in sides for i, node in clusters[s.label].nodes.items()}
        start = {key: (len(node.events), dataclasses.replace(node.runner.core.stats))
                 for key, node in nodes.items()}
        health_samples: dict[str, list[int]] = {s.label: [] for s in sides}
        stall = asyncio.create_task(stall_loop(stall_s, period_s)) if slow_host else None
        loop = asyncio.get_running_loop()
        end = loop.time() + duration_s
        while loop.time() < end:
            await asyncio.sleep(1.0)
            for (label, _), node in nodes.items():
                health_samples[label].append(node.runner.core.health_score)
        if stall is not None:
            stall.cancel()
        report = {}
        for s in sides:
            events, probes_failed, refutations, confirmations, nacks = [], 0, 0, 0, 0
            for i in mine[s.label]:
                node = nodes[(s.label, i)]
                first_event, stats0 = start[(s.label, i)]
                stats = node.runner.core.stats
                events += [(i, e.kind.value, e.node_id) for e in node.events[first_event:]
                           if e.kind in ACCUSATIONS]
                probes_failed += stats.probes_failed - stats0.probes_failed
                refutations += stats.refutations - stats0.refutations
                confirmations += stats.confirmations - stats0.confirmations
                nacks += stats.nacks_received - stats0.nacks_received
            samples = health_samples[s.label]
            report[s.label] = {"events": events, "probes_failed": probes_failed, "refutations": refutations,
                               "confirmations": confirmations, "nacks": nacks,
                               "mean_health_score": sum(samples) / len(samples) if samples else 0.0,
                               "replies_dropped": sum(n.runner.counters.replies_dropped
                                                      for n in clusters[s.label].nodes.values())}
        report["grpc_error_logs"] = grpc_errors.count
        report["grpc_error_first"] = grpc_errors.first
        conn.send(report)
        await loop.run_in_executor(None, conn.recv)
    finally:
        await asyncio.gather(*(c.close() for c in clusters.values()), return_exceptions=True)


def _host_process(conn, **kwargs) -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_host(conn, **kwargs))


def false_suspicions(workdir: Path, *, n: int, duration_s: float, stall_s: float, period_s: float,
                     timings: MembershipConfig) -> dict:
    """Run both sides at once (healthy process + slow process); per side, the figures."""
    fleet = LocalFleet(workdir / "fleet")
    sides = []
    for k, lifeguard in enumerate((False, True)):
        ids = tuple(f"node-{k * n + i:02d}" for i in range(n))
        sides.append(Side("with" if lifeguard else "without",
                          dataclasses.replace(timings, lifeguard=lifeguard),
                          ids, frozenset(ids[i] for i in range(1, n, 3))))
    dirs = {i: fleet.node_credentials(i).directory for s in sides for i in s.ids}
    enrolled = EnrolledFleet(fleet.directory, dirs)
    spawn = multiprocessing.get_context("spawn")
    pipes, procs = {}, {}
    for slow_host in (False, True):
        parent_end, child_end = spawn.Pipe()
        proc = spawn.Process(target=_host_process, args=(child_end,), daemon=True,
                             kwargs=dict(slow_host=slow_host, sides=sides, fleet=enrolled, workdir=workdir,
                                         stall_s=stall_s, period_s=period_s))
        proc.start()
        pipes[slow_host], procs[slow_host] = parent_end, proc

    def recv(slow_host: bool, timeout_s: float):
        if not pipes[slow_host].poll(timeout_s):
            raise TimeoutError(f"the {'slow' if slow_host else 'healthy'} host process did not answer "
                               f"within {timeout_s:.0f}s (exit code {procs[slow_host].exitcode})")
        return pipes[slow_host].recv()

    try:
        pipes[True].send(recv(False, 120.0))
        for slow_host in (False, True):
            assert recv(slow_host, 180.0) == "converged"
        for slow_host in (False, True):
            pipes[slow_host].send(duration_s)
        reports = [recv(slow_host, duration_s + 120.0) for slow_host in (False, True)]
        for slow_host in (False, True):
            pipes[slow_host].send("stop")
    finally:
        for proc in procs.values():
            proc.join(30.0)
            if proc.is_alive():
                proc.kill()
    out: dict = {"grpc_error_logs": sum(r["grpc_error_logs"] for r in reports),
                 "grpc_error_first": next((r["grpc_error_first"] for r in reports if r["grpc_error_first"]),
                                          None)}
    node_hours = n * duration_s / 3600.0
    for s in sides:
        healthy_r, slow_r = reports[0][s.label], reports[1][s.label]
        events = healthy_r["events"] + slow_r["events"]
        about_slow = sum(about in s.slow for _, _, about in events)
        out[s.label] = {
            "events": len(events),
            "per_node_hour": len(events) / node_hours,
            "dead": sum(kind == EventKind.DEAD.value for _, kind, _ in events),
            "about_slow_seen_by_healthy": sum(about in s.slow and obs not in s.slow
                                              for obs, _, about in events),
            "about_slow_seen_by_slow": sum(about in s.slow and obs in s.slow for obs, _, about in events),
            "about_healthy": len(events) - about_slow,
            "probes_failed_by_healthy": healthy_r["probes_failed"],
            "probes_failed_by_slow": slow_r["probes_failed"],
            "refutations_by_slow": slow_r["refutations"],
            "confirmations": healthy_r["confirmations"] + slow_r["confirmations"],
            "nacks": healthy_r["nacks"] + slow_r["nacks"],
            "mean_health_score_slow": slow_r["mean_health_score"],
            "mean_health_score_healthy": healthy_r["mean_health_score"],
            "replies_dropped": healthy_r["replies_dropped"] + slow_r["replies_dropped"],
        }
    return out


# -- the run ----------------------------------------------------------------------------------

def report_loads(loads: list[dict], unfit: list[dict], timings: MembershipConfig, label: str) -> dict:
    """Print one mode's gossip table and exponents; return its figures for the JSON line."""
    sizes = [r["n"] for r in loads]
    steady = [r["steady_bytes_per_node_s"] for r in loads]
    release = [r["release_bytes_per_node_s"] for r in loads]
    per_release = [r["release_bytes_per_node"] for r in loads]
    exp_steady, exp_release = slope(sizes, steady), slope(sizes, release)
    exp_per_release = slope(sizes, per_release)
    print(f"-- {label}")
    print(f"{'N':>4} {'sites':>5} {'steady B/s/node':>16} {'of it push-pull':>16} {'release B/s/node':>17} "
          f"{'of it push-pull':>16} {'release/steady':>15} {'KB/node/release':>16} {'holdings changes':>17} "
          f"{'release s':>10} {'suspicions steady/release':>25}")
    for r in loads:
        print(f"{r['n']:>4} {r['sites']:>5} {r['steady_bytes_per_node_s']:>16,.0f} "
              f"{r['steady_push_pull_bytes_per_node_s']:>16,.0f} "
              f"{r['release_bytes_per_node_s']:>17,.0f} {r['release_push_pull_bytes_per_node_s']:>16,.0f} "
              f"{r['release_bytes_per_node_s'] / r['steady_bytes_per_node_s']:>15.1f} "
              f"{r['release_bytes_per_node'] / 1000:>16,.1f} {r['holdings_updates_per_node']:>17.1f} "
              f"{r['release_s']:>10.1f} "
              f" {r['steady_suspicions']:>12}/{r['release_suspicions']:<12}")
    for u in unfit:
        print(f"{u['n']:>4} did not fit: {u['reason']}")
    # More false suspicions than members while measuring: the shared loop could not keep every
    # node's timers, suspicions and refutations ride the gossip, and the release is CPU-bound,
    # so that size's figures measure this machine's load as much as the protocol.
    overloaded = [r["n"] for r in loads if r["steady_suspicions"] + r["release_suspicions"] > r["n"]]
    for n in overloaded:
        print(f"  N={n}: more suspicions than members while measuring: the loop was overloaded "
              f"(figures include suspicion gossip, and release time is CPU-bound)")
    swim = [r["steady_bytes_per_node_s"] - r["steady_push_pull_bytes_per_node_s"] for r in loads]
    exp_swim = slope(sizes, swim)
    print(f"  steady SWIM alone (probes, acks, gossip; push-pull apart): "
          f"{', '.join(f'{x:,.0f}' for x in swim)} B/s/node, exponent {exp_swim:+.2f}")
    for a, b in zip(loads, loads[1:], strict=False):
        ns = [a["n"], b["n"]]

        def pair(key: str, a: dict = a, b: dict = b, ns: list[int] = ns) -> float:
            return slope(ns, [a[key], b[key]])

        print(f"  N {a['n']} -> {b['n']}: exponent steady {pair('steady_bytes_per_node_s'):+.2f}, "
              f"release {pair('release_bytes_per_node_s'):+.2f}, "
              f"per-release bytes {pair('release_bytes_per_node'):+.2f}")
    growth = sizes[-1] / sizes[0]
    print(f"  growth exponent (log-log fit over N = {', '.join(map(str, sizes))}): steady {exp_steady:+.2f}, "
          f"release {exp_release:+.2f}, bytes per node per release {exp_per_release:+.2f}; "
          f"goal: flat within +-20% over x{growth:g} in N, "
          f"i.e. |exponent| <= {math.log(1.2) / math.log(growth):.2f}")
    return {
        "sizes": sizes,
        "sizes_not_fitting": [u["n"] for u in unfit],
        "sizes_overloaded": overloaded,
        "sites": [r["sites"] for r in loads],
        "steady_swim_bytes_per_node_s": [round(x, 1) for x in swim],
        "gossip_exponent_steady_swim": round(exp_swim, 3),
        "steady_bytes_per_node_s": [round(x, 1) for x in steady],
        "release_bytes_per_node_s": [round(x, 1) for x in release],
        "release_bytes_per_node": [round(x) for x in per_release],
        "holdings_updates_per_node": [round(r["holdings_updates_per_node"], 1) for r in loads],
        "steady_push_pull_bytes_per_node_s": [round(r["steady_push_pull_bytes_per_node_s"], 1)
                                              for r in loads],
        "release_s": [round(r["release_s"], 2) for r in loads],
        "gossip_exponent_steady": round(exp_steady, 3),
        "gossip_exponent_release": round(exp_release, 3),
        "gossip_exponent_release_bytes": round(exp_per_release, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 60, 80])
    parser.add_argument("--pools", choices=("both", "sites", "flat"), default=None,
                        help="sites: each site its own pool plus the federation pool ([membership] pools); "
                             "flat: one pool; both (default; --quick: sites): each size in both")
    parser.add_argument("--site-size", type=int, default=10, help="nodes per site in sites mode")
    parser.add_argument("--holdings", choices=("stepped", "live", "both"), default="stepped",
                        help="stepped ([transfer] stepped_holdings, the default): gossip says progress in "
                             "eighths, chunk lists go between transfer peers; live: every stored chunk "
                             "changes the gossiped holdings (older nodes); both: each size both ways, side "
                             "by side (figures of live holdings suffixed _live)")
    parser.add_argument("--model", default="hand_landmark_full", help="a mediapipe model name (make models)")
    parser.add_argument("--upload-cap-mb", type=float, default=1.0, help="per-node upload cap, MB/s")
    parser.add_argument("--steady-window", type=float, default=None,
                        help="seconds of steady state (default: one push-pull interval at that N)")
    parser.add_argument("--lifeguard-nodes", type=int, default=30, help="nodes in each of the two clusters")
    parser.add_argument("--lifeguard-duration", type=float, default=120.0, help="seconds with slow nodes")
    parser.add_argument("--stall-ms", type=float, default=600.0,
                        help="how long the slow nodes' event loop is blocked in each period (default 600 ms: "
                             "a stall must outlast the 500 ms probe interval to fail a probe cycle)")
    parser.add_argument("--stall-period", type=float, default=1.0, help="seconds between stalls")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (< 60 s): N = 5 10, a 1.2 MB model, 2 x 9 nodes for 15 s; "
                             "figures are not comparable with a full run")
    args = parser.parse_args(argv)
    pools = args.pools or ("sites" if args.quick else "both")
    pool_modes = ["flat", "sites"] if pools == "both" else [pools]
    holdings = {"stepped": [True], "live": [False], "both": [True, False]}[args.holdings]
    # (label, pools, stepped): the label keys the figures ("sites", "flat", "sites_live", "flat_live").
    variants = [(m if stepped else f"{m}_live", m, stepped) for m in pool_modes for stepped in holdings]
    modes = [label for label, _, _ in variants]
    if args.quick:
        args.sizes, args.model, args.steady_window, args.site_size = [5, 10], "face_landmark", 4.0, 5
        args.lifeguard_nodes, args.lifeguard_duration = 9, 15.0
    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two sizes to give an exponent")
    logging.basicConfig(level=logging.WARNING)
    grpc_errors = count_grpc_errors()
    timings = BENCH_TIMINGS
    cap = int(args.upload_cap_mb * 1_000_000)
    model = mediapipe_model(args.model)
    wall0 = time.perf_counter()

    # Node stores on tmpfs, as bench/distribution.py: the shared disk's fsync is not gossip's business.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        async def all_sizes() -> list[dict]:
            fleet = LocalFleet(Path(tmp) / "fleet")
            results: dict[str, list[dict]] = {m: [] for m in modes}
            unfit: dict[str, list[dict]] = {m: [] for m in modes}
            stopped: set[str] = set()
            for n in args.sizes:
                for mode, pool_mode, stepped in [v for v in variants if v[0] not in stopped]:
                    print(f"gossip load, N={n}, {mode}...", file=sys.stderr, flush=True)
                    try:
                        r = await gossip_load(fleet, Path(tmp), n, model=model, upload_cap=cap,
                                              steady_window_s=args.steady_window, timings=timings,
                                              pools=pool_mode, site_size=args.site_size, stepped=stepped)
                    except TimeoutError as exc:
                        # One process on a shared 2-core machine: past some N the loop cannot keep
                        # every node's timers, the view never settles and the figures would measure
                        # the CPU. That size did not fit; larger ones would not either.
                        print(f"  N={n} ({mode}) did not fit on this machine: {exc}", file=sys.stderr,
                              flush=True)
                        unfit[mode].append({"n": n, "reason": str(exc)})
                        stopped.add(mode)
                        continue
                    print(f"  steady {r['steady_bytes_per_node_s']:,.0f} B/s/node, release "
                          f"{r['release_bytes_per_node_s']:,.0f} B/s/node", file=sys.stderr, flush=True)
                    results[mode].append(r)
            return results, unfit

        loads, unfit = asyncio.run(all_sizes())
        short = [m for m in modes if len(loads[m]) < 2]
        if short:
            print(f"fewer than two sizes fit in {', '.join(short)} ({unfit}): no exponent", file=sys.stderr)
            return 1
        print(f"false suspicions: 2 x {args.lifeguard_nodes} nodes, a third slow, "
              f"{args.lifeguard_duration:.0f}s...", file=sys.stderr, flush=True)
        slow = false_suspicions(Path(tmp) / "lifeguard", n=args.lifeguard_nodes,
                                duration_s=args.lifeguard_duration, stall_s=args.stall_ms / 1000,
                                period_s=args.stall_period, timings=timings)
    wall_s = time.perf_counter() - wall0

    t = timings
    first = loads[modes[0]][0]
    print(f"timings: probe {t.probe_interval_s}s, timeout {t.probe_timeout_s}s, gossip "
          f"{t.gossip_interval_s}s x {t.gossip_nodes}, push-pull {t.push_pull_interval_s}s (scaled with N), "
          f"budget {t.max_gossip_bytes} B per message; gossip-round ceiling "
          f"{gossip_ceiling_bytes_per_node_s(t):,.0f} B/s/node")
    print(f"release: {args.model}, {first['size_bytes']:,} bytes in {first['chunks']} chunks, "
          f"upload cap {cap:,} B/s per node")
    figures = {}
    for mode, pool_mode, stepped in variants:
        label = ("flat: one pool of N nodes (3 site labels)" if pool_mode == "flat" else
                 f"sites: N // {args.site_size} sites of {args.site_size}, each its own pool, "
                 "3 representatives each in the federation pool")
        label += "; holdings in steps" if stepped else "; live holdings (stepped_holdings = false)"
        figures[mode] = report_loads(loads[mode], unfit[mode], timings, label)
    def ratios(over: list[float], under: list[float]) -> str:
        """Per size, `over / under` as xR; a zero `under` prints as its two figures (no ratio)."""
        return ", ".join(f"x{round(a / b, 2):g}" if b else f"({a:g} against 0)"
                         for a, b in zip(over, under, strict=False))

    if "flat" in figures and "sites" in figures:
        for key in ("steady_bytes_per_node_s", "release_bytes_per_node"):
            print(f"  flat / sites, {key}: {ratios(figures['flat'][key], figures['sites'][key])}")
    for m in pool_modes:
        if m in figures and f"{m}_live" in figures:
            for key in ("release_bytes_per_node", "holdings_updates_per_node"):
                print(f"  {m}: live / stepped holdings, {key}: "
                      f"{ratios(figures[f'{m}_live'][key], figures[m][key])}")

    without, with_ = slow["without"], slow["with"]
    print(f"false suspicions, {args.lifeguard_nodes} nodes per cluster, every third node's loop blocked "
          f"{args.stall_ms:.0f} ms of every {args.stall_period:g} s, {args.lifeguard_duration:.0f}s, "
          f"both clusters at once:")
    print(f"{'':>18} {'per node-hour':>14} {'events':>7} {'DEAD':>5} {'about slow':>11} {'(by slow)':>10} "
          f"{'about healthy':>14} {'probes failed healthy/slow':>27} {'refutations':>12} "
          f"{'health slow/healthy':>20}")
    for label, r in (("without Lifeguard", without), ("with Lifeguard", with_)):
        print(f"{label:>18} {r['per_node_hour']:>14.1f} {r['events']:>7} {r['dead']:>5} "
              f"{r['about_slow_seen_by_healthy'] + r['about_slow_seen_by_slow']:>11} "
              f"{r['about_slow_seen_by_slow']:>10} {r['about_healthy']:>14} "
              f"{r['probes_failed_by_healthy']:>13}/{r['probes_failed_by_slow']:<13} "
              f"{r['refutations_by_slow']:>12} "
              f"{r['mean_health_score_slow']:>10.2f}/{r['mean_health_score_healthy']:<9.2f}")
    ratio = without["per_node_hour"] / with_["per_node_hour"] if with_["per_node_hour"] else math.inf
    print(f"Lifeguard: x{ratio:.2f} fewer false suspicions (goal >= 10x); false DEAD {without['dead']} "
          f"without, {with_['dead']} with; about healthy members {without['about_healthy']} without, "
          f"{with_['about_healthy']} with")
    if with_["about_healthy"] + without["about_healthy"] == 0:
        print("  every false suspicion was about a stalled node, raised by probers that really got no answer "
              "in a whole probe cycle: Lifeguard acts on the accuser's own lateness, and no one here accused "
              "late")
    print(f"gRPC error logs (e.g. ExecuteBatchError): {grpc_errors.count + slow['grpc_error_logs']}; "
          f"replies not sent to callers that had gone away: "
          f"{without['replies_dropped'] + with_['replies_dropped']}")
    print(f"wall time {wall_s:.0f}s")
    head = "sites" if "sites" in pool_modes else "flat"  # the pool mode of the unsuffixed figures
    headline = figures[head] if head in figures else figures[f"{head}_live"]
    # The other variants' figures, suffixed by what differs from the headline's: _flat (the pool mode),
    # _live (the holdings, when the headline's are stepped).
    others = {}
    for mode, values in figures.items():
        if values is headline:
            continue
        pool, live = mode.removesuffix("_live"), mode.endswith("_live")
        suffix = ("" if pool == head else f"_{pool}") + ("_live" if live and head in figures else "")
        others.update({f"{k}{suffix}": v for k, v in values.items()})
    summary = {
        "pools": head,
        "holdings": args.holdings,  # both: unsuffixed figures are stepped, *_live those of live holdings
        **headline,
        **others,
        "false_suspicions_without_lifeguard": round(without["per_node_hour"], 2),
        "false_suspicions_with_lifeguard": round(with_["per_node_hour"], 2),
        "lifeguard_ratio": round(ratio, 3) if math.isfinite(ratio) else None,
        "false_suspicions_about_healthy_without_lifeguard": without["about_healthy"],
        "false_suspicions_about_healthy_with_lifeguard": with_["about_healthy"],
        "false_dead_without_lifeguard": without["dead"],
        "false_dead_with_lifeguard": with_["dead"],
        "grpc_error_logs": grpc_errors.count + slow["grpc_error_logs"],
        "wall_s": round(wall_s, 1),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
