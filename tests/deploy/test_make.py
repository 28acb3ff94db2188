"""The Makefile's targets a newcomer runs: `make bench` runs every benchmark under bench/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def benches_in_makefile() -> list[str]:
    match = re.search(r"^BENCHES\s*:=\s*(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile has no BENCHES list"
    return match.group(1).split()


def test_make_bench_lists_every_benchmark():
    on_disk = sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))
    assert sorted(benches_in_makefile()) == on_disk


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_runs_each_one(tmp_path):
    """`make -n bench` (nothing run) shows the loop over the list; the list holds consensus."""
    command = ["make", "-n", "-C", str(REPO), "bench", "STAMP=/dev/null", "MEDIAPIPE_STAMP=/dev/null"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "bench/$name.py" in done.stdout and "consensus" in done.stdout, done.stdout
