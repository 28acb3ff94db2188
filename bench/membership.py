"""Membership benchmark: failure detection time and gossip load per node, for N = 10, 30, 50.

Runs real nodes (grpc.aio, mTLS) in one process on loopback, all sizes in one
run so the figures are comparable on a shared machine. For each N:

- detection: crash a node (its server stops without a goodbye) and time until
  every survivor marks it dead; median and max over trials, printed as a ratio
  to the protocol's expected detection time for N (MembershipConfig.
  expected_detection_s) and to the worst-case bound.
- load: membership bytes sent per node per second in steady state, over one
  full push-pull interval. SWIM's probe and gossip load per node should stay
  flat as N grows (one probe per interval per node, whatever N); push-pull
  anti-entropy sends pages of the member list, so its share grows with N by
  design and is printed apart.
- Lifeguard against slow nodes (simulated network, virtual time, so the
  figure does not depend on this machine's load): SUSPECT and DEAD events
  about live nodes in 300 s with a third of 30 nodes slow, with Lifeguard
  and with it switched off, for blocked event loops (our node) and for slow
  members whose timers run on time (the Lifeguard paper's).

The last line is one JSON object.

    python bench/membership.py                 # N = 10 30 50, 3 trials each
    python bench/membership.py --sizes 10 20 --trials 5
    python bench/membership.py --no-lifeguard  # the real nodes run plain SWIM
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# gRPC's C core logs every refused connection to a crashed node; keep the table readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mesh.membership.config import MembershipConfig
from mesh.membership.core import push_pull_interval_s
from mesh.membership.messages import EventKind, State
from mesh.node.local import LocalCluster, LocalFleet, wait_for
from mesh.sim.netsim import Network

# LAN-default structure at twice the speed: short enough for a quick run,
# slow enough that 50 nodes in one process on 2 cores keep their timers.
BENCH_TIMINGS = MembershipConfig(probe_interval_s=0.5, probe_timeout_s=0.25, gossip_interval_s=0.1,
                                 push_pull_interval_s=15.0)


def bytes_out(cluster: LocalCluster) -> tuple[int, int]:
    """(SWIM probe+gossip bytes, push-pull bytes) sent by all nodes so far."""
    counters = [n.runner.counters for n in cluster.nodes.values()]
    push_pull = sum(c.push_pull_bytes_out for c in counters)
    return sum(c.bytes_out for c in counters) - push_pull, push_pull


def false_suspicions(lifeguard: bool, *, timers_on_time: bool, seed: int = 1, n: int = 30,
                     duration_s: float = 300.0) -> int:
    """SUSPECT and DEAD events about live nodes on the simulated network, a third of it slow."""
    net = Network(n, seed=seed, config=MembershipConfig(push_pull_interval_s=30.0, lifeguard=lifeguard))
    net.join_all()
    net.run_until(net.all_alive, timeout_s=60)
    for i in range(1, n, 3):
        net.slow(f"n{i:02d}", 0.5, 1.0, timers_on_time=timers_on_time)
    start = len(net.trace)
    net.run_for(duration_s)
    return sum(e.kind in (EventKind.SUSPECT, EventKind.DEAD) for e in net.trace[start:])


async def measure(fleet: LocalFleet, workdir: Path, n: int, trials: int, load_window_s: float,
                  timings: MembershipConfig) -> dict:
    cluster = LocalCluster(fleet, workdir / f"n{n}", timings, seed=n)
    try:
        await cluster.start(n, sites=3)
        await wait_for(cluster.converged, 60 + n, interval_s=0.05, what=f"{n}-node convergence")
        # Let join gossip drain before measuring steady state.
        await asyncio.sleep(timings.dissemination_s(n) * 2)
        (swim0, pp0), t0 = bytes_out(cluster), time.perf_counter()
        await asyncio.sleep(load_window_s)
        (swim1, pp1), elapsed = bytes_out(cluster), time.perf_counter() - t0
        load = (swim1 - swim0) / elapsed / len(cluster.nodes)
        push_pull_load = (pp1 - pp0) / elapsed / len(cluster.nodes)

        detections = []
        for trial in range(trials):
            victim = sorted(cluster.nodes)[1 + trial * (n // (trials + 1))]
            size = len(cluster.nodes)
            survivors = [i for i in cluster.nodes if i != victim]
            await cluster.stop(victim, leave=False)

            def everyone_knows(victim: str = victim, survivors: list[str] = survivors) -> bool:
                return all(cluster.nodes[s].membership.member(victim).state is State.DEAD for s in survivors)

            took = await wait_for(everyone_knows, 3 * timings.detection_bound_s(size), interval_s=0.01,
                                  what=f"detection of {victim}")
            detections.append((took, timings.expected_detection_s(size), timings.detection_bound_s(size)))
        return {"n": n, "load_bytes_per_node_s": load, "push_pull_bytes_per_node_s": push_pull_load,
                "detections": detections}
    finally:
        await cluster.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 50])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--load-window", type=float, default=None,
                        help="seconds of steady state to measure (default: one push-pull interval at that N, "
                             "which memberlist's scaling doubles above 32 members)")
    parser.add_argument("--no-lifeguard", action="store_true", help="the real nodes run plain SWIM")
    args = parser.parse_args(argv)
    timings = dataclasses.replace(BENCH_TIMINGS, lifeguard=not args.no_lifeguard)
    logging.basicConfig(level=logging.WARNING)

    async def run_all():
        with tempfile.TemporaryDirectory() as tmp:
            fleet = LocalFleet(Path(tmp) / "fleet")
            results = []
            for n in args.sizes:
                print(f"N={n}: starting...", file=sys.stderr, flush=True)
                window_s = args.load_window or push_pull_interval_s(timings, n)
                results.append(await measure(fleet, Path(tmp), n, args.trials, window_s, timings))
            return results

    results = asyncio.run(run_all())
    print("Lifeguard against slow nodes (simulated)...", file=sys.stderr, flush=True)
    slow = {f"{kind}_{mode}": false_suspicions(mode == "with", timers_on_time=kind == "slow_members")
            for kind in ("blocked_loops", "slow_members") for mode in ("without", "with")}
    t = timings
    print(f"timings: probe {t.probe_interval_s}s, timeout {t.probe_timeout_s}s, "
          f"{t.indirect_checks} indirect, gossip {t.gossip_interval_s}s x {t.gossip_nodes}, "
          f"suspicion mult {t.suspicion_mult}, Lifeguard {'on' if t.lifeguard else 'off'}")
    print(f"{'N':>4} {'detect median':>14} {'detect max':>11} {'median/expected':>16} {'max/expected':>13} "
          f"{'max/bound':>10} {'swim B/node/s':>14} {'vs N=' + str(results[0]['n']):>8} "
          f"{'push-pull B/node/s':>19}")
    base_load = results[0]["load_bytes_per_node_s"]
    for r in results:
        took = [d[0] for d in r["detections"]]
        expected = statistics.median(d[1] for d in r["detections"])
        bound = statistics.median(d[2] for d in r["detections"])
        median = statistics.median(took)
        print(f"{r['n']:>4} {median:>13.2f}s {max(took):>10.2f}s {median / expected:>16.2f} "
              f"{max(took) / expected:>13.2f} {max(took) / bound:>10.2f} "
              f"{r['load_bytes_per_node_s']:>14.0f} {r['load_bytes_per_node_s'] / base_load:>8.2f} "
              f"{r['push_pull_bytes_per_node_s']:>19.0f}")
    print("false suspicions in 300 s, a third of 30 nodes slow (simulated): "
          f"blocked loops {slow['blocked_loops_without']} without Lifeguard, "
          f"{slow['blocked_loops_with']} with; "
          f"slow members {slow['slow_members_without']} without, {slow['slow_members_with']} with")
    summary = {
        "lifeguard": t.lifeguard,
        "sizes": [r["n"] for r in results],
        "detection_median_over_expected": [
            round(statistics.median(d[0] / d[1] for d in r["detections"]), 3) for r in results],
        "swim_bytes_per_node_s": [round(r["load_bytes_per_node_s"]) for r in results],
        "push_pull_bytes_per_node_s": [round(r["push_pull_bytes_per_node_s"]) for r in results],
        "false_suspicions_without_lifeguard": slow["blocked_loops_without"],
        "false_suspicions_with_lifeguard": slow["blocked_loops_with"],
        "false_suspicions_slow_members_without_lifeguard": slow["slow_members_without"],
        "false_suspicions_slow_members_with_lifeguard": slow["slow_members_with"],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
