"""`mesh demo`: a real fleet of node processes on loopback, narrated.

Each node is a separate `mesh node` process with its own certificate (mTLS
on), exactly as on a device; the demo only writes their config files and
watches them through the admin client, as an operator would.

Acts: membership converges; a real model (mediapipe's hand landmarks) spreads
peer to peer; every device serves its model ("mlp", a small float32 network) and
answers `mesh infer`; canary rollouts while traffic flows on every device: a
good version goes 1% -> 10%, is held above the autonomous scope, approved and
completes, then a bad version (NaN on a share of inputs) rolls itself back at
the first wave; a killed node is detected; its streams move by a decision the
guard holds for an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from mesh.admin.client import AdminClient, AdminError
from mesh.admin.format import status_table
from mesh.identity.ca import enroll, init_fleet, load_credentials
from mesh.membership.config import MembershipConfig
from mesh.membership.messages import State
from mesh.node.local import free_ports, spawn_node_process, write_node_config

if TYPE_CHECKING:
    from mesh._proto import admin_pb2

# Faster than the LAN defaults so the demo takes seconds, same ratios.
DEMO_TIMINGS = MembershipConfig(probe_interval_s=0.5, probe_timeout_s=0.2, gossip_interval_s=0.1,
                                push_pull_interval_s=5.0)
SITES = ("amsterdam", "berlin", "chicago", "denver", "essen", "fresno", "geneva", "houston",
         "istanbul", "jakarta", "kyoto", "lima", "madrid", "nairobi", "oslo", "paris")


# The site may move one stream on its own; anything bigger waits for an operator.
DEMO_GUARD: dict[str, dict[str, object]] = {
    "reassign_streams": {"max_streams": 1, "max_nodes": 2, "max_fraction": 0.5},
}
# The model every device serves, in the rollout acts: the partly-NaN fixture's input and output
# (so traffic decides the bad version's error rate), ~70 KB.
SERVED_MODEL = "mlp"
SERVED_LAYERS = (8, 128, 128, 2)
ROLLOUT_SOAK = "3s"
# A site with no device in a wave's cohort judges it on another site's evidence, which exists only once
# that site's own soak is over and reaches it by gossip: the default deadline (twice the soak) leaves 3 s
# of slack for both at a 3 s soak, and a site that misses it pauses (gate_stalled) instead of waiting.
ROLLOUT_DEADLINE = "20s"
TRAFFIC_RATE_PER_NODE_S = 5.0
BAD_INPUT_SHARE = 0.3


class DemoFailed(Exception):
    """The demo did not see what it expected; the message says what and where the logs are."""


@dataclass
class DemoNode:
    node_id: str
    site: str
    address: str
    config: Path
    log: Path
    process: subprocess.Popen | None = None


def views(clients: dict[str, AdminClient]) -> dict[str, dict[str, State]]:
    """node id -> (member id -> state) for every node that answers."""
    out = {}
    for node_id, client in clients.items():
        with contextlib.suppress(AdminError):
            out[node_id] = {m.node_id: State(m.state) for m in client.status().members}
    return out


def run_demo(*, nodes: int, sites: int, workdir: Path, base_port: int | None = None,
             console: Console | None = None, timings: MembershipConfig = DEMO_TIMINGS,
             model: Path | None = None) -> None:
    console = console or Console()
    model = model or demo_model()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    fleet_dir = workdir / "fleet"
    fleet = init_fleet(fleet_dir, fleet_id="demo")
    operator = load_credentials(fleet_dir / "operators" / "admin")
    enroll(fleet_dir, "demo-client")  # an application on a device calling Infer
    ports = list(range(base_port, base_port + nodes)) if base_port else free_ports(nodes)
    site_names = SITES[:sites]
    fleet_nodes: list[DemoNode] = []
    for i in range(nodes):
        node_id = f"node-{i:02d}"
        site = site_names[i % sites]
        creds = enroll(fleet_dir, node_id)
        address = f"127.0.0.1:{ports[i]}"
        config = workdir / f"{node_id}.toml"
        fleet_nodes.append(DemoNode(node_id, site, address, config, workdir / "logs" / f"{node_id}.log"))
        # Every node knows the first node of each site as seeds, as a site's
        # gateways would be configured on real devices.
        seeds = [f"127.0.0.1:{ports[s]}" for s in range(min(sites, nodes)) if s != i]
        site_members = [f"node-{j:02d}" for j in range(nodes) if j % sites == i % sites]
        write_node_config(config, node_id=node_id, address=address, seeds=seeds, site=site,
                          tls_dir=creds.directory, data_dir=workdir / "data" / node_id, timings=timings,
                          inference={"model": SERVED_MODEL, "workers": 1},
                          raft={"members": site_members},
                          guard=DEMO_GUARD, streams=[f"cam-{i:02d}a", f"cam-{i:02d}b"])
    (workdir / "logs").mkdir()

    console.rule("[bold]fleetmesh demo: membership")
    console.print(f"fleet [bold]{fleet.fleet_id}[/]: CA and keys in {fleet_dir}; "
                  f"{nodes} nodes in {sites} sites ({', '.join(site_names)}), mTLS on every link")
    console.print(f"SWIM timings: probe every {timings.probe_interval_s}s, "
                  f"timeout {timings.probe_timeout_s}s, "
                  f"{timings.indirect_checks} indirect checks, gossip every {timings.gossip_interval_s}s "
                  f"to {timings.gossip_nodes} peers")
    clients = {n.node_id: AdminClient(n.address, operator, timeout_s=1.0) for n in fleet_nodes}
    try:
        for n in fleet_nodes:
            n.process = spawn_node_process(n.config, n.log)
        _converge(fleet_nodes, clients, console, workdir)
        _distribute(fleet_nodes, clients, console, workdir, fleet_dir, model, "1.0")
        first = _served_model(workdir, "1.0", seed=1)
        _distribute(fleet_nodes, clients, console, workdir, fleet_dir, first, "1.0", name=SERVED_MODEL)
        _serve(fleet_nodes, clients, console, workdir, fleet_dir, "1.0")
        _rollouts(fleet_nodes, clients, console, workdir, fleet_dir)
        victim = _kill_and_detect(fleet_nodes, clients, console, workdir, timings)
        _held_and_approved(fleet_nodes, victim, console, workdir, fleet_dir)
        _shutdown(fleet_nodes, console, workdir)
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
        for n in fleet_nodes:
            if n.process and n.process.poll() is None:
                n.process.kill()
                n.process.wait()
    console.rule("[bold green]demo finished")


def _converge(fleet_nodes, clients, console, workdir) -> None:
    ids = {n.node_id for n in fleet_nodes}
    start = time.monotonic()
    deadline = start + 60
    with console.status("waiting for every node to see every other node alive...") as status:
        while True:
            seen = views(clients)
            done = [v for v in seen.values() if set(v) >= ids and all(v[i] is State.ALIVE for i in ids)]
            status.update(f"{len(seen)}/{len(ids)} nodes answering, {len(done)} with a complete view")
            if len(done) == len(ids):
                break
            for n in fleet_nodes:
                if n.process.poll() is not None:
                    raise DemoFailed(f"{n.node_id} exited with {n.process.returncode}; see {n.log}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"membership did not converge in 60 s; logs in {workdir / 'logs'}")
            time.sleep(0.2)
    console.print(f"[green]converged[/]: all {len(ids)} nodes see all {len(ids)} alive "
                  f"after {time.monotonic() - start:.1f}s")
    console.print(status_table(clients[fleet_nodes[0].node_id].status()))


def demo_model() -> Path:
    """The real model the demo spreads: mediapipe's hand landmark model (5.5 MB, from
    `make models`), else a wake-word model shipped in pymicro-wakeword."""
    cached = Path(".cache/models/mediapipe/hand_landmark_full.tflite")
    if cached.exists():
        return cached
    try:
        import pymicro_wakeword
    except ImportError:
        raise DemoFailed("no model to distribute: run `make models` (or pass --model FILE.tflite)") from None
    return Path(pymicro_wakeword.__file__).parent / "models" / "okay_nabu.tflite"


def model_name(model: Path) -> str:
    return model.stem.replace("_", "-")


def _distribute(fleet_nodes, clients, console, workdir, fleet_dir: Path, model: Path, version: str,
                name: str | None = None) -> dict:
    """Publish `model` at the first node and wait until every node holds it, verified."""
    origin = fleet_nodes[0]
    name = name or model_name(model)
    console.print(f"\n[bold]distribution[/]: publishing {model.name} ({model.stat().st_size:,} bytes) "
                  f"as {name} {version} at {origin.node_id}, signed with the fleet's publisher key")
    publish = subprocess.run(
        [sys.executable, "-m", "mesh", "model", "publish", str(model), "--name", name, "--version", version,
         "--key", str(fleet_dir / "publisher.key"), "--data-dir", str(workdir / "data" / origin.node_id)],
        capture_output=True, text=True)
    if publish.returncode != 0:
        raise DemoFailed(f"mesh model publish failed: {publish.stderr.strip()}")
    console.print("  " + " ".join(publish.stdout.split()))
    start = time.monotonic()
    rows: dict[str, admin_pb2.ModelVersion] = {}
    with console.status("peers fetch chunks from each other...") as status:
        while True:
            for n in fleet_nodes:
                with contextlib.suppress(AdminError, StopIteration):
                    rows[n.node_id] = next(v for v in clients[n.node_id].models().versions
                                           if (v.name, v.version) == (name, version))
            done = [r for r in rows.values() if r.phase == "complete"]
            status.update(f"{len(done)}/{len(fleet_nodes)} nodes hold the complete model")
            if len(done) == len(fleet_nodes):
                break
            failed = [f"{i}: {r.error}" for i, r in rows.items() if r.phase == "failed"]
            if failed or time.monotonic() - start > 120:
                raise DemoFailed(f"distribution did not complete ({'; '.join(failed) or 'timeout'}); "
                                 f"logs in {workdir / 'logs'}")
            time.sleep(0.2)
    size = rows[origin.node_id].size_bytes
    origin_sent = rows[origin.node_id].bytes_uploaded
    peers_sent = sum(r.bytes_uploaded for i, r in rows.items() if i != origin.node_id)
    console.print(f"[green]distributed[/]: all {len(fleet_nodes)} nodes verified {name} {version} "
                  f"(SHA-256 of every chunk and of the whole file) after {time.monotonic() - start:.1f}s; "
                  f"the origin sent {origin_sent / size:.2f} copies, peers sent each other "
                  f"{peers_sent / size:.2f} copies (a registry would have sent {len(fleet_nodes) - 1})")
    return rows


def _serve(fleet_nodes, clients, console, workdir, fleet_dir: Path, version: str) -> None:
    """Wait until every node serves `version`, then smoke-test one node per site with `mesh infer`."""
    start = time.monotonic()
    with console.status(f"every node verifies and activates {version}..."):
        while True:
            serving = {}
            for n in fleet_nodes:
                with contextlib.suppress(AdminError):
                    serving[n.node_id] = clients[n.node_id].inference()
            if len(serving) == len(fleet_nodes) and all(
                    s.active_version == version for s in serving.values()):
                break
            errors = [f"{i}: {s.last_activation_error}"
                      for i, s in serving.items() if s.last_activation_error]
            if errors or time.monotonic() - start > 60:
                raise DemoFailed(f"activation of {version} failed ({'; '.join(errors) or 'timeout'}); "
                                 f"logs in {workdir / 'logs'}")
            time.sleep(0.2)
    some = next(iter(serving.values()))
    console.print(f"[green]serving[/]: all {len(fleet_nodes)} nodes run {some.model} {version} on "
                  f"{some.backend} {some.backend_version} (validated before the swap)")
    seen_sites = set()
    for n in fleet_nodes:
        if n.site in seen_sites:
            continue
        seen_sites.add(n.site)
        result = subprocess.run(
            [sys.executable, "-m", "mesh", "infer", "--node", n.address, "--count", "5",
             "--creds", str(fleet_dir / "nodes" / "demo-client"),
             "--admin-creds", str(fleet_dir / "operators" / "admin")],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise DemoFailed(f"mesh infer against {n.node_id} failed: {result.stderr.strip()}")
        console.print(f"  $ mesh infer --node {n.address} --count 5   ({n.site})\n  "
                      + " ".join(result.stdout.split()))


def _served_model(workdir: Path, version: str, *, seed: int, bad: bool = False) -> Path:
    """A version of the served model: a float32 MLP, or (bad) the same network that answers NaN when an
    input's first value is below -1, which activation's validation inputs never are."""
    from mesh.inference.fixtures import mlp_model, partly_nan_model

    path = workdir / "models" / version / f"{SERVED_MODEL}.tflite"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        partly_nan_model(SERVED_LAYERS, seed=seed) if bad else mlp_model(SERVED_LAYERS, seed=seed)
    )
    return path


@dataclass
class DemoTraffic:
    """Infer against every node from a thread of its own (an application on each device), a share of the
    inputs "bad" (first value below -1): the good versions answer them, the bad one answers NaN."""

    nodes: list[DemoNode]
    client_creds: Path
    rate_per_node_s: float = TRAFFIC_RATE_PER_NODE_S
    bad_share: float = BAD_INPUT_SHARE
    answers: dict[str, dict[str, list[int]]] = field(
        default_factory=dict
    )  # node -> version -> [answers, NaN]
    failures: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run()), name="demo-traffic", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def served_by(self, version: str) -> set[str]:
        return {n for n, by in self.answers.items() if by.get(version, [0])[0]}

    def totals(self, version: str) -> tuple[int, int]:
        return (
            sum(by.get(version, [0, 0])[0] for by in self.answers.values()),
            sum(by.get(version, [0, 0])[1] for by in self.answers.values()),
        )

    async def _run(self) -> None:
        await asyncio.gather(*(self._drive(n) for n in self.nodes))

    async def _drive(self, node: DemoNode) -> None:
        import grpc
        import numpy as np

        from mesh._proto import inference_pb2, inference_pb2_grpc
        from mesh.identity.ca import load_credentials
        from mesh.identity.tls import channel_credentials, secure_channel_options
        from mesh.inference.fixtures import partly_nan_input

        rng = np.random.default_rng(abs(hash(node.node_id)) % 2**32)
        creds = channel_credentials(load_credentials(self.client_creds))
        counts = self.answers.setdefault(node.node_id, {})
        async with grpc.aio.secure_channel(
            node.address, creds, options=secure_channel_options(peer_id=node.node_id)
        ) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not self._stop.is_set():
                x = partly_nan_input(SERVED_LAYERS[0], bad=bool(rng.random() < self.bad_share), rng=rng)
                request = inference_pb2.InferRequest(
                    inputs=[
                        inference_pb2.Tensor(
                            name="input", dtype="float32", shape=list(x.shape), data=x.tobytes()
                        )
                    ]
                )
                try:
                    reply = await stub.Infer(request, timeout=5.0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:  # a node being killed is not a failure
                        self.failures += 1
                else:
                    out = np.frombuffer(reply.outputs[0].data, dtype=np.float32)
                    c = counts.setdefault(reply.version, [0, 0])
                    c[0] += 1
                    c[1] += int(not np.isfinite(out).all())
                await asyncio.sleep(1.0 / self.rate_per_node_s)


def _serving_versions(fleet_nodes, clients) -> dict[str, str]:
    out = {}
    for n in fleet_nodes:
        with contextlib.suppress(AdminError):  # a node that does not answer serves nothing we can see
            out[n.node_id] = clients[n.node_id].inference().active_version
    return out


def _rollout_report(entry: DemoNode, creds: str, rollout_id: str) -> dict:
    result = _mesh("rollout", "status", rollout_id, "--node", entry.address, "--creds", creds, "--json")
    return json.loads(result.stdout) if result.returncode == 0 else {}


def _wait_rollout(
    entry: DemoNode,
    creds: str,
    rollout_id: str,
    states: set[str],
    what: str,
    workdir: Path,
    console,
    timeout_s: float = 90.0,
) -> dict:
    """Poll `mesh rollout status` until every site's state is in `states`, showing the waves."""
    start = time.monotonic()
    with console.status(what) as status:
        while True:
            report = _rollout_report(entry, creds, rollout_id)
            sites = report.get("sites", [])
            if sites and all(s["state"] in states for s in sites):
                return report
            if report:
                status.update(
                    f"{what} "
                    + ", ".join(
                        f"{s['site']} {s['state']}" + (f" w{s['wave']}" if s["wave"] else "") for s in sites
                    )
                )
            if time.monotonic() - start > timeout_s:
                raise DemoFailed(
                    f"rollout {rollout_id} did not reach {sorted(states)} in {timeout_s:.0f} s "
                    f"({[(s['site'], s['state']) for s in sites]}); logs in {workdir / 'logs'}"
                )
            time.sleep(0.3)


def _rollouts(fleet_nodes, clients, console, workdir, fleet_dir: Path) -> None:
    """A good version canaried wave by wave, held above the autonomous scope and approved; then a bad one
    that rolls itself back at its first wave, both while traffic flows on every device."""
    entry = fleet_nodes[0]
    creds = str(fleet_dir / "operators" / "admin")
    node = ["--node", entry.address, "--creds", creds]
    traffic = DemoTraffic(fleet_nodes, fleet_dir / "nodes" / "demo-client")
    traffic.start()
    try:
        console.print(
            f"\n[bold]canary rollout[/]: traffic on all {len(fleet_nodes)} devices "
            f"({TRAFFIC_RATE_PER_NODE_S:g} requests/s each, {BAD_INPUT_SHARE:.0%} of inputs unusual); "
            f"{SERVED_MODEL} 2.0 published, and served by nobody until a rollout says so"
        )
        _distribute(
            fleet_nodes,
            clients,
            console,
            workdir,
            fleet_dir,
            _served_model(workdir, "2.0", seed=2),
            "2.0",
            name=SERVED_MODEL,
        )
        start = [
            "rollout",
            "start",
            SERVED_MODEL,
            "2.0",
            "--id",
            "mlp-2",
            "--waves",
            "1,10,100",
            "--soak",
            ROLLOUT_SOAK,
            "--deadline",
            ROLLOUT_DEADLINE,
            "--min-requests",
            "8",
            "--key",
            str(fleet_dir / "publisher.key"),
            *node,
        ]
        console.print(
            f"  $ mesh {' '.join(start[:-4])} --node {entry.address}", highlight=False, soft_wrap=True
        )
        started = _mesh(*start)
        if started.returncode != 0:
            raise DemoFailed(f"mesh rollout start failed: {started.stderr.strip()}")
        for line in started.stdout.strip().splitlines():
            console.print("  " + line.strip(), highlight=False, soft_wrap=True)
        report = _wait_rollout(
            entry, creds, "mlp-2", {"waiting_approval"}, "waves 1% and 10% soak...", workdir, console
        )
        on_target = [n for n, v in _serving_versions(fleet_nodes, clients).items() if v == "2.0"]
        waves = report["waves"]
        console.print(
            f"[green]passed[/] wave 1 ({waves[0]['share']}: {waves[0]['in_cohort']} device) and wave 2 "
            f"({waves[1]['share']}: {waves[1]['in_cohort']} device(s)), "
            f"{waves[1]['requests'] or 0} requests, "
            f"errors {waves[1]['error_rate'] or 0:.2%}; [yellow]held[/]: wave 3 (100%) is above the "
            f"autonomous scope of {report['autonomous_share']}. On 2.0: {', '.join(sorted(on_target))}"
        )
        pending = _mesh("admin", "pending", *node)
        console.print(f"  $ mesh admin pending --node {entry.address}")
        for line in pending.stdout.splitlines():
            if "rollout" in line or "approve:" in line:
                console.print("  " + line.strip(), highlight=False, soft_wrap=True)
        approve = _mesh(
            "rollout",
            "approve",
            "mlp-2",
            "--wave",
            "3",
            "--key",
            str(fleet_dir / "operator.key"),
            "--reason",
            "demo: canary looks good",
            *node,
        )
        console.print(
            f"  $ mesh rollout approve mlp-2 --wave 3 --key {fleet_dir / 'operator.key'} "
            f"--node {entry.address}",
            highlight=False,
            soft_wrap=True,
        )
        if approve.returncode != 0:
            raise DemoFailed(f"approval failed: {approve.stderr.strip() or approve.stdout.strip()}")
        report = _wait_rollout(
            entry, creds, "mlp-2", {"completed"}, "wave 3 (100%) soaks...", workdir, console
        )
        serving = _serving_versions(fleet_nodes, clients)
        console.print(
            f"[green]completed[/] in every site: {sum(v == '2.0' for v in serving.values())}/"
            f"{len(fleet_nodes)} devices serve 2.0 (one approval, signed once, verified by each site)"
        )
        table = _mesh("rollout", "status", "mlp-2", *node)
        console.print(
            "\n".join("  " + line for line in table.stdout.rstrip().splitlines()),
            highlight=False,
            soft_wrap=True,
        )

        console.print(
            f"\n[bold]a bad version[/]: {SERVED_MODEL} 3.0 passes activation's validation but answers NaN on "
            f"unusual inputs ({BAD_INPUT_SHARE:.0%} of this traffic)"
        )
        _distribute(
            fleet_nodes,
            clients,
            console,
            workdir,
            fleet_dir,
            _served_model(workdir, "3.0", seed=3, bad=True),
            "3.0",
            name=SERVED_MODEL,
        )
        failures_before = traffic.failures
        began = time.monotonic()
        started = _mesh(
            "rollout",
            "start",
            SERVED_MODEL,
            "3.0",
            "--id",
            "mlp-3",
            "--soak",
            ROLLOUT_SOAK,
            "--deadline",
            ROLLOUT_DEADLINE,
            "--min-requests",
            "8",
            "--key",
            str(fleet_dir / "publisher.key"),
            *node,
        )
        if started.returncode != 0:
            raise DemoFailed(f"mesh rollout start failed: {started.stderr.strip()}")
        console.print(
            f"  $ mesh rollout start {SERVED_MODEL} 3.0 --id mlp-3 --soak {ROLLOUT_SOAK} ... "
            f"--node {entry.address}",
            highlight=False,
        )
        report = _wait_rollout(
            entry, creds, "mlp-3", {"aborted"}, "wave 1 (1%) serves 3.0...", workdir, console
        )
        deadline = time.monotonic() + 30
        while any(v == "3.0" for v in _serving_versions(fleet_nodes, clients).values()):
            if time.monotonic() > deadline:
                raise DemoFailed(
                    f"a device still serves 3.0 after its rollout was aborted; logs in {workdir / 'logs'}"
                )
            time.sleep(0.1)
        took = time.monotonic() - began
        touched = sorted(traffic.served_by("3.0"))
        answers, nans = traffic.totals("3.0")
        reason = next(
            (s["reason"] for s in report["sites"] if "gate failed" in s["reason"]),
            report["sites"][0]["reason"],
        )
        console.print(f"[red]rolled back[/] by itself {_aborted_at(report)}: {reason}")
        console.print(
            f"  devices touched: {', '.join(touched) or 'none'} ({len(touched)} of {len(fleet_nodes)}); "
            f"they answered {answers} requests, {nans} of them NaN; every device serves 2.0 again "
            f"{took:.1f}s after the rollout started, with {traffic.failures - failures_before} failed "
            f"requests; every site's audit log holds the reason"
        )
    finally:
        traffic.stop()


def _aborted_at(report: dict) -> str:
    """Where each site stopped the rollout, as its report says: one wave for all, or site by site (a wave
    of one device can pass its gate on a lucky draw, and the next wave then stops the version)."""
    waves = {s["site"]: s["wave"] for s in report["sites"] if s["state"] == "aborted"}
    if len(set(waves.values())) == 1:
        return f"at wave {next(iter(waves.values()))} in every site"
    return "in " + ", ".join(f"{site} at wave {wave}" for site, wave in sorted(waves.items()))


def _kill_and_detect(fleet_nodes, clients, console, workdir, timings: MembershipConfig) -> DemoNode:
    victim = fleet_nodes[len(fleet_nodes) // 2]
    survivors = [n for n in fleet_nodes if n is not victim]
    bound_s = timings.detection_bound_s(len(fleet_nodes))
    expected_s = timings.expected_detection_s(len(fleet_nodes))
    console.print(f"\nkilling [bold]{victim.node_id}[/] ({victim.site}) with SIGKILL: no goodbye, "
                  f"peers must notice by themselves (expected ~{expected_s:.1f}s, bound {bound_s:.1f}s)")
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    killed_at = time.monotonic()
    detected: dict[str, float] = {}
    live = {n.node_id: clients[n.node_id] for n in survivors}
    with console.status(f"waiting for every survivor to mark {victim.node_id} dead..."):
        while len(detected) < len(survivors):
            for node_id, state_by_id in views(live).items():
                if node_id not in detected and state_by_id.get(victim.node_id) is State.DEAD:
                    detected[node_id] = time.monotonic() - killed_at
            if time.monotonic() - killed_at > 3 * bound_s:
                missing = sorted(set(live) - set(detected))
                raise DemoFailed(f"{victim.node_id} not marked dead by {missing} after {3 * bound_s:.0f}s; "
                                 f"logs in {workdir / 'logs'}")
            time.sleep(0.1)
    times = sorted(detected.values())
    console.print(f"[green]detected[/]: all {len(survivors)} survivors mark {victim.node_id} dead; "
                  f"first after {times[0]:.1f}s, last after {times[-1]:.1f}s "
                  f"({times[-1] / expected_s:.2f}x expected, bound {bound_s:.1f}s)")
    if times[-1] > bound_s:
        console.print("[yellow]note[/]: slower than the bound; the machine may be loaded "
                      "(the demo's polling adds up to 0.1s per node)")
    return victim


def _mesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True)


def _held_and_approved(fleet_nodes, victim: DemoNode, console, workdir, fleet_dir: Path) -> None:
    """The dead node's streams must move; the guard lets the site move one stream on its own,
    so moving two waits for an operator, who approves it with the admin client."""
    survivor = next(n for n in fleet_nodes if n.site == victim.site and n is not victim)
    creds = str(fleet_dir / "operators" / "admin")
    console.print(f"\n[bold]local decision[/]: {victim.node_id} served 2 camera streams; the {victim.site} "
                  f"Raft group's leader proposes moving them, but the guard allows "
                  f"{DEMO_GUARD['reassign_streams']['max_streams']} stream per autonomous move")
    start = time.monotonic()
    with console.status("waiting for the proposal to be held on every replica..."):
        while True:
            pending = _mesh("admin", "pending", "--node", survivor.address, "--creds", creds, "--json")
            held = json.loads(pending.stdout)["held"] if pending.returncode == 0 else []
            if held:
                break
            if time.monotonic() - start > 60:
                raise DemoFailed(f"no held decision after 60 s ({pending.stderr.strip()}); "
                                 f"logs in {workdir / 'logs'}")
            time.sleep(0.3)
    decision_id = held[0]["decision_id"]
    table = _mesh("admin", "pending", "--node", survivor.address, "--creds", creds)
    console.print(f"  $ mesh admin pending --node {survivor.address}")
    console.print("\n".join("  " + line for line in table.stdout.rstrip().splitlines()), highlight=False)
    approve = _mesh("admin", "approve", decision_id, "--key", str(fleet_dir / "operator.key"),
                    "--reason", "demo: node died", "--node", survivor.address, "--creds", creds)
    console.print(f"  $ mesh admin approve {decision_id} --key {fleet_dir / 'operator.key'} "
                  f"--node {survivor.address}")
    console.print("  " + " ".join(approve.stdout.split()), highlight=False)
    if approve.returncode != 0:
        raise DemoFailed(f"approval failed: {approve.stderr.strip() or approve.stdout.strip()}")
    routes = _mesh("admin", "routes", "--node", survivor.address, "--creds", creds, "--json")
    moved = {s: o for s, o in json.loads(routes.stdout)["routes"].items()
             if s.startswith(f"cam-{victim.node_id[-2:]}")}
    if not moved or any(o == victim.node_id for o in moved.values()):
        raise DemoFailed(f"streams of {victim.node_id} did not move after the approval: {moved}")
    audit = _mesh("admin", "audit", "--verify", "--node", survivor.address, "--creds", creds, "--json")
    verdict = json.loads(audit.stdout).get("verdict", {}) if audit.stdout.strip() else {}
    console.print(f"[green]approved and applied[/] on every replica: "
                  f"{', '.join(f'{s} -> {o}' for s, o in sorted(moved.items()))}; audit log hash chain "
                  f"{'verified' if verdict.get('ok') else 'NOT verified'} "
                  f"({verdict.get('records', '?')} records)")


def _shutdown(fleet_nodes, console, workdir) -> None:
    running = [n for n in fleet_nodes if n.process.poll() is None]
    console.print(f"\nstopping {len(running)} nodes with SIGTERM (graceful leave)")
    for n in running:
        n.process.send_signal(signal.SIGTERM)
    bad = []
    for n in running:
        try:
            code = n.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            n.process.kill()
            code = "timeout"
        if code != 0:
            bad.append(f"{n.node_id} ({code})")
    if bad:
        raise DemoFailed(f"nodes did not stop cleanly: {', '.join(bad)}; logs in {workdir / 'logs'}")
    console.print("[green]stopped[/]: every node left and exited 0")
