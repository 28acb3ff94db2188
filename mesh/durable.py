"""Durability on disk: the one helper every crash-safe writer here needs."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: str | Path) -> None:
    """Make file creations and renames in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with its final mode, fsync, then rename.

    A crash never leaves half a file, and a private key is never readable by
    others, not even for a moment.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # a leftover temp file may have another mode
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
