"""Resume after a crash, with real `mesh node` processes: a node SIGKILLed in the
middle of a download keeps its verified chunks, never shows the partial version
as complete, and after a restart fetches only the chunks it still lacked."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from mesh.admin.client import AdminClient, AdminError
from mesh.artifacts.store import ArtifactStore
from mesh.node.local import FAST_TIMINGS, free_ports, poll_until, spawn_node_process, write_node_config
from tests.models import mediapipe_model


def poll(predicate, timeout_s: float, what: str, procs=()) -> float:
    def check() -> None:
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")

    return poll_until(predicate, timeout_s, what, check=check)


def model_row(admin: AdminClient, name: str, version: str):
    try:
        rows = admin.models().versions
    except AdminError:
        return None
    return next((r for r in rows if (r.name, r.version) == (name, version)), None)


def test_sigkilled_download_resumes_without_fetching_any_chunk_twice(fleet, tmp_path: Path):
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    ids = ["origin", "victim"]
    # The victim downloads at 1 MB/s, so a 5.5 MB model takes seconds: time to kill it half-way.
    caps = {"victim": {"download_rate_bytes_per_s": 1_000_000}}
    configs, logs, procs = {}, {}, {}
    for i, node_id in enumerate(ids):
        configs[node_id] = tmp_path / f"{node_id}.toml"
        logs[node_id] = tmp_path / f"{node_id}.log"
        write_node_config(configs[node_id], node_id=node_id, address=addresses[i],
                          seeds=addresses[:1] if i else [],
                          site="amsterdam", tls_dir=fleet.node_credentials(node_id).directory,
                          data_dir=tmp_path / node_id, timings=FAST_TIMINGS, transfer=caps.get(node_id))
    try:
        for node_id in ("origin", "victim"):
            procs[node_id] = spawn_node_process(configs[node_id], logs[node_id])
        victim_admin = AdminClient(addresses[1], fleet.operator, timeout_s=1.0)
        # Publish the way an operator does: the CLI writes into the origin's data dir.
        subprocess.run([sys.executable, "-m", "mesh", "model", "publish",
                        str(mediapipe_model("hand_landmark_full")),
                        "--name", "hand", "--version", "3", "--key", str(fleet.directory / "publisher.key"),
                        "--data-dir", str(tmp_path / "origin")], check=True, capture_output=True)
        manifest = ArtifactStore(tmp_path / "origin" / "artifacts").load_manifest("hand", "3").manifest
        victim_store_dir = tmp_path / "victim" / "artifacts"

        def victim_chunks() -> int:
            if not victim_store_dir.exists():
                return 0
            return ArtifactStore(victim_store_dir).bitfield(manifest).count()

        watched = [(procs["victim"], logs["victim"])]
        poll(lambda: victim_chunks() >= 3, 60.0, "victim holds 3 chunks", watched)
        procs["victim"].send_signal(signal.SIGKILL)
        procs["victim"].wait(10)

        store = ArtifactStore(victim_store_dir)
        kept = store.bitfield(manifest)
        assert 3 <= kept.count() < len(manifest.chunks), "kill the victim mid-transfer"
        assert not store.is_complete(manifest) and ("hand", "3") in store.stored_versions()
        assert [v.complete for v in store.versions()] == [False]  # the partial version is not complete
        kept_bytes = sum(manifest.chunks[i].size_bytes for i in kept.present())

        procs["victim"] = spawn_node_process(configs["victim"], logs["victim"])
        watched = [(procs["victim"], logs["victim"])]
        poll(lambda: (row := model_row(victim_admin, "hand", "3")) is not None and row.phase == "complete",
             90.0, "victim completes hand 3 after restart", watched)
        row = model_row(victim_admin, "hand", "3")
        assert row.bytes_downloaded == manifest.size_bytes - kept_bytes, \
            f"after restart fetched {row.bytes_downloaded} bytes; " \
            f"only {manifest.size_bytes - kept_bytes} were missing"
        assert ArtifactStore(victim_store_dir).verify_model(manifest)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
