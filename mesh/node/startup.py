"""One-line reasons a node cannot start, naming the address or path and what to do.

The node turns each into `NodeStartError`, and `mesh node` prints it and exits 1 (an operator
mistake is never a traceback). gRPC reports a failed bind without its cause (and logs a line
of its own), so the node asks `listen_error` first: it binds the address with a plain socket,
as gRPC would, and says why that fails.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


def data_dir_error(path: Path, exc: OSError) -> str:
    """Why `data_dir` (or a folder inside it) cannot be made, and what to do."""
    path = Path(exc.filename) if exc.filename else Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return (f"data_dir: {blocker} is a file, not a directory; set data_dir in the config to a directory "
                "(it is made if missing), or move the file away")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "is on a read-only file system" if exc.errno == errno.EROFS else "is not writable by this user"
        return (f"data_dir: {path} {why} (uid {os.getuid()}); give the node's user a writable directory "
                "there or set data_dir elsewhere")
    if exc.errno == errno.ENOSPC:
        return f"data_dir: cannot create {path}: no space left on the device; free some space"
    return f"data_dir: cannot create {path}: {exc.strerror or exc}"


def listen_error(address: str, host: str, port: int) -> str | None:
    """Why the gRPC server cannot bind `address` and what to do; None when it can right now."""
    reason = _bind_errno(host, port)
    if reason is None:
        return None
    if reason == errno.EADDRINUSE:
        return (f"listen: cannot serve gRPC on {address}: address already in use; stop the process holding "
                f"port {port} (`ss -ltnp 'sport = :{port}'` names it) or set listen to a free port")
    if reason == errno.EADDRNOTAVAIL:
        return (f"listen: cannot serve gRPC on {address}: no such address on this host; set listen to one of "
                "its addresses (or 0.0.0.0) and advertise to the address peers dial")
    if reason == errno.EACCES:
        return (f"listen: cannot serve gRPC on {address}: permission denied; use a port above 1023 or give "
                "the node CAP_NET_BIND_SERVICE")
    return f"listen: cannot serve gRPC on {address}: {os.strerror(reason)}"


def _bind_errno(host: str, port: int) -> int | None:
    """The errno a plain bind of host:port gets now (None if it binds, or the host does not resolve)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return exc.errno
    return None
