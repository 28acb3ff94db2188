"""A cluster of real `mesh node` processes, each in its own network namespace.

The harness drives nodes only through public interfaces: `mesh fleet init/enroll` makes
the fleet, `mesh node --config` runs a node, `mesh model publish` writes a version into the
origin's store, and every RPC goes through the client agent (`chaos.agent`). The node's
configuration format is known in one place, `write_config`: when the node changes (the
Raft transport moving onto the gRPC port, say), that is the function to change.

Every process, namespace and mount the cluster makes is written to the run state file as
soon as it exists, so `python -m chaos cleanup` can remove the leftovers of a run that was
killed before its own teardown ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos.net import Network, in_ns, node_ns, run
from chaos.proxy import PROXY_MARK
from mesh.consensus.config import RaftSection
from mesh.membership.config import MembershipConfig
from mesh.node.local import write_node_config

log = logging.getLogger("chaos.cluster")

REPO = Path(__file__).resolve().parent.parent
GRPC_PORT = 7000
RAFT_PORT = 7400
PROXY_PORT_OFFSET = 10000
PROXY_OUTBOUND_PORT = 19000
MODEL_NAME = "wake"
CLIENT_NAME = "chaos-client"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
STATE_DIR = Path("/run/fleetmesh-chaos")
STATE_FILE = STATE_DIR / "active.json"
LOCK_FILE = STATE_DIR / "lock"

# SWIM timings for chaos runs: memberlist's LAN structure at twice the speed, so a heal is
# seen within seconds, but slow enough that 9 nodes on 2 busy cores do not suspect each other.
CHAOS_TIMINGS = MembershipConfig(
    probe_interval_s=0.5,
    probe_timeout_s=0.25,
    gossip_interval_s=0.1,
    push_pull_interval_s=10.0,
    gossip_to_dead_s=15.0,
)

# The guard of every chaos node: a site may move one stream at a time on its own; moving two
# (an operator's bulk move, or a dead node's two streams) waits for an operator's approval.
GUARD = {
    "move_streams": {"max_nodes": 2, "max_fraction": 1.0, "max_streams": 1},
    "reassign_streams": {"max_nodes": 2, "max_fraction": 1.0, "max_streams": 1},
}
SITE_NAMES = ("ams", "ber", "chi", "den", "ess")
# The node's [raft] section lists members by node id once Raft runs on the gRPC port (no raft.listen).
RAFT_MEMBERS_BY_NODE_ID = not RaftSection.model_fields["listen"].is_required()


class ClusterError(Exception):
    """The cluster could not be built or a node could not be driven; the message says where to look."""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    site: str

    @property
    def streams(self) -> list[str]:
        return [f"{self.node_id}-a", f"{self.node_id}-b"]


@dataclass
class ClusterPlan:
    """Who runs, where, and which nodes need what from the start (a delay proxy in front of
    their ports, a small tmpfs data dir, libfaketime preloaded)."""

    nodes: list[NodeSpec]
    timings: MembershipConfig = CHAOS_TIMINGS
    delay_nodes: frozenset[str] = frozenset()
    tmpfs_mb: dict[str, int] = field(default_factory=dict)
    faketime_nodes: frozenset[str] = frozenset()
    # A broken build for a negative run: every node starts with chaos/sabotage/<name> first on its
    # PYTHONPATH (its sitecustomize breaks one invariant on purpose, e.g. "unguarded").
    sabotage: str | None = None

    @classmethod
    def sites(cls, n: int, sites: int, **kwargs) -> ClusterPlan:
        """n nodes dealt round-robin into `sites` sites: n01 in the first, n02 in the second..."""
        nodes = [NodeSpec(f"n{i + 1:02d}", SITE_NAMES[i % sites]) for i in range(n)]
        return cls(nodes=nodes, **kwargs)

    @property
    def ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def site_of(self, node_id: str) -> str:
        return next(n.site for n in self.nodes if n.node_id == node_id)

    def site_members(self, site: str) -> list[str]:
        return [n.node_id for n in self.nodes if n.site == site]

    @property
    def site_names(self) -> list[str]:
        return list(dict.fromkeys(n.site for n in self.nodes))

    def membership_bound_s(self) -> float:
        """How long after a heal membership may take to reconverge: two push-pull rounds
        (a full state exchange reaches everyone), the suspicion timeout (a suspect is
        refuted or declared dead), twenty probe periods, and 10 s of slack for a loaded
        2-core machine."""
        t = self.timings
        return (
            2 * t.push_pull_interval_s
            + t.suspicion_timeout_s(len(self.nodes))
            + 20 * t.probe_interval_s
            + 10.0
        )


def write_config(
    path: Path, node: NodeSpec, plan: ClusterPlan, network: Network, *, tls_dir: Path, data_dir: Path
) -> None:
    """The node.toml of one chaos node. The only function that knows the node's config format.

    Each node listens on its namespace's address (the same ports everywhere: namespaces do
    not share ports), seeds from the first node of every site, joins its site's Raft group,
    serves the chaos model and claims two streams of its own. The [raft] section is written
    in whichever form the node takes: members by node id over the gRPC port, or (before the
    Raft transport moved onto mTLS) a Raft address of its own and members by address."""
    ip = network.addresses[node.node_id]
    firsts = [plan.site_members(site)[0] for site in plan.site_names]
    seeds = [f"{network.addresses[n]}:{GRPC_PORT}" for n in firsts if n != node.node_id]
    if RAFT_MEMBERS_BY_NODE_ID:
        raft: dict[str, object] = {"members": plan.site_members(node.site)}
    else:
        raft = {
            "listen": f"{ip}:{RAFT_PORT}",
            "members": [f"{network.addresses[n]}:{RAFT_PORT}" for n in plan.site_members(node.site)],
        }
    write_node_config(
        path,
        node_id=node.node_id,
        address=f"{ip}:{GRPC_PORT}",
        seeds=seeds,
        site=node.site,
        tls_dir=tls_dir,
        data_dir=data_dir,
        timings=plan.timings,
        log_level="info",
        inference={"model": MODEL_NAME, "workers": 1},
        raft=raft,
        guard=GUARD,
        streams=node.streams,
    )


def leader_names(plan: ClusterPlan, network: Network) -> dict[str, str]:
    """Every name a node may give its Raft leader (Raft address, gRPC address, node id) -> node id."""
    out = {}
    for n in plan.ids:
        ip = network.addresses[n]
        out.update({f"{ip}:{RAFT_PORT}": n, f"{ip}:{GRPC_PORT}": n, n: n})
    return out


def mesh_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """Run the `mesh` CLI (file-only commands: fleet, model publish) from the root namespace."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
    )


def make_fleet(directory: Path, names: list[str], *, fleet_id: str) -> dict:
    """`mesh fleet init` then `mesh fleet enroll` for each name; returns init's JSON."""
    done = mesh_cli("fleet", "init", str(directory), "--fleet-id", fleet_id, "--force", "--json")
    if done.returncode != 0:
        raise ClusterError(f"mesh fleet init failed: {done.stderr.strip()}")
    made = json.loads(done.stdout)
    for name in names:
        enrolled = mesh_cli("fleet", "enroll", name, "--fleet", str(directory), "--json")
        if enrolled.returncode != 0:
            raise ClusterError(f"mesh fleet enroll {name} failed: {enrolled.stderr.strip()}")
    return made


class RunState:
    """The run's cleanup record (STATE_FILE): pids, namespaces, mounts, written as they appear."""

    def __init__(self, workdir: Path) -> None:
        self.doc = {
            "harness_pid": os.getpid(),
            "workdir": str(workdir),
            "pids": [],
            "namespaces": [],
            "mounts": [],
        }
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._write()

    def add(self, key: str, value) -> None:
        if value not in self.doc[key]:
            self.doc[key].append(value)
            self._write()

    def _write(self) -> None:
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(STATE_FILE)

    def clear(self) -> None:
        STATE_FILE.unlink(missing_ok=True)


class NodeProcess:
    """One `mesh node` process in its namespace. The log accumulates across restarts."""

    def __init__(
        self, spec: NodeSpec, config: Path, log_path: Path, env: dict[str, str], state: RunState
    ) -> None:
        self.spec = spec
        self.config = config
        self.log_path = log_path
        self.env = env
        self.state = state
        self.popen: subprocess.Popen | None = None
        self.paused = False
        self.starts = 0
        self.expected_down = False  # stopped by a nemesis, not by itself

    @property
    def node_id(self) -> str:
        return self.spec.node_id

    def start(self) -> None:
        argv = in_ns(
            node_ns(self.node_id), [sys.executable, "-m", "mesh", "node", "--config", str(self.config)]
        )
        with self.log_path.open("ab") as logf:
            logf.write(f"--- chaos: start #{self.starts + 1} at {time.strftime('%H:%M:%S')} ---\n".encode())
            logf.flush()
            self.popen = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
            )
        self.starts += 1
        self.paused = False
        self.expected_down = False
        self.state.add("pids", self.popen.pid)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL (a crash: no leave message), and wait for it."""
        if self.running():
            if self.paused:
                os.kill(self.popen.pid, signal.SIGCONT)
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self.paused = False

    def terminate(self, grace_s: float = 5.0) -> None:
        """SIGTERM (the node leaves the cluster), SIGKILL after `grace_s`."""
        if not self.running():
            return
        if self.paused:
            os.kill(self.popen.pid, signal.SIGCONT)
            self.paused = False
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])


class Cluster:
    """The fleet, network, processes and files of one run."""

    def __init__(self, plan: ClusterPlan, workdir: Path, state: RunState) -> None:
        self.plan = plan
        self.workdir = workdir
        self.state = state
        self.network = Network(plan.ids)
        self.fleet_dir = workdir / "fleet"
        self.rogue_dir = workdir / "rogue-fleet"
        self.fleet: dict = {}
        self.procs: dict[str, NodeProcess] = {}
        self.proxies: dict[str, subprocess.Popen] = {}
        self.mounts: list[Path] = []

    # -- paths --

    def data_dir(self, node_id: str) -> Path:
        return self.workdir / "data" / node_id

    def clock_file(self, node_id: str) -> Path:
        return self.workdir / "clock" / node_id

    def delay_file(self, node_id: str) -> Path:
        return self.workdir / "delay" / f"{node_id}.ms"

    def address(self, node_id: str) -> str:
        return f"{self.network.addresses[node_id]}:{GRPC_PORT}"

    @property
    def client_creds(self) -> Path:
        return self.fleet_dir / "nodes" / CLIENT_NAME

    # -- build and tear down --

    def build(self) -> None:
        """Fleet, namespaces, data dirs, configs, proxies; nodes are started by `start_all`."""
        for sub in ("data", "configs", "logs", "clock", "delay"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.fleet = make_fleet(self.fleet_dir, [*self.plan.ids, CLIENT_NAME], fleet_id="chaos")
        make_fleet(self.rogue_dir, [], fleet_id="rogue")
        self.network.create(on_created=lambda ns: self.state.add("namespaces", ns))
        for spec in self.plan.nodes:
            data = self.data_dir(spec.node_id)
            data.mkdir(parents=True, exist_ok=True)
            size_mb = self.plan.tmpfs_mb.get(spec.node_id)
            if size_mb:
                run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(data)])
                self.mounts.append(data)
                self.state.add("mounts", str(data))
            config = self.workdir / "configs" / f"{spec.node_id}.toml"
            write_config(
                config,
                spec,
                self.plan,
                self.network,
                tls_dir=self.fleet_dir / "nodes" / spec.node_id,
                data_dir=data,
            )
            env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1"}
            if self.plan.sabotage is not None:
                broken = Path(__file__).resolve().parent / "sabotage" / self.plan.sabotage
                if not (broken / "sitecustomize.py").is_file():
                    raise ClusterError(f"no sabotage {self.plan.sabotage!r} ({broken}/sitecustomize.py)")
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(broken), env.get("PYTHONPATH")]))
            if spec.node_id in self.plan.faketime_nodes:
                if not LIBFAKETIME.exists():
                    raise ClusterError(f"{LIBFAKETIME} is missing: run `make chaos-deps`")
                self.clock_file(spec.node_id).write_text("+0\n")
                # Monotonic time is faked too: with FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 makes
                # Python's time.sleep fail with EINVAL, which would kill pysyncobj's tick thread.
                env.update(
                    LD_PRELOAD=str(LIBFAKETIME),
                    FAKETIME_TIMESTAMP_FILE=str(self.clock_file(spec.node_id)),
                    FAKETIME_CACHE_DURATION="1",
                )
            self.procs[spec.node_id] = NodeProcess(
                spec, config, self.workdir / "logs" / f"{spec.node_id}.log", env, self.state
            )
            if spec.node_id in self.plan.delay_nodes:
                self._start_proxy(spec.node_id)

    def _start_proxy(self, node_id: str) -> None:
        control = self.delay_file(node_id)
        control.write_text("0\n")
        ports = {GRPC_PORT: GRPC_PORT + PROXY_PORT_OFFSET, RAFT_PORT: RAFT_PORT + PROXY_PORT_OFFSET}
        outbound = PROXY_OUTBOUND_PORT
        argv = in_ns(
            node_ns(node_id),
            [
                sys.executable,
                "-m",
                "chaos.proxy",
                "--target",
                self.network.addresses[node_id],
                "--ports",
                ",".join(f"{p}:{q}" for p, q in ports.items()),
                "--outbound-port",
                str(outbound),
                "--control",
                str(control),
            ],
        )
        with (self.workdir / "logs" / f"proxy-{node_id}.log").open("ab") as logf:
            proxy = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=logf, cwd=REPO, start_new_session=True
            )
        self.state.add("pids", proxy.pid)
        self.proxies[node_id] = proxy
        line = proxy.stdout.readline()
        if b"ready" not in line:
            raise ClusterError(f"delay proxy of {node_id} did not start; see logs/proxy-{node_id}.log")
        self.network.redirect_to_proxy(node_id, ports, outbound, PROXY_MARK)

    def start_all(self) -> None:
        for proc in self.procs.values():
            proc.start()

    def teardown(self) -> list[str]:
        """Stop every process, remove namespaces and mounts; returns what could not be undone."""
        problems = []
        for proc in self.procs.values():
            try:
                proc.kill()
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever one step hit
                problems.append(f"kill {proc.node_id}: {exc}")
        for proxy in self.proxies.values():
            if proxy.poll() is None:
                proxy.kill()
            proxy.wait()
        problems += self.network.destroy()
        for mount in self.mounts:
            # A tmpfs forgets everything when unmounted: keep a copy for the post-mortem (no filler).
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(
                    mount,
                    self.workdir / "tmpfs-copy" / mount.name,
                    ignore=shutil.ignore_patterns(".chaos-filler"),
                )
            done = run(["umount", "-l", str(mount)], check=False)
            if done.returncode != 0:
                problems.append(f"umount {mount}: {done.stderr.strip()}")
        self.mounts.clear()
        return problems

    # -- model publishing (file-only: the origin node's store) --

    def publish(self, node_id: str, model_file: Path, version: str, *, rogue: bool = False) -> dict:
        """`mesh model publish` into a node's store; a rogue publish signs with a key from a
        different fleet, which no node trusts."""
        key = (self.rogue_dir if rogue else self.fleet_dir) / "publisher.key"
        done = mesh_cli(
            "model",
            "publish",
            str(model_file),
            "--name",
            MODEL_NAME,
            "--version",
            version,
            "--key",
            str(key),
            "--data-dir",
            str(self.data_dir(node_id)),
            "--json",
        )
        if done.returncode != 0:
            raise ClusterError(done.stderr.strip().replace("error: ", "", 1) or f"exit {done.returncode}")
        return json.loads(done.stdout)


# The version of the chaos model each family's files are published as: baseline (1), the version the
# workload publishes and rolls out (2), the rogue one (9, signed outside the fleet), a spare.
MODEL_FAMILIES = ("wake", "mlp-bad")


def model_files(family: str = "wake", folder: Path | None = None) -> list[Path]:
    """The chaos model's versions, all with the same input signature: [baseline, published, rogue, spare].

    - "wake": real INT8 wake-word models (pymicro_wakeword); every version answers every input.
    - "mlp-bad": float MLPs (`mesh.inference.fixtures`), where the published version is bad: its
      outputs are NaN whenever input[0, 0] < 0, half of the workload's standard-normal inputs. It
      loads and passes activation's validation (inputs in [0, 1)), so only the rollout's gate, fed by
      the devices' own error counts, can catch it. The files are written into `folder`."""
    if family == "wake":
        import pymicro_wakeword

        models = Path(pymicro_wakeword.__file__).parent / "models"
        files = [models / f"{name}.tflite" for name in ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise ClusterError(f"{missing[0]} is missing: install the test extras (make install)")
        return files
    if family == "mlp-bad":
        from mesh.inference.fixtures import PARTLY_NAN_LAYERS, mlp_model, partly_nan_model

        if folder is None:
            raise ClusterError("the mlp-bad model family is written into a folder; none was given")
        folder.mkdir(parents=True, exist_ok=True)
        made = {
            "mlp-1.tflite": mlp_model(PARTLY_NAN_LAYERS, seed=1),
            "mlp-2-bad.tflite": partly_nan_model(PARTLY_NAN_LAYERS, seed=2, threshold=0.0),
            "mlp-9-rogue.tflite": mlp_model(PARTLY_NAN_LAYERS, seed=9),
            "mlp-4.tflite": mlp_model(PARTLY_NAN_LAYERS, seed=4),
        }
        for name, data in made.items():
            (folder / name).write_bytes(data)
        return [folder / name for name in made]
    raise ClusterError(f"unknown model family {family!r}; known: {', '.join(MODEL_FAMILIES)}")
