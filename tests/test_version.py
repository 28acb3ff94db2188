"""`mesh --version` from the installed entry point (the script pip made), and from `python -m mesh`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mesh

ENTRY_POINT = str(Path(sys.executable).with_name("mesh"))
COMMANDS = {"entry-point": [ENTRY_POINT], "python-m": [sys.executable, "-m", "mesh"]}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_version(command):
    if not Path(command[0]).exists():
        pytest.skip(f"no {command[0]}: the package is not installed in this interpreter's environment")
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"mesh, version {mesh.__version__}\n", "")
