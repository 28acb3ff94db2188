"""Consensus benchmark: the asyncio bridge against raw pysyncobj, and leader failover time.

One run, one 3-member group on loopback (RaftTimings defaults, durable journal, password):

- commits: the same commands proposed on the leader, (a) raw: pysyncobj's replicated
  method with ``sync=True`` from plain threads, (b) bridge: ``await group.propose()`` from
  asyncio tasks. Modes alternate in blocks so machine load hits both alike. Printed:
  commits/s, median and p99 commit latency, and bridge/raw ratios (goal: commits/s ratio
  >= 0.7), at 1 and at --concurrency proposers.
- failover: kill the leader (destroy: its sockets close as in a crash) and time until a
  survivor is leader, and until a command commits through it; median and max over
  --trials, as a ratio to the configured maximum election timeout (goal: median <= 1.5).
  The killed member restarts from its data dir before the next trial.

The workload is the guarded decision ledger by default (every command a decision the guard
judges inside apply); ``--workload counter`` is a trivial state machine, and --workload
module:attr takes any object with ``make_state()`` and ``command(i) -> bytes``.

    python bench/consensus.py
    python bench/consensus.py --commits 4000 --concurrency 32 --trials 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from mesh.consensus.raft import RaftGroup, RaftTimings, derive_group_password
from mesh.node.local import free_address


class CounterState:
    """Default workload state: a counter per key, apply returns the new value."""

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}

    def apply(self, command: bytes) -> int:
        self.counts[command] = self.counts.get(command, 0) + 1
        return self.counts[command]

    def snapshot(self) -> bytes:
        return json.dumps({k.decode(): v for k, v in self.counts.items()}).encode()

    def restore(self, data: bytes) -> None:
        self.counts = {k.encode(): v for k, v in json.loads(data).items()}


class CounterWorkload:
    def make_state(self) -> CounterState:
        return CounterState()

    def command(self, i: int) -> bytes:
        return b"decision-%d" % (i % 64)


class LedgerWorkload:
    """The product's path: every command is a decision that the guard judges inside the
    replicated apply (DecisionLedger), here allocation changes within the policy's scope."""

    def __init__(self) -> None:
        from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys

        self.trusted = TrustedKeys([SigningKey.generate(KeyRole.OPERATOR).verify_key])
        self.started = time.time()

    def make_state(self):
        from mesh.consensus.ledger import DecisionLedger
        from mesh.guard.core import Policy

        return DecisionLedger(group="bench-site", policy=Policy(), group_size=3, trusted=self.trusted)

    def command(self, i: int) -> bytes:
        from mesh.consensus.commands import propose_command
        from mesh.guard.core import Allocation, Decision, DecisionKind

        decision = Decision(kind=DecisionKind.SET_ALLOCATION, group="bench-site", proposer="node-00",
                            reason="bench", proposed_at=self.started + i * 1e-6, nonce=f"bench-{i:08d}",
                            allocations=(Allocation(f"node-{i % 3:02d}", 1 + i % 16),))
        return propose_command(decision)


def load_workload(spec: str | None):
    if not spec or spec == "ledger":
        return LedgerWorkload()
    if spec == "counter":
        return CounterWorkload()
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Cluster:
    def __init__(self, root: Path, n: int, workload, timings: RaftTimings, password: str):
        self.root, self.workload, self.timings, self.password = root, workload, timings, password
        self.addresses = [free_address() for _ in range(n)]
        self.groups = {a: self.start(a) for a in self.addresses}

    def start(self, address: str) -> RaftGroup:
        return RaftGroup(
            address,
            self.addresses,
            self.workload.make_state(),
            data_dir=self.root / address.replace(":", "_"),
            password=self.password,
            timings=self.timings,
        )

    def live(self) -> list[RaftGroup]:
        return [g for g in self.groups.values() if g.tick_thread_alive()]

    async def leader(self, timeout_s: float = 10.0) -> RaftGroup:
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.live()
            leaders = [g for g in live if g.is_leader]
            if len(leaders) == 1 and all(g.leader_address == leaders[0].address for g in live):
                return leaders[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no single leader within {timeout_s} s: {[g.status() for g in live]}")
            await asyncio.sleep(0.005)

    async def caught_up(self, timeout_s: float = 10.0) -> None:
        leader = await self.leader(timeout_s)
        await leader.read_barrier(timeout_s)
        target = leader.raftCommitIndex
        deadline = time.monotonic() + timeout_s
        while not all(g.applied_index >= target for g in self.live()):
            if time.monotonic() > deadline:
                raise RuntimeError("members did not catch up")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await asyncio.gather(*(g.close() for g in self.live()))


def run_raw(leader: RaftGroup, commands: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Raw pysyncobj: blocking sync=True calls from `concurrency` plain threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [commands[i::concurrency] for i in range(concurrency)]

    def worker(chunk: list[bytes]) -> None:
        mine = []
        for command in chunk:
            t = time.perf_counter()
            leader.apply_command(command, sync=True, timeout=10.0)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


async def run_bridge(leader: RaftGroup, commands: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """Through the asyncio bridge: `concurrency` tasks awaiting group.propose()."""
    latencies: list[float] = []
    chunks = [commands[i::concurrency] for i in range(concurrency)]

    async def worker(chunk: list[bytes]) -> None:
        for command in chunk:
            t = time.perf_counter()
            await leader.propose(command, timeout_s=10.0)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in chunks))
    return time.perf_counter() - start, latencies


async def measure_commits(cluster: Cluster, total: int, concurrency: int, blocks: int) -> dict:
    leader = await cluster.leader()
    commands = [cluster.workload.command(i) for i in range(total)]
    warmup = commands[: max(50, concurrency * 4)]
    await asyncio.to_thread(run_raw, leader, warmup, concurrency)
    await run_bridge(leader, warmup, concurrency)
    figures = {"raw": ([], 0.0), "bridge": ([], 0.0)}
    per_block = total // blocks
    for b in range(blocks):
        block = commands[b * per_block : (b + 1) * per_block]
        order = ("raw", "bridge") if b % 2 == 0 else ("bridge", "raw")
        for mode in order:
            if mode == "raw":
                elapsed, lat = await asyncio.to_thread(run_raw, leader, block, concurrency)
            else:
                elapsed, lat = await run_bridge(leader, block, concurrency)
            lats, secs = figures[mode]
            figures[mode] = (lats + lat, secs + elapsed)
    out = {"concurrency": concurrency, "commits": per_block * blocks}
    for mode, (lats, secs) in figures.items():
        out[mode] = {
            "commits_per_s": len(lats) / secs,
            "median_ms": statistics.median(lats) * 1e3,
            "p99_ms": percentile(lats, 0.99) * 1e3,
        }
    out["ratio_commits_per_s"] = out["bridge"]["commits_per_s"] / out["raw"]["commits_per_s"]
    out["ratio_median_latency"] = out["bridge"]["median_ms"] / out["raw"]["median_ms"]
    out["ratio_p99_latency"] = out["bridge"]["p99_ms"] / out["raw"]["p99_ms"]
    return out


async def measure_failover(cluster: Cluster, trials: int) -> dict:
    elected_s: list[float] = []
    committed_s: list[float] = []
    for trial in range(trials):
        await cluster.caught_up()
        old = await cluster.leader()
        survivors = [g for g in cluster.live() if g is not old]
        start = time.perf_counter()
        old.destroy()  # the tick thread closes every socket on its next tick, as a crash would
        elected = None
        while elected is None:
            leaders = [g for g in survivors if g.is_leader]
            if leaders:
                elected = time.perf_counter() - start
                new = leaders[0]
            elif time.perf_counter() - start > 30:
                raise RuntimeError(f"trial {trial}: no new leader after 30 s")
            else:
                await asyncio.sleep(0.002)
        await new.propose(b"failover-%d" % trial, timeout_s=10.0)
        committed = time.perf_counter() - start
        elected_s.append(elected)
        committed_s.append(committed)
        await asyncio.to_thread(old.close_sync)
        cluster.groups[old.address] = cluster.start(old.address)
    bound = cluster.timings.election_max_s
    return {
        "trials": trials,
        "election_max_s": bound,
        "elected_median_s": statistics.median(elected_s),
        "elected_max_s": max(elected_s),
        "committed_median_s": statistics.median(committed_s),
        "committed_max_s": max(committed_s),
        "ratio_median": statistics.median(elected_s) / bound,
        "ratio_max": max(elected_s) / bound,
        "elected_all_s": [round(x, 3) for x in elected_s],
    }


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commits", type=int, default=2000, help="commands per mode and concurrency level")
    parser.add_argument("--concurrency", type=int, default=16, help="proposers for the concurrent run")
    parser.add_argument("--blocks", type=int, default=4, help="alternating raw/bridge blocks")
    parser.add_argument("--trials", type=int, default=10, help="failover trials")
    parser.add_argument("--workload", default="ledger",
                        help="ledger (default: decisions through the guard), counter, or module:attr")
    parser.add_argument("--batch", action="store_true", help="appendEntriesUseBatch=True (compare batching)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)

    timings = RaftTimings(batch_appends=args.batch)
    workload = load_workload(args.workload)
    password = derive_group_password(b"bench-fleet-secret-" + bytes(13), "bench-site")
    with tempfile.TemporaryDirectory(prefix="bench-consensus-") as tmp:
        cluster = Cluster(Path(tmp), 3, workload, timings, password)
        try:
            await cluster.leader()
            commits = [
                await measure_commits(cluster, args.commits, c, args.blocks)
                for c in sorted({1, args.concurrency})
            ]
            failover = await measure_failover(cluster, args.trials)
        finally:
            await cluster.close()
    result = {"timings": timings.__dict__, "commits": commits, "failover": failover}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"3-member group, loopback, timings: election {timings.election_min_s}-{timings.election_max_s} s, "
        f"append {timings.append_period_s} s, fallback {timings.leader_fallback_s} s, "
        f"batch={timings.batch_appends}"
    )
    print(f"{'proposers':>9} {'mode':>7} {'commits/s':>10} {'median ms':>10} {'p99 ms':>8}")
    for c in commits:
        for mode in ("raw", "bridge"):
            f = c[mode]
            print(
                f"{c['concurrency']:>9} {mode:>7} {f['commits_per_s']:>10.0f} {f['median_ms']:>10.2f} "
                f"{f['p99_ms']:>8.2f}"
            )
        print(
            f"{c['concurrency']:>9} {'ratio':>7} {c['ratio_commits_per_s']:>10.2f} "
            f"{c['ratio_median_latency']:>10.2f} {c['ratio_p99_latency']:>8.2f}"
            "   (bridge / raw; goal commits/s >= 0.7)"
        )
    f = failover
    print(
        f"failover over {f['trials']} leader kills: new leader median {f['elected_median_s']:.3f} s, "
        f"max {f['elected_max_s']:.3f} s = {f['ratio_median']:.2f} / {f['ratio_max']:.2f} x election_max_s "
        f"({f['election_max_s']} s; goal median <= 1.5); "
        f"first commit median {f['committed_median_s']:.3f} s, "
        f"max {f['committed_max_s']:.3f} s"
    )
    print(f"  per trial: {f['elected_all_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
