"""bench/scale.py runs end to end (--quick) and ends with its JSON line; the figures themselves are
the bench's business, never asserted here beyond being real numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
RATES = ("steady_bytes_per_node_s", "release_bytes_per_node_s", "release_bytes_per_node",
         "holdings_updates_per_node")
EXPONENTS = ("gossip_exponent_steady", "gossip_exponent_release")
SUSPICIONS = ("false_suspicions_without_lifeguard", "false_suspicions_with_lifeguard")


def test_quick_run_ends_with_the_json_figures():
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.keys() >= {*RATES, *EXPONENTS, *SUSPICIONS, "sizes"}
    assert len(figures["sizes"]) >= 2
    for key in RATES:
        assert len(figures[key]) == len(figures["sizes"]), key
        assert all(math.isfinite(x) and x > 0 for x in figures[key]), (key, figures[key])
    assert figures["pools"] == "sites"  # --quick measures sites mode, the one meant to stay flat
    for key in EXPONENTS:
        assert math.isfinite(figures[key]), (key, figures[key])
    for key in SUSPICIONS:
        # A rate per node-hour; with Lifeguard a short run may well see none.
        assert math.isfinite(figures[key]) and figures[key] >= 0, (key, figures[key])
    assert "per node-hour" in done.stdout and "exponent" in done.stdout  # the tables a person reads


def test_help_explains_the_json_line():
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--quick" in done.stdout and "JSON" in done.stdout
