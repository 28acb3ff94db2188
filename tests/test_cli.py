"""The `mesh` command: help with examples, exit codes, JSON output, admin status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from mesh.cli import main
from mesh.node.local import FAST_TIMINGS, free_ports, spawn_node_process, write_node_config
from tests.models import wakeword_model


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from all_commands(command, prefix + (name,))


@pytest.mark.parametrize("path", [p for p, c in all_commands(main) if not isinstance(c, click.Group)],
                         ids=lambda p: " ".join(p))
def test_every_command_help_shows_an_example(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output, result.output


def test_usage_errors_exit_2_and_config_errors_name_the_field(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["no-such-command"]).exit_code == 2
    assert runner.invoke(main, ["node"]).exit_code == 2  # --config missing
    bad = tmp_path / "node.toml"
    bad.write_text('node_id = "x"\nlisten = "nowhere"\n')
    result = runner.invoke(main, ["node", "--config", str(bad)])
    assert result.exit_code == 2
    assert "listen:" in result.output and str(bad) in result.output


def test_fleet_init_enroll_json_and_refusal(tmp_path):
    runner = CliRunner()
    fleet_dir = tmp_path / "fleet"
    made = runner.invoke(main, ["fleet", "init", str(fleet_dir), "--json"])
    assert made.exit_code == 0, made.output
    info = json.loads(made.output)
    assert info["publisher_key_id"] != info["operator_key_id"]
    again = runner.invoke(main, ["fleet", "init", str(fleet_dir)])
    assert again.exit_code == 1 and "--force" in again.output
    enrolled = runner.invoke(main, ["fleet", "enroll", "cam-01", "--fleet", str(fleet_dir), "--json"])
    assert enrolled.exit_code == 0, enrolled.output
    assert (fleet_dir / "nodes" / "cam-01" / "cert.pem").exists()
    refused = runner.invoke(main, ["fleet", "enroll", "bad name!", "--fleet", str(fleet_dir)])
    assert refused.exit_code == 1


def test_admin_status_against_a_running_node(fleet, tmp_path):
    port, = free_ports(1)
    config = tmp_path / "n.toml"
    write_node_config(config, node_id="cli-node", address=f"127.0.0.1:{port}", seeds=[], site="essen",
                      tls_dir=fleet.node_credentials("cli-node").directory, data_dir=tmp_path / "d",
                      timings=FAST_TIMINGS)
    proc = spawn_node_process(config, tmp_path / "n.log")
    try:
        cmd = [sys.executable, "-m", "mesh", "admin", "status", "--node", f"127.0.0.1:{port}",
               "--creds", str(fleet.operator.directory)]
        deadline = time.monotonic() + 20
        while True:
            out = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["node_id"] == "cli-node"
        assert status["members"][0]["site"] == "essen" and status["members"][0]["state"] == "alive"
        table = subprocess.run(cmd, capture_output=True, text=True)
        assert table.returncode == 0 and "cli-node" in table.stdout and "alive" in table.stdout
        # Publishing into the node's data dir: the running node announces it within a second.
        mesh = [sys.executable, "-m", "mesh", "model"]
        published = subprocess.run([*mesh, "publish", str(wakeword_model("okay_nabu")), "--name", "nabu",
                                    "--version", "1", "--key", str(fleet.directory / "publisher.key"),
                                    "--data-dir", str(tmp_path / "d"), "--json"], capture_output=True, text=True)
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["chunks"] >= 1
        listed = subprocess.run([*mesh, "ls", "--data-dir", str(tmp_path / "d"), "--json"],
                                capture_output=True, text=True)
        assert [(v["name"], v["version"], v["complete"]) for v in json.loads(listed.stdout)] == [("nabu", "1", True)]
        not_a_model = tmp_path / "notes.tflite"
        not_a_model.write_bytes(b"hello")
        refused = subprocess.run([*mesh, "publish", str(not_a_model), "--name", "x", "--version", "1", "--key",
                                  str(fleet.directory / "publisher.key"), "--data-dir", str(tmp_path / "d")],
                                 capture_output=True, text=True)
        assert refused.returncode == 1 and "not a .tflite model" in refused.stderr
        status_cmd = [*mesh, "status", "--node", f"127.0.0.1:{port}", "--creds", str(fleet.operator.directory),
                      "--json"]
        deadline = time.monotonic() + 20
        while True:
            rows = json.loads(subprocess.run(status_cmd, capture_output=True, text=True).stdout or "[]")
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [(r["name"], r["phase"], r["origin"]) for r in rows] == [("nabu", "complete", True)]
        # With a node certificate instead of an operator's: refused, exit 1, says why.
        as_node = subprocess.run([*cmd[:-1], str(fleet.node_credentials("cli-node").directory)],
                                 capture_output=True, text=True)
        assert as_node.returncode == 1 and "operator" in as_node.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    down = subprocess.run(cmd, capture_output=True, text=True)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_model_optimize_writes_a_smaller_int8_model_or_refuses(tmp_path):
    import numpy as np

    from mesh.inference.backend import load_backend
    from mesh.inference.fixtures import mlp_model

    float_model = tmp_path / "mlp.tflite"
    float_model.write_bytes(mlp_model())
    signature = load_backend().load(float_model).signature
    samples = np.random.default_rng(3).standard_normal((32, *signature.inputs[0].shape)).astype(np.float32)
    np.savez(tmp_path / "calibration.npz", **{signature.inputs[0].name: samples})
    out = tmp_path / "mlp-int8.tflite"
    runner = CliRunner()
    result = runner.invoke(main, ["model", "optimize", str(float_model), str(out), "--int8",
                                  "--calibration", str(tmp_path / "calibration.npz"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["within_tolerance"] and report["size_ratio"] >= 3.5
    assert out.stat().st_size * 3.5 <= float_model.stat().st_size
    assert load_backend().load(out).signature.inputs[0].dtype == "int8"

    refused = tmp_path / "never.tflite"
    result = runner.invoke(main, ["model", "optimize", str(float_model), str(refused), "--int8",
                                  "--calibration", str(tmp_path / "calibration.npz"), "--tolerance", "0.000001"])
    assert result.exit_code == 1 and "not written" in result.output
    assert not refused.exists()
