"""The probe server over real HTTP, with a real event loop in a thread that the tests can stall."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from mesh.node.probes import (
    Heartbeat,
    ProbeBindError,
    ProbeServer,
    sd_notify,
    watchdog_interval_s,
    watchdog_pinger,
)

INTERVAL_S = 0.05
STALE_AFTER_S = 0.5


class LoopThread:
    """An asyncio loop running forever in a thread of its own, as the node's loop would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def call(self, fn, timeout_s: float = 5.0):
        """Run fn on the loop and return its result."""
        done = threading.Event()
        box: list = []
        self.loop.call_soon_threadsafe(lambda: (box.append(fn()), done.set()))
        assert done.wait(timeout_s), "loop did not run the call"
        return box[0]

    def stall(self) -> threading.Event:
        """Block the loop until the returned event is set."""
        release = threading.Event()
        self.loop.call_soon_threadsafe(lambda: release.wait(60))
        return release

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def get(url: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def poll(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)  # polling pace, not synchronisation


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


class Ready:
    """A readiness callable the test flips; records which thread ran it."""

    def __init__(self) -> None:
        self.state: tuple[bool, list[str]] = (True, [])
        self.threads: set[int] = set()

    def __call__(self) -> tuple[bool, list[str]]:
        self.threads.add(threading.get_ident())
        return self.state


@pytest.fixture
def served(loop_thread):
    registry = CollectorRegistry()
    requests = Counter("fleetmesh_test_requests", "A counter for the test", registry=registry)
    requests.inc(3)
    ready = Ready()
    heartbeat = Heartbeat(loop_thread.loop, interval_s=INTERVAL_S)
    loop_thread.call(heartbeat.start)
    server = ProbeServer(registry, ready, heartbeat, stale_after_s=STALE_AFTER_S, readiness_timeout_s=1.0)
    port = server.start("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", ready, loop_thread
    server.stop()
    loop_thread.call(heartbeat.stop)


def test_metrics_and_healthy_probes(served):
    base, _, _ = served
    status, body, headers = get(base + "/metrics")
    assert status == 200
    assert "fleetmesh_test_requests_total 3.0" in body
    assert headers["Content-Type"].startswith("text/plain")
    assert get(base + "/healthz")[:2] == (200, "ok\n")
    assert get(base + "/readyz")[:2] == (200, "ready\n")
    status, body, _ = get(base + "/nothing")
    assert status == 404 and "/healthz" in body
    assert get(base + "/healthz", method="POST")[0] == 405
    status, body, _ = get(base + "/readyz", method="HEAD")
    assert (status, body) == (200, "")


def test_stalled_loop_fails_liveness_and_readiness_then_recovers(served):
    base, _, loop_thread = served
    assert get(base + "/healthz")[0] == 200
    release = loop_thread.stall()
    try:
        status, body, _ = poll(lambda: (r := get(base + "/healthz"))[0] == 503 and r, 10, "/healthz 503")
        assert body.startswith("event loop stalled: last heartbeat")
        assert f"limit {STALE_AFTER_S:.1f} s" in body
        status, body, _ = get(base + "/readyz")
        assert status == 503 and "event loop stalled" in body
        # /metrics is still served: a stalled loop must not hide what the node last counted.
        assert get(base + "/metrics")[0] == 200
    finally:
        release.set()
    poll(lambda: get(base + "/healthz")[0] == 200, 10, "/healthz 200 after the loop resumed")
    assert get(base + "/readyz")[0] == 200


def test_readiness_reasons_are_listed_one_a_line(served):
    base, ready, loop_thread = served
    ready.state = (False, ["not joined: no seed answered yet", "no leader in site group berlin\nsecond line"])
    status, body, headers = get(base + "/readyz")
    assert status == 503
    assert body == ("not ready:\n- not joined: no seed answered yet\n"
                    "- no leader in site group berlin second line\n")
    assert headers["Cache-Control"] == "no-store"
    assert ready.threads == {loop_thread.thread.ident}, "readiness must run on the loop's thread"
    ready.state = (False, ["x" * 1000])
    _, body, _ = get(base + "/readyz")
    assert len(body.splitlines()[1]) <= 2 + 200
    ready.state = (False, [])
    assert get(base + "/readyz")[:2] == (503, "not ready:\n- not ready (no reason given)\n")
    ready.state = (True, [])
    assert get(base + "/readyz")[:2] == (200, "ready\n")


def test_a_failing_readiness_check_answers_503_without_its_message(loop_thread):
    def readiness():
        raise RuntimeError("key.pem holds -----BEGIN PRIVATE KEY----- abc")

    heartbeat = Heartbeat(loop_thread.loop, interval_s=INTERVAL_S)
    loop_thread.call(heartbeat.start)
    server = ProbeServer(CollectorRegistry(), readiness, heartbeat, stale_after_s=STALE_AFTER_S)
    port = server.start("127.0.0.1", 0)
    try:
        status, body, _ = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert "RuntimeError" in body and "PRIVATE" not in body and "key.pem" not in body
    finally:
        server.stop()
        loop_thread.call(heartbeat.stop)


def test_readiness_on_a_loop_that_does_not_run_is_503():
    loop = asyncio.new_event_loop()
    try:
        heartbeat = Heartbeat(loop, interval_s=INTERVAL_S)
        server = ProbeServer(CollectorRegistry(), lambda: (True, []), heartbeat, stale_after_s=60)
        port = server.start("127.0.0.1", 0)
        try:
            status, body, _ = get(f"http://127.0.0.1:{port}/readyz")
            assert (status, body) == (503, "not ready:\n- event loop not running\n")
        finally:
            server.stop()
    finally:
        loop.close()


def test_busy_port_is_a_bind_error_naming_the_address(loop_thread):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = ProbeServer(CollectorRegistry(), lambda: (True, []), Heartbeat(loop_thread.loop))
        with pytest.raises(ProbeBindError) as caught:
            server.start("127.0.0.1", port)
    assert caught.value.address == f"127.0.0.1:{port}"
    assert str(caught.value) == (f"cannot serve metrics and probes on 127.0.0.1:{port}: address already in "
                                 "use; stop the process holding it or set metrics_listen to a free port")
    assert server.port is None


def test_an_address_not_on_this_host_is_a_bind_error(loop_thread):
    server = ProbeServer(CollectorRegistry(), lambda: (True, []), Heartbeat(loop_thread.loop))
    with pytest.raises(ProbeBindError, match=r"192\.0\.2\.1:0: no such address on this host"):
        server.start("192.0.2.1", 0)  # TEST-NET-1: never assigned to a host


def test_stop_frees_the_port_for_the_next_start(loop_thread):
    server = ProbeServer(CollectorRegistry(), lambda: (True, []), Heartbeat(loop_thread.loop))
    port = server.start("127.0.0.1", 0)
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = ProbeServer(CollectorRegistry(), lambda: (True, []), Heartbeat(loop_thread.loop))
    assert again.start("127.0.0.1", port) == port
    again.stop()


def test_ipv6_loopback(loop_thread):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    server = ProbeServer(CollectorRegistry(), lambda: (True, []), Heartbeat(loop_thread.loop))
    try:
        port = server.start("::1", 0)
    except ProbeBindError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert get(f"http://[::1]:{port}/healthz")[0] == 200
    finally:
        server.stop()


def test_stale_limit_must_exceed_the_heartbeat_interval(loop_thread):
    with pytest.raises(ValueError, match="must exceed the heartbeat interval"):
        ProbeServer(CollectorRegistry(), lambda: (True, []), Heartbeat(loop_thread.loop, interval_s=1.0),
                    stale_after_s=1.0)


def test_heartbeat_age_follows_its_clock(loop_thread):
    now = [100.0]
    heartbeat = Heartbeat(loop_thread.loop, interval_s=10.0, clock=lambda: now[0])
    now[0] = 107.5
    assert heartbeat.age_s() == 7.5
    loop_thread.call(heartbeat.start)
    assert heartbeat.age_s() == 0.0
    loop_thread.call(heartbeat.stop)


# -- systemd notify -------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


def test_sd_notify_sends_the_state_to_the_notify_socket(notify_socket):
    sock, path = notify_socket
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1"
    assert sd_notify("STOPPING=1\nSTATUS=leaving the fleet", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=leaving the fleet"


def test_sd_notify_abstract_socket():
    name = f"fleetmesh-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_sd_notify_without_systemd_or_with_a_dead_socket_is_false(tmp_path):
    assert not sd_notify("READY=1", environ={})
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"})


def test_watchdog_interval_reads_systemds_variables():
    pid = os.getpid()
    assert watchdog_interval_s(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 30.0
    assert watchdog_interval_s(environ={"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval_s(environ={}) is None
    assert watchdog_interval_s(environ={"WATCHDOG_USEC": "0"}) is None
    assert watchdog_pinger(environ={}) is None


@given(usec=st.text(max_size=30), watchdog_pid=st.text(max_size=10))
def test_watchdog_interval_never_raises(usec, watchdog_pid):
    value = watchdog_interval_s(environ={"WATCHDOG_USEC": usec, "WATCHDOG_PID": watchdog_pid}, pid=1)
    assert value is None or value > 0


def test_heartbeat_pings_the_systemd_watchdog_until_the_loop_stalls(loop_thread, notify_socket):
    sock, path = notify_socket
    pinger = watchdog_pinger(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert pinger is not None
    heartbeat = Heartbeat(loop_thread.loop, interval_s=INTERVAL_S, on_beat=pinger)
    loop_thread.call(heartbeat.start)
    assert [sock.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    release = loop_thread.stall()
    try:
        # At most a ping or two sent before the stall took hold; then nothing arrives.
        sock.settimeout(10 * INTERVAL_S)
        with pytest.raises(TimeoutError):
            for _ in range(5):
                sock.recv(64)
    finally:
        release.set()
    sock.settimeout(10)
    assert sock.recv(64) == b"WATCHDOG=1"
    loop_thread.call(heartbeat.stop)
