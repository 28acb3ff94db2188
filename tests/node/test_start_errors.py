"""`mesh node` processes that cannot start end with one line naming the address or path and what
to do, exit 1 (as README and `mesh node --help` say), and no traceback; with log_format json,
that line is a JSON log record."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from mesh.node.local import FAST_TIMINGS, free_address, spawn_node_process, write_node_config


def run_node(tmp_path: Path, fleet, *, name: str, **config) -> tuple[int, list[str], Path]:
    """Run `mesh node` with a config written from `config` until it exits; (code, output lines, config)."""
    config.setdefault("address", free_address())
    config.setdefault("data_dir", tmp_path / "data")
    log_format = config.pop("log_format", None)
    timings = config.pop("timings", FAST_TIMINGS)
    path = tmp_path / f"{name}.toml"
    write_node_config(path, node_id="start-01", seeds=[], site="a", timings=timings,
                      tls_dir=fleet.node_credentials("start-01").directory, **config)
    if log_format:  # a top-level key: above the first [table]
        path.write_text(f"log_format = {json.dumps(log_format)}\n" + path.read_text())
    log = tmp_path / f"{name}.log"
    process = spawn_node_process(path, log)
    try:
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, log.read_text().splitlines(), path


@pytest.fixture
def held_port():
    """A loopback port another process holds (listening), as a second node on the device would."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def assert_one_error_line(code: int, lines: list[str], config: Path, *words: str) -> None:
    """Exit 1, the output ends in one `error:` line holding `words`; before it at most info lines
    (the node's own "stopped" when it had begun to start)."""
    assert code == 1, lines
    *before, last = lines
    assert all(" INFO " in line for line in before), "\n".join(lines)
    assert last.startswith(f"error: {config}: "), last
    for word in words:
        assert word in last, last


def test_a_busy_grpc_port_is_one_line_naming_the_address(tmp_path, fleet, held_port):
    code, lines, config = run_node(tmp_path, fleet, name="grpc", address=f"127.0.0.1:{held_port}")
    assert_one_error_line(code, lines, config, f"listen: cannot serve gRPC on 127.0.0.1:{held_port}",
                          "address already in use", "set listen to a free port")


def test_a_busy_metrics_port_is_one_line_naming_the_address(tmp_path, fleet, held_port):
    code, lines, config = run_node(tmp_path, fleet, name="metrics", metrics_listen=f"127.0.0.1:{held_port}")
    assert_one_error_line(code, lines, config, f"metrics and probes on 127.0.0.1:{held_port}",
                          "address already in use", "metrics_listen")


def test_a_data_dir_that_is_a_file_is_one_line_naming_the_path(tmp_path, fleet):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    code, lines, config = run_node(tmp_path, fleet, name="file", data_dir=blocker)
    assert_one_error_line(code, lines, config, f"data_dir: {blocker} is a file, not a directory",
                          "set data_dir")


def test_a_data_dir_under_a_file_is_one_line_naming_the_path(tmp_path, fleet):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    code, lines, config = run_node(tmp_path, fleet, name="under", data_dir=blocker / "data")
    assert_one_error_line(code, lines, config, f"data_dir: {blocker}", "not a directory")


def test_gossip_messages_too_small_for_the_metadata_is_one_line_naming_the_setting(tmp_path, fleet):
    import dataclasses

    small = dataclasses.replace(FAST_TIMINGS, max_gossip_bytes=2048)  # the config allows >= 512
    code, lines, config = run_node(tmp_path, fleet, name="gossip", timings=small)
    assert_one_error_line(code, lines, config, "membership.max_gossip_bytes = 2048 leaves 512 bytes",
                          "set max_gossip_bytes to at least")


def test_with_json_logs_the_failure_is_a_json_log_line(tmp_path, fleet, held_port):
    code, lines, config = run_node(tmp_path, fleet, name="json", address=f"127.0.0.1:{held_port}",
                                   log_format="json")
    assert code == 1 and len(lines) == 1, lines
    record = json.loads(lines[0])
    assert (record["level"], record["node_id"], record["logger"]) == ("critical", "start-01", "mesh.node")
    assert f"cannot serve gRPC on 127.0.0.1:{held_port}" in record["message"]
