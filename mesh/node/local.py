"""Real nodes in one process on loopback, for tests and benchmarks.

Each node is a full `Node` (grpc.aio server with mTLS, its own certificate,
the real membership loop); they only share the event loop. Node processes
(for SIGKILL/SIGSTOP) are started by `spawn_node_process`.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mesh.identity.ca import Credentials, enroll, init_fleet, load_credentials
from mesh.membership.config import MembershipConfig
from mesh.membership.messages import State
from mesh.node.config import MembershipSection, NodeConfig, TlsSection
from mesh.node.runtime import Node

# SWIM timings for loopback clusters in tests and benchmarks: the LAN
# defaults' structure, five times faster.
FAST_TIMINGS = MembershipConfig(probe_interval_s=0.2, probe_timeout_s=0.1, gossip_interval_s=0.05,
                                push_pull_interval_s=2.0, gossip_to_dead_s=10.0)

# A dozen nodes or more share one process (and a loaded machine): SWIM with room for scheduling delays,
# so a busy event loop is not taken for a dead peer, and with little idle work. With FAST_TIMINGS, twenty
# rollout nodes took more than the one core a Python process gets, and beside `stress-ng --cpu 2` members
# flapped dead (with FLEET_RAFT, the module's CPU time went from 210 s to 91 s); twelve sites-mode nodes
# lost representatives mid-download, so a plain device fetched across sites.
FLEET_TIMINGS = MembershipConfig(
    probe_interval_s=1.0,
    probe_timeout_s=0.5,
    gossip_interval_s=0.2,
    push_pull_interval_s=5.0,
    gossip_to_dead_s=20.0,
)

SITES = ("amsterdam", "berlin", "chicago", "denver", "essen", "fresno")


def site_name(j: int) -> str:
    """The j-th site of a local cluster: a city for the first few, then site-06, site-07, ..."""
    return SITES[j] if j < len(SITES) else f"site-{j:02d}"


class LocalFleet:
    """A fleet CA in a directory, enrolling node certificates on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.fleet = init_fleet(self.directory, fleet_id="test", force=True)
        self.operator = load_credentials(self.directory / "operators" / "admin")
        self._nodes: dict[str, Credentials] = {}

    def node_credentials(self, node_id: str) -> Credentials:
        if node_id not in self._nodes:
            self._nodes[node_id] = enroll(self.directory, node_id, force=True)
        return self._nodes[node_id]


class LocalCluster:
    """In-process nodes sharing one event loop. Node i has id `node-{i:02d}`."""

    def __init__(self, fleet: LocalFleet, workdir: Path, timings: MembershipConfig, *, seed: int = 0,
                 sections: dict[str, Any] | None = None, pools: str = "flat",
                 representatives: int | None = None) -> None:
        """`sections`: extra config sections for every node, e.g. {"inference": {"model": "hand"}}.
        `pools="sites"`: each site its own gossip pool, joined by the federation pool (a node seeds
        from the first node of its site, and from the first node of every other site for the
        federation)."""
        self.sections = sections or {}
        self.pools_mode = pools
        self.representatives = representatives
        self.fleet = fleet
        self.workdir = Path(workdir)
        self.timings = timings
        self.seed = seed
        self.nodes: dict[str, Node] = {}

    @property
    def pools(self) -> dict[str, Any]:
        """This cluster's pool settings for a node's [membership] (federation seeds added per node)."""
        if self.pools_mode == "flat":
            return {}
        extra: dict[str, Any] = {"pools": self.pools_mode}
        if self.representatives is not None:
            extra["representatives"] = self.representatives
        return extra

    def config(self, node_id: str, *, site: str, seeds: list[str], federation_seeds: list[str] | None = None,
               sections: dict[str, Any] | None = None) -> NodeConfig:
        creds = self.fleet.node_credentials(node_id)
        return NodeConfig(
            node_id=node_id, listen="127.0.0.1:0", seeds=seeds, labels={"site": site},
            data_dir=self.workdir / node_id, tls=TlsSection(dir=creds.directory),
            membership=MembershipSection.from_core(
                self.timings, **self.pools,
                **({"federation_seeds": federation_seeds} if federation_seeds else {})),
            **(self.sections | (sections or {})))

    def site_of(self, node_id: str) -> str:
        return self.nodes[node_id].config.labels.get("site", "")

    async def start(self, n: int, sites: int = 1) -> LocalCluster:
        """Start n nodes; every node seeds from the first, as a site gateway would be configured."""
        for i in range(n):
            await self.add(f"node-{i:02d}", site=site_name(i % sites))
        return self

    async def add(self, node_id: str, *, site: str = SITES[0], seeds: list[str] | None = None,
                  federation_seeds: list[str] | None = None, sections: dict[str, Any] | None = None) -> Node:
        """`seeds` and `federation_seeds` default to the first running node of this site and of
        every other site; `sections`: config sections for this node only (over the cluster's)."""
        if self.pools_mode == "sites":
            firsts: dict[str, str] = {}  # site -> address of its first running node
            for other_id, other in self.nodes.items():
                firsts.setdefault(self.site_of(other_id), other.address)
            if seeds is None:
                seeds = [firsts[site]] if site in firsts else []
            if federation_seeds is None:
                federation_seeds = [address for other_site, address in firsts.items() if other_site != site]
        elif seeds is None:
            seeds = [next(iter(self.nodes.values())).address] if self.nodes else []
        rng = random.Random(f"{self.seed}-{node_id}")
        sites_mode = {"federation_seeds": federation_seeds or []} if self.pools_mode == "sites" else {}
        node = Node(self.config(node_id, site=site, seeds=seeds, sections=sections, **sites_mode), rng=rng,
                    serve_metrics=False)
        await node.start()
        self.nodes[node_id] = node
        return node

    def views(self, among: list[str] | None = None) -> dict[str, dict[str, State]]:
        """node id -> (member id -> state), for running nodes (or `among`)."""
        ids = among if among is not None else list(self.nodes)
        return {i: {m.node_id: m.state for m in self.nodes[i].membership.members()} for i in ids}

    def converged(self, ids: list[str] | None = None) -> bool:
        """Every node in `ids` sees exactly the nodes in `ids` alive."""
        ids = ids if ids is not None else list(self.nodes)
        want = set(ids)
        for view in self.views(ids).values():
            if {m for m, s in view.items() if s is State.ALIVE} != want:
                return False
        return True

    def settled(self) -> bool:
        """Flat: `converged()`. Sites mode: every node sees its whole site alive, every site has a
        representative in the federation, and every representative sees all of them there."""
        if self.pools_mode == "flat":
            return self.converged()
        sites: dict[str, set[str]] = {}
        for node_id in self.nodes:
            sites.setdefault(self.site_of(node_id), set()).add(node_id)
        reps = {i for i, n in self.nodes.items() if n.federation is not None and n.federation.active}
        if {self.site_of(i) for i in reps} != set(sites):
            return False
        for node_id, node in self.nodes.items():
            alive = {m.node_id for m in node.membership.members() if m.state is State.ALIVE}
            if not sites[self.site_of(node_id)] <= alive:
                return False
            fed = node.federation.view() if node_id in reps and node.federation is not None else None
            if fed is not None and {m.node_id for m in fed.members() if m.state is State.ALIVE} != reps:
                return False
        return True

    def bytes_sent(self) -> tuple[int, int]:
        """(membership bytes sent, of which push-pull) by every running node, both pools."""
        out = push_pull = 0
        for node in self.nodes.values():
            runners = [node.runner]
            if node.federation is not None and node.federation.runner is not None:
                runners.append(node.federation.runner)
            out += sum(r.counters.bytes_out for r in runners)
            push_pull += sum(r.counters.push_pull_bytes_out for r in runners)
            if node.federation is not None:  # federation runners it ran before its current one
                out += node.federation.retired_bytes_out
                push_pull += node.federation.retired_push_pull_bytes_out
        return out, push_pull

    async def stop(self, node_id: str, *, leave: bool = True) -> None:
        await self.nodes.pop(node_id).stop(leave=leave)

    async def close(self) -> None:
        nodes, self.nodes = list(self.nodes.values()), {}
        await asyncio.gather(*(n.stop(leave=False) for n in nodes), return_exceptions=True)


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str = "condition", *,
                   interval_s: float = 0.02) -> float:
    """Poll `predicate` until true; return the seconds it took. Raises TimeoutError naming `what`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout_s:
            raise TimeoutError(f"{what} not reached within {timeout_s:.1f}s")
        await asyncio.sleep(interval_s)
    return loop.time() - start


def poll_until(predicate: Callable[[], bool], timeout_s: float, what: str = "condition", *,
               check: Callable[[], None] | None = None, interval_s: float = 0.05) -> float:
    """The blocking twin of `wait_for`, for tests that drive node processes: poll `predicate`
    until true and return the seconds it took. `check` runs every round and may raise to stop
    early (a node process that died). Raises TimeoutError naming `what`."""
    start = time.monotonic()
    while not predicate():
        if check is not None:
            check()
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what} not reached within {timeout_s:.1f}s")
        time.sleep(interval_s)
    return time.monotonic() - start


def free_address() -> str:
    """A loopback host:port the kernel says is free now."""
    return f"127.0.0.1:{free_ports(1)[0]}"


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now (bound once, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def write_node_config(path: Path, *, node_id: str, address: str, seeds: list[str], site: str,
                      tls_dir: Path, data_dir: Path, timings: MembershipConfig,
                      metrics_listen: str | None = None, log_level: str = "info",
                      transfer: dict[str, object] | None = None,
                      inference: dict[str, object] | None = None,
                      raft: dict[str, object] | None = None,
                      guard: dict[str, dict[str, object]] | None = None,
                      streams: list[str] | None = None) -> None:
    """Write a node.toml as an operator would (strings quoted as JSON, which TOML accepts).

    Paths are written absolute: the config loader reads relative paths as
    relative to the file, not to the directory the caller happens to be in.
    """
    q = json.dumps
    data_dir, tls_dir = Path(data_dir).resolve(), Path(tls_dir).resolve()
    lines = [f"node_id = {q(node_id)}", f"listen = {q(address)}",
             "streams = [" + ", ".join(q(s) for s in streams or ()) + "]",
             "seeds = [" + ", ".join(q(s) for s in seeds) + "]",
             f"data_dir = {q(str(data_dir))}", f"log_level = {q(log_level)}"]
    if metrics_listen:
        lines.append(f"metrics_listen = {q(metrics_listen)}")
    lines += ["", "[labels]", f"site = {q(site)}", 'device_class = "camera"', "",
              "[tls]", f"dir = {q(str(tls_dir))}", "", "[membership]"]
    # json.dumps spells booleans as TOML does (true/false); numbers are written as they are.
    lines += [f"{name} = {q(value) if isinstance(value := getattr(timings, name), bool) else value}"
              for name in MembershipSection.timing_fields()]
    for section, values in (("transfer", transfer), ("inference", inference), ("raft", raft)):
        if values:
            lines += ["", f"[{section}]"] + [f"{key} = {q(value)}" for key, value in values.items()]
    for kind, limits in (guard or {}).items():
        lines += ["", f"[guard.{kind}]"] + [f"{key} = {q(value)}" for key, value in limits.items()]
    path.write_text("\n".join(lines) + "\n")


def spawn_node_process(config_path: Path, log_path: Path) -> subprocess.Popen:
    """Run `mesh node --config` as a separate process (for SIGKILL/SIGSTOP tests)."""
    log = log_path.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "mesh", "node", "--config", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()
