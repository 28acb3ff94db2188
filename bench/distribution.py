"""Distribution benchmark: registry-style pulls from the origin vs the fleetmesh swarm.

Both run in this one process on loopback with real nodes (grpc.aio, mTLS),
the same real model and the same per-node upload cap, side by side:

  (a) origin-only: every node fetches every chunk from the origin, as devices
      pulling from a model registry would;
  (b) swarm: nodes fetch from each other (rarest first, same site first) and
      fall back to the origin only for chunks no peer has.

Node stores live on tmpfs (/dev/shm): 30 nodes share this machine's one disk,
whose fsync latency would otherwise dominate. For each it prints origin egress /
model size, completion time of the last node / (model size / upload cap) (the
time one upload link needs to send one copy: no distribution can beat it), and
total bytes moved / (nodes x model size) (the minimum: every node needs every
byte once). Goals for the swarm: origin egress <= 1.2x, last-node completion
<= 3x, total bytes <= 1.05x.

    python bench/distribution.py                          # 30 nodes, hand_landmark_full (5.5 MB), 1 MB/s cap
    python bench/distribution.py --nodes 20 --upload-cap-mb 2 --model pose_landmark_full
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mesh.artifacts.publish import publish
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.membership.config import MembershipConfig
from mesh.node.config import NodeConfig, TransferSection
from mesh.node.local import LocalCluster, LocalFleet, wait_for

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.models import mediapipe_model  # noqa: E402

# LAN-default structure at twice the speed (as bench/membership.py): holdings still
# spread in a fraction of a second, without 30 nodes' probes eating the CPU.
BENCH_TIMINGS = MembershipConfig(probe_interval_s=0.5, probe_timeout_s=0.25, gossip_interval_s=0.1,
                                 push_pull_interval_s=10.0)


class CappedCluster(LocalCluster):
    """Every node with the same upload cap; `origin_only` turns the swarm into the baseline."""

    def __init__(self, *args, upload_cap: int, origin_only: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.upload_cap = upload_cap
        self.origin_only = origin_only

    def config(self, node_id: str, *, site: str, seeds: list[str], **pools) -> NodeConfig:
        base = super().config(node_id, site=site, seeds=seeds, **pools)
        # The baseline: every device pulls from the origin, which serves whoever asks (a registry).
        baseline = dict(sources="origin", origin_refusals=0) if self.origin_only else {}
        transfer = TransferSection(upload_rate_bytes_per_s=self.upload_cap, max_uploads=4,
                                   max_in_flight_per_peer=2, request_timeout_s=60.0, **baseline)
        return base.model_copy(update={"transfer": transfer})


async def run_one(fleet: LocalFleet, workdir: Path, *, nodes: int, model: Path, upload_cap: int,
                  origin_only: bool) -> dict:
    cluster = CappedCluster(fleet, workdir, BENCH_TIMINGS, seed=7, upload_cap=upload_cap,
                            origin_only=origin_only)
    try:
        await cluster.start(nodes, sites=3)
        await wait_for(cluster.converged, 60.0, what=f"{nodes}-node convergence")
        origin = cluster.nodes["node-00"]
        key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
        signed = publish(model, name="bench", version="1", key=key, store=origin.store)
        manifest = signed.manifest
        t0 = time.perf_counter()
        origin.distributor.add_published(signed)
        await wait_for(lambda: all(n.store.is_complete(manifest) for n in cluster.nodes.values()),
                       600.0, interval_s=0.05, what="every node complete")
        last_s = time.perf_counter() - t0
        served = {i: n.transfer.counters.bytes_served for i, n in cluster.nodes.items()}
        return {"size": manifest.size_bytes, "chunks": len(manifest.chunks), "origin": served["node-00"],
                "total": sum(served.values()), "last_s": last_s, "receivers": nodes - 1}
    finally:
        await cluster.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--model", default="hand_landmark_full", help="a mediapipe model name (make models)")
    # 1 MB/s (8 Mbit/s) is a plausible device uplink, and low enough that 30 nodes sharing
    # this machine's 2 cores are limited by their caps, not by the CPU (measured: at 4 MB/s
    # the one process ran at full CPU and the ratio measured the machine, not the protocol).
    parser.add_argument("--upload-cap-mb", type=float, default=1.0, help="per-node upload cap, MB/s")
    parser.add_argument("--only", choices=["origin-only", "swarm"],
                        help="run one side (profiling); no ratios")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cap = int(args.upload_cap_mb * 1_000_000)
    model = mediapipe_model(args.model)

    async def both():
        # Thirty "devices" here share one disk and one thread pool; their stores go on
        # tmpfs so that fsync latency of this shared disk does not pass for network time.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            fleet = LocalFleet(Path(tmp) / "fleet")
            out = {}
            for label, origin_only in (("origin-only", True), ("swarm", False)):
                if args.only and label != args.only:
                    continue
                print(f"{label}: {args.nodes} nodes...", file=sys.stderr, flush=True)
                out[label] = await run_one(fleet, Path(tmp) / label, nodes=args.nodes, model=model,
                                           upload_cap=cap, origin_only=origin_only)
            return out

    results = asyncio.run(both())
    any_result = next(iter(results.values()))
    size = any_result["size"]
    bound_s = size / cap
    print(f"model {args.model}: {size:,} bytes in {any_result['chunks']} chunks; {args.nodes} nodes "
          f"({args.nodes - 1} receivers); upload cap {cap:,} B/s per node; lower bound {bound_s:.2f}s")
    print(f"{'':>12} {'origin egress/size':>19} {'last node s':>12} {'last/bound':>11} {'total/min':>10}")
    for label, r in results.items():
        minimum = r["receivers"] * size
        print(f"{label:>12} {r['origin'] / size:>19.2f} {r['last_s']:>12.2f} {r['last_s'] / bound_s:>11.2f} "
              f"{r['total'] / minimum:>10.3f}")
    if args.only:
        return 0
    swarm, base = results["swarm"], results["origin-only"]
    print(f"swarm vs origin-only: origin egress x{swarm['origin'] / base['origin']:.3f}, "
          f"last-node time x{swarm['last_s'] / base['last_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
