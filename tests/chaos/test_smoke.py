"""The chaos harness end to end: the smoke scenario (5 real node processes in network
namespaces, one partition, one kill, every checker) passes and leaves nothing behind.

Runs in the normal suite where root and `ip netns` (with nft and tc) are available;
skipped, saying why, elsewhere. The seed is random unless CHAOS_SEED is set, and printed
on failure: `python -m chaos run smoke --seed S` replays it.
"""

from __future__ import annotations

import os
import random

import pytest

from chaos.net import PREFIX, existing_namespaces, netns_available

why_not = netns_available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"chaos smoke: {why_not}")


def test_smoke_scenario_passes_every_checker_and_cleans_up(tmp_path):
    from chaos.checkers import CHECKERS
    from chaos.runner import run_one
    from chaos.scenarios import SCENARIOS

    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    lines: list[str] = []
    # Another checkout's test suite may be running its own chaos run: wait for it rather than fail.
    result = run_one(SCENARIOS["smoke"], seed, root=tmp_path, echo=lines.append, lock_wait_s=600.0)
    replay = (
        f"seed {seed} (replay: python -m chaos run smoke --seed {seed}); report {result.workdir}/report.txt"
    )
    assert not result.failed, f"{replay}\n{result.text}"
    report = result.report
    assert report["error"] is None, replay
    assert [f["nemesis"] for f in report["faults"]] == ["0-partition-one", "1-kill-one"], replay
    assert {c["name"] for c in report["checkers"]} == set(CHECKERS), replay
    assert report["operations"]["acknowledged"] > 0, replay
    assert report["operations"]["by_kind"]["move"]["acknowledged"] > 0, replay
    # the published version was rolled out under the faults, and the rollout checker judged it
    assert sum(report["operations"]["by_kind"]["rollout-start"].values()) >= 1, replay
    statuses = {c["name"]: c["status"] for c in report["checkers"]}
    assert statuses["rollouts"] == "pass", replay
    # the workload gave the decision checkers something to judge: applied decisions, above-scope ones
    assert statuses["acknowledged_decisions"] == statuses["guard_scope"] == "pass", replay
    assert not [ns for ns in existing_namespaces() if ns.startswith(PREFIX)], (
        f"namespaces left behind; {replay}"
    )
