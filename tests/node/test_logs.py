"""Structured logs: with `log_format = "json"` every line a node writes is one JSON object with
time, level, logger, message and the node's id, which log shippers read as is."""

from __future__ import annotations

import io
import json
import logging
import signal
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.node.local import FAST_TIMINGS, free_address, poll_until, spawn_node_process, write_node_config
from mesh.node.logs import JsonLogFormatter, setup_logging

FIELDS = {"time", "level", "logger", "message", "node_id"}


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord("mesh.test", logging.WARNING, __file__, 1, message, args, exc_info)


@given(message=st.text(), node_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
def test_any_message_is_one_json_line(message, node_id):
    line = JsonLogFormatter(node_id).format(record("%s", message))
    assert "\n" not in line
    doc = json.loads(line)
    assert set(doc) == FIELDS and doc["message"] == message and doc["node_id"] == node_id
    assert doc["level"] == "warning" and doc["logger"] == "mesh.test"
    assert doc["time"].endswith("Z") and datetime.fromisoformat(doc["time"])


def test_an_exception_is_carried_in_the_same_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError as exc:
        line = JsonLogFormatter("n1").format(record("failed %d", 3, exc=exc))
    doc = json.loads(line)
    assert doc["message"] == "failed 3" and "ValueError: boom" in doc["exception"] and "\n" not in line


@pytest.fixture
def root_logging():
    """setup_logging configures the root logger: put it back as it was for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_setup_logging_text_and_json(root_logging):
    stream = io.StringIO()
    setup_logging(level="info", log_format="json", node_id="n1", stream=stream)
    logging.getLogger("mesh.x").info("hello %s", "there")
    logging.getLogger("mesh.x").debug("not shown")
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["hello there"]
    with pytest.raises(ValueError, match="log_format"):
        setup_logging(level="info", log_format="yaml", node_id="n1", stream=stream)
    setup_logging(level="warning", log_format="text", node_id="n1", stream=stream)


def test_a_running_node_with_json_logs_writes_only_json_lines(tmp_path, fleet):
    config = tmp_path / "node.toml"
    write_node_config(config, node_id="json-01", address=free_address(), seeds=[], site="a",
                      tls_dir=fleet.node_credentials("json-01").directory, data_dir=tmp_path / "data",
                      timings=FAST_TIMINGS)
    config.write_text('log_format = "json"\n' + config.read_text())
    log = tmp_path / "node.log"
    process = spawn_node_process(config, log)
    try:
        poll_until(lambda: "listening on" in log.read_text(), 30.0, "the node logs that it listens",
                   check=lambda: process.poll() is None or pytest.fail(log.read_text()))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = log.read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert all(set(doc) >= FIELDS and doc["node_id"] == "json-01" for doc in docs), lines
    assert any(d["logger"] == "mesh.node" and "listening on" in d["message"] for d in docs)
    assert any("stopped" in d["message"] for d in docs)


def test_a_shutdown_step_over_its_bound_is_named_and_a_quick_one_is_not(caplog):
    from mesh.node.runtime import _slow_step

    caplog.set_level(logging.WARNING, logger="mesh.node")
    with _slow_step("site group close", slow_s=60.0):
        pass
    assert "stopping:" not in caplog.text
    with _slow_step("site group close", slow_s=0.0):
        pass
    assert "stopping: site group close took" in caplog.text
