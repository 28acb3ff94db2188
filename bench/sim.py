"""Simulator validation: where both run (10^3 and 10^4 devices), the models behind `mesh sim`
agree with the node's own cores within 20%.

- membership: rounds until every device knows a new version, and failure detection time in a site
  (`mesh.sim.membership`: real membership cores on the in-memory network vs the vectorised model);
- distribution: seconds until every device holds the version, origin egress and cross-site bytes in
  copies (`mesh.sim.distribution`: real SwarmSchedulers in the discrete-event swarm vs the slot model);
- rollout: bad-version exposure, first failing gate and time until every device is back on the baseline
  (`mesh.sim.rollout`: real cohort, gate and state cores per site vs the closed-form expectation).

Its last line is one JSON object with the figures. On a 2-core machine it takes about 10 minutes
(the membership cores at 10^4 devices are most of it).

    python bench/sim.py
    python bench/sim.py --sizes 1000 --membership-seeds 2     # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from mesh.sim.distribution import validate_distribution
from mesh.sim.membership import validate
from mesh.sim.rollout import validate_rollout

TOLERANCE = 0.20
SITE_SIZE = 100


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--membership-seeds", type=int, default=3)
    parser.add_argument("--distribution-seeds", type=int, default=2)
    parser.add_argument("--rollout-seeds", type=int, default=4)
    args = parser.parse_args()
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    out: dict[str, list[dict]] = {"membership": [], "distribution": [], "rollout": []}
    errors: list[float] = []
    print(
        f"{'part':<13} {'devices':>8} {'sites':>6}  {'figure':<28} {'cores':>10} {'model':>10} {'error':>8}"
    )
    for devices in args.sizes:
        sites = max(1, math.ceil(devices / SITE_SIZE))
        m = validate(
            devices, sites, list(range(1, args.membership_seeds + 1)), detection_trials=2, progress=progress
        )
        out["membership"].append(m.to_json())
        rows = [
            ("rounds_known_all", m.cores_rounds, m.model_rounds, m.rounds_error),
            ("detection_s", m.cores_detection_s, m.model_detection_s, m.detection_error),
        ]
        d = validate_distribution(
            devices, sites, list(range(1, args.distribution_seeds + 1)), progress=progress
        )
        out["distribution"].append(d.to_json())
        r = validate_rollout(devices, sites, list(range(1, args.rollout_seeds + 1)), progress=progress)
        out["rollout"].append(r.to_json())
        for part, table in (
            ("membership", rows),
            ("distribution", [(f, d.cores[f], d.model[f], d.error(f)) for f in d.FIGURES]),
            ("rollout", [(f, r.cores[f], r.model[f], r.error(f)) for f in r.FIGURES]),
        ):
            for figure, cores, model, error in table:
                errors.append(abs(error))
                print(
                    f"{part:<13} {devices:>8,} {sites:>6,}  {figure:<28} {cores:>10.4g} {model:>10.4g} "
                    f"{error:>+8.1%}",
                    flush=True,
                )
    worst = max(errors)
    verdict = "within" if worst <= TOLERANCE else "OUTSIDE"
    print(
        f"worst model error {worst:.1%}: {verdict} the {TOLERANCE:.0%} tolerance "
        f"({time.perf_counter() - started:.0f} s)"
    )
    print(
        json.dumps(
            out
            | {
                "worst_error": round(worst, 3),
                "tolerance": TOLERANCE,
                "wall_s": round(time.perf_counter() - started, 1),
            },
            sort_keys=True,
        )
    )
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
