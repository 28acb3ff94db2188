"""bench/consensus.py runs end to end (--quick) and ends with its JSON line; speed itself is the bench's
business, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "consensus.py"
KEYS = {
    "commits_per_s_1",
    "commits_per_s_16",
    "raw_commits_per_s_1",
    "raw_commits_per_s_16",
    "tcp_commits_per_s_1",
    "tcp_commits_per_s_16",
    "etcd_commits_per_s_1",
    "etcd_commits_per_s_16",
    "ratio_tcp_1",
    "ratio_tcp_16",
    "ratio_etcd_1",
    "ratio_etcd_16",
    "failover_median_s",
    "failover_max_s",
    "etcd_failover_median_s",
    "journal_flushes_per_commit_16",
}


def test_quick_run_ends_with_the_json_figures():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.keys() >= KEYS
    for key in KEYS - {
        "etcd_commits_per_s_1",
        "etcd_commits_per_s_16",
        "ratio_etcd_1",
        "ratio_etcd_16",
        "etcd_failover_median_s",
    }:
        assert isinstance(figures[key], float) and figures[key] > 0, (key, figures[key])
    assert figures["etcd_commits_per_s_16"] is None and figures["ratio_etcd_16"] is None  # no --against etcd
    assert figures["ratio_tcp_16"] == figures["commits_per_s_16"] / figures["tcp_commits_per_s_16"]
    assert figures["failover_median_s"] <= figures["failover_max_s"]
    # Group commit: the leader syncs its journal less than once per commit with 16 proposers.
    assert figures["journal_flushes_per_commit_16"] < 1.0
    assert "site" in done.stdout and "tcp" in done.stdout  # the table a person reads


def test_help_explains_the_json_line():
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--against" in done.stdout and "--quick" in done.stdout and "JSON" in done.stdout


def test_a_bad_option_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--systems", "site,zookeeper"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "zookeeper" in done.stderr
