"""`mesh demo`: a real fleet of node processes on loopback, narrated.

Each node is a separate `mesh node` process with its own certificate (mTLS
on), exactly as on a device; the demo only writes their config files and
watches them through the admin client, as an operator would.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mesh.admin.client import AdminClient, AdminError
from mesh.admin.format import status_table
from mesh.identity.ca import enroll, init_fleet, load_credentials
from mesh.membership.messages import MembershipConfig, State
from mesh.node.local import free_ports, spawn_node_process, write_node_config

# Faster than the LAN defaults so the demo takes seconds, same ratios.
DEMO_TIMINGS = MembershipConfig(probe_interval_s=0.5, probe_timeout_s=0.2, gossip_interval_s=0.1,
                                push_pull_interval_s=5.0)
SITES = ("amsterdam", "berlin", "chicago", "denver", "essen", "fresno", "geneva", "houston",
         "istanbul", "jakarta", "kyoto", "lima", "madrid", "nairobi", "oslo", "paris")


# The site may move one stream on its own; anything bigger waits for an operator.
DEMO_GUARD = {"reassign_streams": {"max_streams": 1, "max_nodes": 2, "max_fraction": 0.5}}


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
        try:
            out[node_id] = {m.node_id: State(m.state) for m in client.status().members}
        except AdminError:
            pass
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
                          inference={"model": model_name(model), "workers": 1},
                          raft={"members": site_members},
                          guard=DEMO_GUARD, streams=[f"cam-{i:02d}a", f"cam-{i:02d}b"])
    (workdir / "logs").mkdir()

    console.rule("[bold]fleetmesh demo: membership")
    console.print(f"fleet [bold]{fleet.fleet_id}[/]: CA and keys in {fleet_dir}; "
                  f"{nodes} nodes in {sites} sites ({', '.join(site_names)}), mTLS on every link")
    console.print(f"SWIM timings: probe every {timings.probe_interval_s}s, timeout {timings.probe_timeout_s}s, "
                  f"{timings.indirect_checks} indirect checks, gossip every {timings.gossip_interval_s}s "
                  f"to {timings.gossip_nodes} peers")
    clients = {n.node_id: AdminClient(n.address, operator, timeout_s=1.0) for n in fleet_nodes}
    try:
        for n in fleet_nodes:
            n.process = spawn_node_process(n.config, n.log)
        _converge(fleet_nodes, clients, console, workdir)
        _distribute(fleet_nodes, clients, console, workdir, fleet_dir, model, "1.0")
        _serve(fleet_nodes, clients, console, workdir, fleet_dir, "1.0")
        _hot_swap(fleet_nodes, clients, console, workdir, fleet_dir, model)
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


def _distribute(fleet_nodes, clients, console, workdir, fleet_dir: Path, model: Path, version: str) -> dict:
    """Publish `model` at the first node and wait until every node holds it, verified."""
    origin = fleet_nodes[0]
    name = model_name(model)
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
    rows: dict[str, object] = {}
    with console.status("peers fetch chunks from each other...") as status:
        while True:
            for n in fleet_nodes:
                try:
                    rows[n.node_id] = next(v for v in clients[n.node_id].models().versions
                                           if (v.name, v.version) == (name, version))
                except (AdminError, StopIteration):
                    pass
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
                try:
                    serving[n.node_id] = clients[n.node_id].inference()
                except AdminError:
                    pass
            if len(serving) == len(fleet_nodes) and all(s.active_version == version for s in serving.values()):
                break
            errors = [f"{i}: {s.last_activation_error}" for i, s in serving.items() if s.last_activation_error]
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
        console.print(f"  $ mesh infer --node {n.address} --count 5   ({n.site})\n  " + " ".join(result.stdout.split()))


def _hot_swap(fleet_nodes, clients, console, workdir, fleet_dir: Path, model: Path) -> None:
    """Publish 2.0 (the same model with its last weights changed): only the changed chunks move,
    and every node swaps to it while serving; 1.0 stays on disk for rollback."""
    data = bytearray(model.read_bytes())
    start = len(data) - len(data) // 20  # inside the last weights
    data[start:start + 4096] = bytes((b + 1) % 256 for b in data[start:start + 4096])
    v2 = workdir / model.name  # same file name, so the same model name
    v2.write_bytes(bytes(data))
    console.print("\n[bold]new version[/]: 2.0 is the same model with its last weights changed")
    rows = _distribute(fleet_nodes, clients, console, workdir, fleet_dir, v2, "2.0")
    downloaded = [r.bytes_downloaded for i, r in rows.items() if i != fleet_nodes[0].node_id]
    console.print(f"  delta: each node downloaded {max(downloaded):,} bytes at most of the {v2.stat().st_size:,} "
                  f"(only the chunks 1.0 did not have)")
    _serve(fleet_nodes, clients, console, workdir, fleet_dir, "2.0")


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
    console.print(f"  $ mesh admin approve {decision_id} --key {fleet_dir / 'operator.key'} --node {survivor.address}")
    console.print("  " + " ".join(approve.stdout.split()), highlight=False)
    if approve.returncode != 0:
        raise DemoFailed(f"approval failed: {approve.stderr.strip() or approve.stdout.strip()}")
    routes = _mesh("admin", "routes", "--node", survivor.address, "--creds", creds, "--json")
    moved = {s: o for s, o in json.loads(routes.stdout)["routes"].items() if s.startswith(f"cam-{victim.node_id[-2:]}")}
    if not moved or any(o == victim.node_id for o in moved.values()):
        raise DemoFailed(f"streams of {victim.node_id} did not move after the approval: {moved}")
    audit = _mesh("admin", "audit", "--verify", "--node", survivor.address, "--creds", creds, "--json")
    verdict = json.loads(audit.stdout).get("verdict", {}) if audit.stdout.strip() else {}
    console.print(f"[green]approved and applied[/] on every replica: "
                  f"{', '.join(f'{s} -> {o}' for s, o in sorted(moved.items()))}; audit log hash chain "
                  f"{'verified' if verdict.get('ok') else 'NOT verified'} ({verdict.get('records', '?')} records)")


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
