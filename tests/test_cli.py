"""The `mesh` command: help with examples, exit codes, JSON output, admin status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

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
                      timings=FAST_TIMINGS, inference={"model": "nabu", "workers": 1})
    # Run from a directory that holds no ./fleet: every credential comes from a flag.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = spawn_node_process(config, tmp_path / "n.log")
    watcher = None
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
        mesh = [sys.executable, "-m", "mesh", "model"]
        # Right after a publish the node has not heard of the version: --watch --version waits for it
        # (saying so) instead of taking "no versions" for "all complete".
        watch_err = tmp_path / "watch.err"
        with watch_err.open("wb") as err:
            watcher = subprocess.Popen([*mesh, "status", "--node", f"127.0.0.1:{port}", "--creds",
                                        str(fleet.operator.directory), "--watch", "--version", "1", "--json",
                                        "--timeout-s", "60"],
                                       stdout=subprocess.PIPE, stderr=err, cwd=elsewhere)
        deadline = time.monotonic() + 20
        while "waiting for version 1" not in watch_err.read_text() and time.monotonic() < deadline:
            assert watcher.poll() is None, watch_err.read_text()
            time.sleep(0.1)
        assert "has not heard of it yet" in watch_err.read_text()
        assert watcher.poll() is None
        # Publishing into the node's data dir: the running node announces it within a second.
        published = subprocess.run([*mesh, "publish", str(wakeword_model("okay_nabu")), "--name", "nabu",
                                    "--version", "1", "--key", str(fleet.directory / "publisher.key"),
                                    "--data-dir", str(tmp_path / "d"), "--json"],
                                   capture_output=True, text=True)
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["chunks"] >= 1
        listed = subprocess.run([*mesh, "ls", "--data-dir", str(tmp_path / "d"), "--json"],
                                capture_output=True, text=True)
        assert [(v["name"], v["version"], v["complete"], v["origin"]) for v in json.loads(listed.stdout)] == \
            [("nabu", "1", True, True)]
        watched, _ = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, watch_err.read_text()
        assert [(r["name"], r["version"], r["phase"]) for r in json.loads(watched)] == \
            [("nabu", "1", "complete")]
        gave_up = subprocess.run([*mesh, "status", "--node", f"127.0.0.1:{port}", "--creds",
                                  str(fleet.operator.directory), "--watch", "--version", "9",
                                  "--timeout-s", "0.5"],
                                 capture_output=True, text=True)
        assert gave_up.returncode == 1 and "has not heard of version 9" in gave_up.stderr, gave_up.stderr
        not_a_model = tmp_path / "notes.tflite"
        not_a_model.write_bytes(b"hello")
        refused = subprocess.run([*mesh, "publish", str(not_a_model), "--name", "x", "--version", "1",
                                  "--key", str(fleet.directory / "publisher.key"),
                                  "--data-dir", str(tmp_path / "d")],
                                 capture_output=True, text=True)
        assert refused.returncode == 1 and "not a .tflite model" in refused.stderr
        status_cmd = [*mesh, "status", "--node", f"127.0.0.1:{port}", "--creds",
                      str(fleet.operator.directory), "--json"]
        deadline = time.monotonic() + 20
        while True:
            rows = json.loads(subprocess.run(status_cmd, capture_output=True, text=True).stdout or "[]")
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [(r["name"], r["phase"], r["origin"]) for r in rows] == [("nabu", "complete", True)]
        # From another directory, an operator's --creds is enough for `mesh infer` (it reads the
        # model's signature through the admin service with the same certificate).
        infer = [sys.executable, "-m", "mesh", "infer", "--node", f"127.0.0.1:{port}", "--creds",
                 str(fleet.operator.directory), "--json"]
        deadline = time.monotonic() + 20
        while True:
            answered = subprocess.run(infer, capture_output=True, text=True, cwd=elsewhere)
            if answered.returncode == 0 or "serves no model yet" not in answered.stderr \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answered.returncode == 0, answered.stderr
        assert [(r["model"], r["version"]) for r in json.loads(answered.stdout)] == [("nabu", "1")]
        # With a node certificate instead of an operator's: refused, exit 1, says why.
        as_node = subprocess.run([*cmd[:-1], str(fleet.node_credentials("cli-node").directory)],
                                 capture_output=True, text=True)
        assert as_node.returncode == 1 and "operator" in as_node.stderr
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
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
                                  "--calibration", str(tmp_path / "calibration.npz"),
                                  "--tolerance", "0.000001"])
    assert result.exit_code == 1 and "not written" in result.output
    assert not refused.exists()


def _said(result) -> str:
    """A CliRunner result's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_missing_operator_credentials_name_every_way_to_give_them(fleet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./fleet here: the default folder is missing
    monkeypatch.delenv("MESH_ADMIN_CREDS", raising=False)
    runner = CliRunner()
    result = runner.invoke(main, ["admin", "status", "--node", "127.0.0.1:9"])
    assert result.exit_code == 1
    for hint in ("fleet/operators/admin/cert.pem", "--creds", "MESH_ADMIN_CREDS",
                 "mesh fleet enroll NAME --role operator"):
        assert hint in _said(result), result.output
    # `mesh infer` reads the model's signature with an operator certificate given by --admin-creds.
    result = runner.invoke(main, ["infer", "--node", "127.0.0.1:9", "--creds",
                                  str(fleet.node_credentials("cam-01").directory)])
    assert result.exit_code == 1
    for hint in ("--admin-creds", "MESH_ADMIN_CREDS", "mesh fleet enroll NAME --role operator"):
        assert hint in _said(result), result.output


def test_publish_refuses_a_key_that_is_not_the_fleets_publisher_key(fleet, tmp_path, monkeypatch):
    from mesh.identity.signing import KeyRole, SigningKey, save_signing_key

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MESH_FLEET", raising=False)
    runner = CliRunner()
    model = str(wakeword_model("okay_nabu"))

    def publish(key, data_dir, *extra):
        return runner.invoke(main, ["model", "publish", model, "--name", "nabu", "--version", "1",
                                    "--key", str(key), "--data-dir", str(data_dir), *extra])

    # The operator key beside the fleet's publisher.pub: refused, naming both keys, nothing written.
    result = publish(fleet.directory / "operator.key", tmp_path / "d1")
    assert result.exit_code == 1
    said = _said(result)
    assert f"key {fleet.fleet.operator_key_id} (the fleet's operator key)" in said, result.output
    assert f"not the fleet's publisher key {fleet.fleet.publisher_key_id}" in said
    assert not (tmp_path / "d1").exists()
    # A key from elsewhere, checked against a node's credentials folder (it holds publisher.pub too).
    stray = tmp_path / "keys" / "publisher.key"
    stray.parent.mkdir()
    save_signing_key(SigningKey.generate(KeyRole.PUBLISHER), stray)
    node_creds = fleet.node_credentials("cam-01").directory
    result = publish(stray, tmp_path / "d2", "--fleet", str(node_creds))
    assert result.exit_code == 1 and fleet.fleet.publisher_key_id in _said(result), result.output
    assert not (tmp_path / "d2").exists()
    # Nothing to check against (no publisher.pub beside the key, no ./fleet): refused, saying what to pass.
    result = publish(stray, tmp_path / "d3")
    assert result.exit_code == 1 and "--fleet" in _said(result), result.output
    assert not (tmp_path / "d3").exists()
    # The real publisher key, found from a node's credentials folder, from the fleet folder beside it.
    real = tmp_path / "keys" / "real.key"
    real.write_bytes((fleet.directory / "publisher.key").read_bytes())
    assert publish(real, tmp_path / "d4", "--fleet", str(node_creds)).exit_code == 0
    result = publish(fleet.directory / "publisher.key", tmp_path / "d5")
    assert result.exit_code == 0, result.output


def test_model_ls_shows_which_versions_were_published_there(fleet, tmp_path):
    from mesh.artifacts.store import ArtifactStore

    runner = CliRunner()
    origin = tmp_path / "origin"
    result = runner.invoke(main, ["model", "publish", str(wakeword_model("okay_nabu")), "--name", "nabu",
                                  "--version", "1", "--key", str(fleet.directory / "publisher.key"),
                                  "--data-dir", str(origin)])
    assert result.exit_code == 0, result.output
    # The same version's manifest in another store (as a peer starting to fetch it): not published there.
    signed = ArtifactStore(origin / "artifacts").load_manifest("nabu", "1")
    ArtifactStore(tmp_path / "peer" / "artifacts").save_manifest(signed, trusted=fleet.fleet.trusted_keys())
    listed = {}
    for name, data_dir in (("origin", origin), ("peer", tmp_path / "peer")):
        result = runner.invoke(main, ["model", "ls", "--data-dir", str(data_dir), "--json"])
        assert result.exit_code == 0, result.output
        listed[name] = [(v["name"], v["version"], v["origin"]) for v in json.loads(result.output)]
    assert listed == {"origin": [("nabu", "1", True)], "peer": [("nabu", "1", False)]}
    table = runner.invoke(main, ["model", "ls", "--data-dir", str(origin)], terminal_width=200)
    row = next(line for line in table.output.splitlines() if "nabu" in line)
    assert "yes" in row.split("│")[6], table.output  # the origin column


def test_a_held_decision_names_the_operator_key_of_the_fleet_its_certificate_is_in(tmp_path, monkeypatch):
    """`mesh demo` keeps its fleet in demo-run/fleet: the approve/deny hints must point there."""
    from mesh.cli.admin import unblock_commands
    from mesh.identity.ca import init_fleet

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MESH_FLEET", raising=False)
    monkeypatch.delenv("MESH_ADMIN_CREDS", raising=False)
    init_fleet(Path("demo-run/fleet"))
    approve, deny = unblock_commands("3f9a0c1d2e4b5a69", "127.0.0.1:17400",
                                     Path("demo-run/fleet/operators/admin"))
    assert approve == ("mesh admin approve 3f9a0c1d2e4b5a69 --key demo-run/fleet/operator.key "
                       "--node 127.0.0.1:17400 --creds demo-run/fleet/operators/admin")
    assert "--key demo-run/fleet/operator.key" in deny
    # The default folder needs no --creds, and its key is ./fleet/operator.key.
    approve, _ = unblock_commands("3f9a0c1d2e4b5a69", "127.0.0.1:17400", Path("fleet/operators/admin"))
    assert approve == "mesh admin approve 3f9a0c1d2e4b5a69 --key fleet/operator.key --node 127.0.0.1:17400"
