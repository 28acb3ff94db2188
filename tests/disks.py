"""Full disks for tests: a real tmpfs that small (`tiny_disk` fixture in conftest.py), filled to its
last byte, so writers meet ENOSPC from the kernel, partial writes included."""

from __future__ import annotations

import errno
import os
from pathlib import Path

FILLER = "filler"


def fill_to_the_last_byte(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; return the filler (delete it to heal)."""
    filler = directory / FILLER
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        for size in (65536, 4096, 512, 64, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler
