"""A checker that cannot fail proves nothing: on real nodes built to break an invariant on purpose, the
checker of that invariant fails, and the run with it; the other checkers still pass.

`negative-unguarded`: 5 node processes whose guard allows every decision (chaos/sabotage/unguarded,
put on their PYTHONPATH by the harness; the product has no such switch), the usual workload with an
above-scope move every other second, no fault. The doctored-record tests (tests/chaos/test_checkers.py)
show every checker failing; this shows one failing against the real system.
"""

from __future__ import annotations

import os
import random

import pytest

from chaos.net import netns_available

why_not = netns_available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"chaos negative: {why_not}")


def test_a_build_that_applies_above_scope_decisions_without_approval_fails_guard_scope(tmp_path):
    from chaos.runner import run_one
    from chaos.scenarios import MATRIX, NEGATIVES, SCENARIOS

    assert not set(NEGATIVES) & set(MATRIX)
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    lines: list[str] = []
    result = run_one(SCENARIOS["negative-unguarded"], seed, root=tmp_path, echo=lines.append,
                     lock_wait_s=600.0)
    replay = f"seed {seed} (replay: python -m chaos run negative-unguarded --seed {seed})\n{result.text}"
    report = result.report
    assert report["error"] is None, replay
    statuses = {c["name"]: c["status"] for c in report["checkers"]}
    assert result.failed and statuses["guard_scope"] == "fail", replay
    assert [name for name, status in statuses.items() if status == "fail"] == ["guard_scope"], replay
    [guard] = [c for c in report["checkers"] if c["name"] == "guard_scope"]
    assert "approv" in " ".join(guard["problems"]), replay
