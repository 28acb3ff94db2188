"""A version that keeps killing its device fails its wave: three `mesh node` processes form one site
(its Raft group), a rollout started with `mesh rollout start` moves wave 1's one device to the new
version, and that device's process is SIGKILLed (the OOM killer, a watchdog) each time it serves it.
At the third crash the device refuses the version, goes back to the baseline and reports the refusal
as a failed activation; the site's leader fails the wave at once and rolls the rollout back, with the
device named in the reason, long before the wave's soak could have ended."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh.admin.client import AdminClient, AdminError
from mesh.inference.crashloop import CRASH_LIMIT
from mesh.node.local import FAST_TIMINGS, LocalFleet, free_ports, spawn_node_process, write_node_config
from tests.models import wakeword_model

NODES = ("c0", "c1", "c2")


def _serving(client: AdminClient) -> str | None:
    try:
        return client.inference().active_version or None
    except AdminError:
        return None  # not up (yet, or any more)


def _poll(predicate, timeout_s: float, what: str, procs: dict, logs: dict) -> None:
    """Poll (the nodes are other processes) until `predicate`; fail early, with its log, if a node exits."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for node_id, proc in procs.items():
            assert proc.poll() is None, (
                f"{node_id} exited with {proc.returncode}: {logs[node_id].read_text()[-2000:]}"
            )
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s:.0f} s"
        time.sleep(0.2)


def test_a_version_that_keeps_killing_its_device_fails_the_wave_and_rolls_back(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path / "fleet")
    ports = dict(zip(NODES, free_ports(len(NODES)), strict=True))
    address = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    configs, logs, data = {}, {}, {}
    for node_id in NODES:
        configs[node_id], logs[node_id], data[node_id] = (
            tmp_path / f"{node_id}.toml",
            tmp_path / f"{node_id}.log",
            tmp_path / node_id,
        )
        write_node_config(
            configs[node_id],
            node_id=node_id,
            address=address[node_id],
            seeds=[address["c0"]] if node_id != "c0" else [],
            site="essen",
            tls_dir=fleet.node_credentials(node_id).directory,
            data_dir=data[node_id],
            timings=FAST_TIMINGS,
            inference={"model": "nabu", "workers": 1},
            raft={"members": list(NODES)},
        )
    creds = ["--creds", str(fleet.operator.directory), "--node", address["c0"]]
    publisher = str(fleet.directory / "publisher.key")

    def mesh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mesh", *args], capture_output=True, text=True, timeout=60
        )

    def publish(model: str, version: str) -> None:
        done = mesh(
            "model",
            "publish",
            str(wakeword_model(model)),
            "--name",
            "nabu",
            "--version",
            version,
            "--key",
            publisher,
            "--data-dir",
            str(data["c0"]),
            "--json",
        )
        assert done.returncode == 0, done.stderr

    clients = {n: AdminClient(address[n], fleet.operator, timeout_s=2.0) for n in NODES}
    procs = {n: spawn_node_process(configs[n], logs[n]) for n in NODES}
    try:
        publish("okay_nabu", "1")
        _poll(
            lambda: all(_serving(c) == "1" for c in clients.values()), 90, "every node serves 1", procs, logs
        )
        publish("hey_jarvis", "2")
        started = mesh(
            "rollout",
            "start",
            "nabu",
            "2",
            "--id",
            "nabu-2",
            "--waves",
            "1,100",
            "--soak",
            "10m",
            "--min-requests",
            "1",
            "--autonomous-share",
            "100",
            "--key",
            publisher,
            *creds,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        _poll(lambda: any(_serving(c) == "2" for c in clients.values()), 60, "wave 1 serves 2", procs, logs)
        (victim,) = [n for n, c in clients.items() if _serving(c) == "2"]

        for crash in range(1, CRASH_LIMIT + 1):
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(timeout=10)
            procs[victim] = spawn_node_process(configs[victim], logs[victim])
            # Below the limit the restarted device takes the version up again; at the limit it refuses it.
            want = "2" if crash < CRASH_LIMIT else "1"
            _poll(
                lambda want=want: _serving(clients[victim]) == want,
                60,
                f"{victim} serves {want} after crash {crash}",
                procs,
                logs,
            )

        def status() -> dict:
            done = mesh("rollout", "status", "nabu-2", "--json", *creds)
            return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}

        _poll(lambda: status().get("state") == "aborted", 60, "the rollout aborted", procs, logs)
        (site,) = status()["sites"]
        assert "failed to activate" in site["reason"] and victim in site["reason"], site
        _poll(lambda: all(_serving(c) == "1" for c in clients.values()), 30, "every node on 1", procs, logs)
        assert f"refusing nabu 2: the node stopped without a clean shutdown {CRASH_LIMIT} times" in (
            logs[victim].read_text()
        )
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
