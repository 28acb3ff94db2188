"""Plain-HTTP probes beside the metrics: `/metrics`, `/healthz`, `/readyz`, and systemd's notify.

The node's gRPC port speaks only mTLS, so neither a kubelet nor systemd can ask it
whether the node is well. This module serves, on the metrics port:

- `GET /metrics`: the node's Prometheus registry (text or OpenMetrics, gzip when asked).
- `GET /healthz`: liveness. 200 while the asyncio loop turns: a `Heartbeat` on the loop
  stamps the time every `interval_s`, and a stamp older than `stale_after_s` answers 503.
  The HTTP server runs in threads of its own, so a stalled loop is reported, not just slow.
- `GET /readyz`: readiness. The node's readiness callable (run on the loop, so it reads
  the node's state from the thread that owns it) returns `(ready, reasons)`; not ready
  answers 503 with one reason a line. A stalled loop is not ready either.

Answers hold no secrets: fixed texts, ages in seconds and the readiness reasons, which
the caller promises are free of key material (each is cut to one line of at most
`MAX_REASON_CHARS`). A readiness callable that raises answers 503 naming only the
exception's type; the traceback goes to the log.

`sd_notify(state)` tells systemd (`Type=notify`) that the node is ready (`READY=1`), is
stopping (`STOPPING=1`) or still alive (`WATCHDOG=1`, see `watchdog_pinger`).

Wiring in the node (a sketch; `start` runs inside the event loop):

    heartbeat = Heartbeat(loop, on_beat=watchdog_pinger())
    heartbeat.start()
    probes = ProbeServer(metrics.registry, readiness=node.readiness, heartbeat=heartbeat)
    port = probes.start(host, port)          # ProbeBindError names the address
    sd_notify("READY=1")
    ...
    sd_notify("STOPPING=1"); probes.stop(); heartbeat.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

log = logging.getLogger("mesh.node.probes")

# The loop stamps once a second; ten missed stamps is a loop that no longer serves
# peers (SWIM probes time out after half a second), well before a kubelet's default
# liveness budget (3 failures x 10 s) restarts the pod.
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_STALE_AFTER_S = 10.0
# How long /readyz waits for the loop to run the readiness callable.
DEFAULT_READINESS_TIMEOUT_S = 2.0
MAX_REASON_CHARS = 200

Readiness = Callable[[], tuple[bool, Iterable[str]]]
T = TypeVar("T")


class ProbeServerError(Exception):
    """The probe and metrics server cannot start; the message names the address and what to do."""


class ProbeBindError(ProbeServerError):
    """The probe and metrics address cannot be bound (in use, not local, not permitted).

    `address` is "host:port" as given.
    """

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


class Heartbeat:
    """The event loop's pulse: a timer on `loop` stamps `clock()` every `interval_s`.

    `start()` and `stop()` run on the loop; `age_s()` may be read from any thread.
    `on_beat` (for example the systemd watchdog ping) runs on the loop at each stamp,
    so it too stops when the loop stalls.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_beat: Callable[[], object] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval_s must be positive, got {interval_s}")
        self.loop = loop
        self.interval_s = interval_s
        self._clock = clock
        self._on_beat = on_beat
        self._last = clock()  # constructed counts as alive: the loop has until stale_after_s to start
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Stamp now and every `interval_s` from here on. Call on the loop."""
        if self._handle is None:
            self._beat()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def age_s(self) -> float:
        """Seconds since the loop last stamped."""
        return max(0.0, self._clock() - self._last)

    def _beat(self) -> None:
        self._last = self._clock()
        if self._on_beat is not None:
            try:
                self._on_beat()
            except Exception:  # a failing ping must not stop the pulse that /healthz reads
                log.exception("heartbeat callback failed")
        self._handle = self.loop.call_later(self.interval_s, self._beat)


class ProbeServer:
    """`/metrics`, `/healthz` and `/readyz` on one plain-HTTP port, served from threads.

    Built with everything it reads; `start(host, port)` binds and returns the bound port
    (port 0 picks a free one), `stop()` closes it.
    """

    def __init__(self, registry: CollectorRegistry, readiness: Readiness, heartbeat: Heartbeat, *,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 readiness_timeout_s: float = DEFAULT_READINESS_TIMEOUT_S) -> None:
        if stale_after_s <= heartbeat.interval_s:
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed the heartbeat interval "
                             f"({heartbeat.interval_s}), or a healthy loop would read as stalled")
        self._registry = registry
        self._readiness = readiness
        self._heartbeat = heartbeat
        self.stale_after_s = stale_after_s
        self.readiness_timeout_s = readiness_timeout_s
        self._metrics_app = make_wsgi_app(registry)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self._httpd.server_port if self._httpd is not None else None

    def start(self, host: str, port: int) -> int:
        """Bind `host:port` and serve in a daemon thread. Raises ProbeBindError naming the address."""
        if self._httpd is not None:
            raise ProbeServerError(f"probe server already serving on port {self.port}")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        except socket.gaierror as exc:
            raise ProbeBindError(address, f"cannot serve metrics and probes on {address}: {exc.strerror}; "
                                          "set metrics_listen to an address of this host") from None

        class _Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._httpd = make_server(host, port, self._app, _Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ProbeBindError(address, _bind_message(address, exc)) from None
        # A short poll interval keeps stop() quick; idle cost is one select() per 0.1 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,),
                                        name=f"probes-{self.port}", daemon=True)
        self._thread.start()
        return self._httpd.server_port

    def stop(self) -> None:
        """Stop serving and close the socket; in-flight answers finish on their own threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- answers ------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(live, text) as /healthz answers it."""
        age_s = self._heartbeat.age_s()
        if age_s > self.stale_after_s:
            return False, (f"event loop stalled: last heartbeat {age_s:.1f} s ago "
                           f"(limit {self.stale_after_s:.1f} s)\n")
        return True, "ok\n"

    def ready(self) -> tuple[bool, str]:
        """(ready, text) as /readyz answers it. Runs the readiness callable on the loop."""
        live, text = self.health()
        if not live:
            return False, f"not ready:\n- {text}"
        try:
            ready, reasons = self._call_on_loop(self._readiness)
        except LoopUnavailable as exc:
            return False, f"not ready:\n- {exc}\n"
        except Exception as exc:
            log.exception("readiness check failed")
            return False, f"not ready:\n- readiness check failed ({type(exc).__name__}); see the node's log\n"
        if ready:
            return True, "ready\n"
        lines = [_one_line(r) for r in reasons] or ["not ready (no reason given)"]
        return False, "not ready:\n" + "".join(f"- {line}\n" for line in lines)

    def _call_on_loop(self, fn: Readiness) -> tuple[bool, list[str]]:
        ready, reasons = call_on_loop(self._heartbeat.loop, fn, self.readiness_timeout_s,
                                      what="the readiness check")
        return bool(ready), [str(r) for r in reasons]

    def _app(self, environ: Mapping[str, object], start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path not in ("/healthz", "/readyz"):
            return _text(start_response, "404 Not Found", "not found: serves /metrics, /healthz, /readyz\n")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", "use GET\n", [("Allow", "GET, HEAD")])
        ok, text = self.health() if path == "/healthz" else self.ready()
        body = _text(start_response, "200 OK" if ok else "503 Service Unavailable", text)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else body


class LoopUnavailable(Exception):
    """The event loop is not running, or did not run a call in time."""


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout_s: float, *,
                 what: str = "the check") -> T:
    """Run `fn` on `loop` and return its result: at once when called on the loop's own thread,
    else through `call_soon_threadsafe`, waiting at most `timeout_s`. An exception of `fn` is
    raised here; a loop that is not running or does not get to it raises LoopUnavailable."""
    try:
        if asyncio.get_running_loop() is loop:
            return fn()
    except RuntimeError:  # no loop runs in this thread
        pass
    if loop.is_closed() or not loop.is_running():
        raise LoopUnavailable("event loop not running")
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # closed between the check and the call
        raise LoopUnavailable("event loop not running") from None
    try:
        return done.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        done.cancel()
        raise LoopUnavailable(f"event loop did not run {what} within {timeout_s:.1f} s") from None


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request: a kubelet probes every few seconds."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def _text(start_response: Callable, status: str, text: str,
          extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"),
                            ("Content-Length", str(len(body))), *(extra or [])])
    return [body]


def _one_line(reason: str) -> str:
    line = " ".join(str(reason).split())
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 3] + "..."


def _bind_message(address: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot serve metrics and probes on {address}: address already in use; stop the process "
                "holding it or set metrics_listen to a free port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot serve metrics and probes on {address}: no such address on this host; "
                "set metrics_listen to one of its addresses (or 0.0.0.0)")
    if exc.errno == errno.EACCES:
        return (f"cannot serve metrics and probes on {address}: permission denied; use a port above 1023 "
                "or give the node CAP_NET_BIND_SERVICE")
    return f"cannot serve metrics and probes on {address}: {exc.strerror or exc}"


# -- systemd ------------------------------------------------------------------------


def sd_notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", "WATCHDOG=1", "STATUS=...") to systemd.

    Returns False when the process was not started by systemd with a notify socket
    ($NOTIFY_SOCKET unset), or when sending failed (logged): a unit with Type=notify
    then times out, which is systemd's to report.
    """
    environ = os.environ if environ is None else environ
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    elif not path.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying", path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s) of %s: %s", environ.get("NOTIFY_SOCKET"), state, exc)
        return False
    return True


def watchdog_interval_s(*, environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """systemd's watchdog timeout for this process (WatchdogSec=), or None when none is set."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None  # set for another process (a parent shell)
    try:
        timeout_s = int(usec) / 1_000_000
    except ValueError:
        return None
    return timeout_s if timeout_s > 0 else None


def watchdog_pinger(*, environ: Mapping[str, str] | None = None) -> Callable[[], bool] | None:
    """A `Heartbeat.on_beat` that sends WATCHDOG=1, or None when systemd set no watchdog.

    The heartbeat beats far more often than the watchdog timeout, so one missed datagram
    does not get the node killed; a stalled loop stops the pings and systemd restarts it.
    """
    environ = dict(os.environ if environ is None else environ)
    if watchdog_interval_s(environ=environ) is None:
        return None
    return lambda: sd_notify("WATCHDOG=1", environ=environ)
