"""Crash loops on a new version: the pure count across restarts, and a real node process that is
SIGKILLed while it serves a new version until it gives the version up and serves the old one."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

from mesh.admin.client import AdminClient, AdminError
from mesh.inference.crashloop import (
    CRASH_LIMIT,
    ActiveState,
    Trial,
    activated,
    activating,
    after_restart,
    clean_stop,
    stable,
)
from mesh.node.local import FAST_TIMINGS, LocalFleet, free_ports, spawn_node_process, write_node_config
from tests.models import wakeword_model


def _run_on(state: ActiveState, version: str, active: str | None) -> ActiveState:
    """One run that activates `version` (while `active` serves) and is then killed."""
    return activated(activating(state, version, active), version)


def test_a_version_that_kills_the_node_on_trial_is_refused_at_the_limit() -> None:
    state = _run_on(ActiveState("m", version="1"), "2", "1")  # 2 replaces 1: on trial
    assert state.trial == Trial("2", "1", 0) and state.live == "2"
    for crash in range(1, CRASH_LIMIT):
        state, refused = after_restart(state)
        assert refused is None and state.trial == Trial("2", "1", crash) and state.live is None
        state = _run_on(state, "2", None)  # the restarted node takes version 2 up again, and dies
    state, refused = after_restart(state)
    assert refused == "2" and state.refused == ("2",) and state.trial is None
    # It stays refused across later restarts and through the file.
    again, refused = after_restart(ActiveState.from_json(clean_stop(state).to_json(), "m"))
    assert refused is None and again.refused == ("2",)


def test_clean_stops_long_runs_rollbacks_and_old_versions_never_count() -> None:
    on_trial = _run_on(ActiveState("m", version="1"), "2", "1")
    # A clean stop is not a crash.
    assert after_restart(clean_stop(on_trial)) == (clean_stop(on_trial), None)
    # Serving long enough ends the trial: a power loss afterwards counts nothing.
    settled, refused = after_restart(stable(on_trial, "2"))
    assert refused is None and settled.trial is None
    # A node that only ever served one version has nothing on trial: however often it dies, it keeps it.
    lone = _run_on(ActiveState("m"), "1", None)
    for _ in range(CRASH_LIMIT + 2):
        lone, refused = after_restart(lone)
        assert refused is None and lone.refused == ()
        lone = _run_on(lone, "1", None)
    # Rolling back to the version a trial replaced ends the trial: the baseline is never on trial.
    back = activating(on_trial, "1", "2")
    assert back.trial is None
    # Dying on another version than the one on trial does not count for it.
    other, _ = after_restart(activated(activating(on_trial, "3", None), "3"))
    assert other.trial == Trial("2", "1", 0)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"model": "other", "version": "1", "live": "1"}',
     b'{"model": "m", "trial": {"version": "2", "previous": "1", "crashes": -1}, "crash_refused": "2"}'],
)
def test_a_state_file_that_is_missing_odd_or_of_another_model_reads_as_fresh_or_partial(data) -> None:
    state = ActiveState.from_json(data, "m")
    assert state.model == "m" and state.trial is None and state.refused == () and state.live is None


def test_the_file_of_an_older_node_reads_as_a_clean_stop() -> None:
    state = ActiveState.from_json(b'{"model": "m", "version": "1.4"}', "m")
    assert state == ActiveState("m", version="1.4") and after_restart(state) == (state, None)
    full = ActiveState("m", "2", "2", Trial("2", "1", 2), ("0.9",))
    assert ActiveState.from_json(full.to_json(), "m") == full


# --- a real node process ------------------------------------------------------------------------------


def _active(client: AdminClient) -> str | None:
    try:
        return client.inference().active_version or None
    except AdminError:
        return None  # not up yet


def _wait_active(client: AdminClient, version: str, proc: subprocess.Popen, log, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (seen := _active(client)) != version:
        assert proc.poll() is None, f"the node exited with {proc.returncode}: {log.read_text()[-2000:]}"
        tail = log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"the node serves {seen}, not {version}: {tail}"
        time.sleep(0.1)  # polling the node's status


def _wait_state(path, settled, proc: subprocess.Popen, log, timeout_s: float = 30.0) -> dict:
    """The node's state file once `settled(state)` holds (it is written just after an activation)."""
    deadline = time.monotonic() + timeout_s
    while not settled(state := json.loads(path.read_bytes())):
        assert proc.poll() is None, f"the node exited with {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"the state file still says {state}"
        time.sleep(0.05)  # polling a file the node rewrites
    return state


def test_a_node_killed_again_and_again_on_a_new_version_goes_back_to_the_old_one(tmp_path) -> None:
    # Its own fleet: this directory also runs under scripts/test-tflite-runtime.sh, without tests/conftest.py.
    fleet = LocalFleet(tmp_path / "fleet")
    port, = free_ports(1)
    config, data_dir, log = tmp_path / "n.toml", tmp_path / "d", tmp_path / "n.log"
    write_node_config(config, node_id="crashy", address=f"127.0.0.1:{port}", seeds=[], site="essen",
                      tls_dir=fleet.node_credentials("crashy").directory, data_dir=data_dir,
                      timings=FAST_TIMINGS, inference={"model": "nabu", "workers": 1})

    def publish(name: str, version: str) -> None:
        done = subprocess.run([sys.executable, "-m", "mesh", "model", "publish", str(wakeword_model(name)),
                               "--name", "nabu", "--version", version, "--key",
                               str(fleet.directory / "publisher.key"), "--data-dir", str(data_dir), "--json"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    publish("okay_nabu", "1")
    client = AdminClient(f"127.0.0.1:{port}", fleet.operator, timeout_s=2.0)
    proc = spawn_node_process(config, log)
    try:
        _wait_active(client, "1", proc, log)
        # The admin status names the bytes the runtime loaded (the chaos checkers compare them).
        loaded = hashlib.sha256(wakeword_model("okay_nabu").read_bytes()).hexdigest()
        assert client.inference().active_sha256 == loaded
        publish("hey_jarvis", "2")  # a node without a site group moves to the newest version: 2 on trial
        _wait_active(client, "2", proc, log)
        for crash in range(1, CRASH_LIMIT + 1):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            state = json.loads((data_dir / "active-model.json").read_bytes())
            assert state["live"] == "2" and state["trial"]["crashes"] == crash - 1, state
            proc = spawn_node_process(config, log)
            # Below the limit the restarted node takes the new version up again; at the limit it refuses it.
            _wait_active(client, "2" if crash < CRASH_LIMIT else "1", proc, log)
        # The node reports 1 active as soon as it serves it, and records it as served just after.
        state = _wait_state(data_dir / "active-model.json", lambda s: s.get("version") == "1", proc, log)
        assert state["crash_refused"] == ["2"] and state["live"] == "1", state
        assert "refusing nabu 2: the node stopped without a clean shutdown 3 times" in log.read_text()
        # A clean stop is not counted: SIGTERM, start again, still on 1, and 2 still refused.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert json.loads((data_dir / "active-model.json").read_bytes())["live"] is None
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
