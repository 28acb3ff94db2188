"""`python -m chaos`: run a scenario, run the matrix, list scenarios, clean up after a crash.

Exit codes: 0 every checker passed, 1 a checker failed or the harness could not run,
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    print(f"chaos: error: {message}", file=sys.stderr)
    sys.exit(code)


def _scenarios(names: str | None) -> list:
    from chaos.scenarios import MATRIX, SCENARIOS

    chosen = MATRIX if not names else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        _fail(f"unknown scenario(s) {', '.join(unknown)}; `python -m chaos list` shows them", EXIT_USAGE)
    return [SCENARIOS[n] for n in chosen]


def _seeds(text: str) -> list[int]:
    """The seeds of --seeds, each once, in the order given."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds takes integers separated by commas, got {text!r}", EXIT_USAGE)
        raise
    if len(set(seeds)) != len(seeds):
        _fail(f"--seeds lists a seed more than once ({text}); a seed replays the same run", EXIT_USAGE)
    return seeds


def _preflight() -> None:
    from chaos.net import netns_available

    why = netns_available()
    if why:
        _fail(f"cannot run chaos scenarios here: {why}")


def cmd_run(args) -> int:
    from chaos.runner import HarnessError, run_one

    if "," in args.scenario:
        _fail(f"run takes one scenario, not {args.scenario!r}; `python -m chaos matrix --scenarios "
              f"{args.scenario}` runs several", EXIT_USAGE)
    scenario = _scenarios(args.scenario)[0]
    _preflight()
    try:
        result = run_one(scenario, args.seed, root=args.workdir, strict=args.strict)
    except HarnessError as exc:
        _fail(str(exc))
    print(result.text)
    print(f"report: {result.workdir / 'report.json'}")
    return EXIT_FAILED if result.failed else EXIT_OK


def cmd_matrix(args) -> int:
    from chaos.runner import HarnessError, run_one
    from chaos.scenarios import rotated_plan

    scenarios = _scenarios(args.scenarios)
    seeds = _seeds(args.seeds)
    if not seeds:
        _fail("--seeds needs at least one integer", EXIT_USAGE)
    if args.rotate:
        plan = rotated_plan(scenarios, seeds)
    else:
        plan = [(scenario, seed) for scenario in scenarios for seed in seeds]
    print(
        f"chaos matrix: {len(plan)} runs of {len(scenarios)} scenarios under seeds "
        f"{','.join(map(str, seeds))}" + (" (rotated)" if args.rotate else ""),
        flush=True,
    )
    for scenario, seed in plan:  # what will run, each replayable alone
        print(f"  {scenario.name} --seed {seed}", flush=True)
    _preflight()
    totals = {"acknowledged": 0, "refused": 0, "unknown": 0}
    faults = failed = passed = skipped = errors = runs = 0
    for scenario, seed in plan:
        runs += 1
        try:
            result = run_one(scenario, seed, root=args.workdir, strict=args.strict)
        except HarnessError as exc:
            print(f"chaos: {scenario.name} seed {seed}: {exc}", file=sys.stderr)
            errors += 1
            continue
        print(result.text, flush=True)
        report = result.report
        errors += report["error"] is not None
        faults += len(report["faults"])
        failed += report["checkers_failed"]
        passed += report["checkers_passed"]
        skipped += report["checkers_skipped"]
        for key in totals:
            totals[key] += report["operations"][key]
    print(
        json.dumps(
            {
                "scenarios": len(scenarios),
                "seeds": len({seed for _, seed in plan}),
                "faults": faults,
                "operations": totals,
                "checkers_failed": failed,
                "checkers_passed": passed,
                "checkers_skipped": skipped,  # nothing to judge in that run (e.g. no rollout)
                "runs": runs,
                "harness_errors": errors,
            },
            sort_keys=False,
        )
    )
    return EXIT_FAILED if failed or errors else EXIT_OK


def cmd_list(args) -> int:
    from chaos.scenarios import MATRIX, SCENARIOS

    for name, scenario in SCENARIOS.items():
        print(f"{name:<26} {'matrix' if name in MATRIX else '      '}  {scenario.description}")
    return EXIT_OK


def cmd_cleanup(args) -> int:
    from chaos.runner import HarnessError, cleanup, run_lock

    if os.geteuid() != 0:
        _fail("cleanup needs root (namespaces, mounts)")
    try:
        with run_lock():
            cleanup()
    except HarnessError as exc:
        _fail(str(exc))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from chaos.runner import DEFAULT_WORKDIR

    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description=__doc__.splitlines()[0],
        epilog="Examples:\n  python -m chaos run smoke --seed 1\n"
        "  python -m chaos matrix --seeds 1,2\n"
        "  python -m chaos matrix --seeds 1,2,3 --rotate   # what make chaos runs\n"
        "  python -m chaos run heal-leader-minority --seed 3\n"
        "  python -m chaos cleanup",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one scenario under a seed (replays it exactly)")
    run.add_argument("scenario")
    run.add_argument("--seed", type=int, default=None, help="default: a random seed (printed)")
    matrix = sub.add_parser("matrix", help="run scenarios x seeds; ends with one JSON line of totals")
    matrix.add_argument("--scenarios", default=None, help="comma-separated (default: the matrix list)")
    matrix.add_argument("--seeds", default="1", help="comma-separated integers (default: 1)")
    matrix.add_argument(
        "--rotate",
        action="store_true",
        help="instead of every scenario under every seed: the i-th scenario under the i-th seed, "
        "cycling, plus reruns until each nemesis family has met two seeds (what `make chaos` runs)",
    )
    for p in (run, matrix):
        p.add_argument(
            "--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"runs go under here ({DEFAULT_WORKDIR})"
        )
        p.add_argument(
            "--strict", action="store_true", help="advisory checkers (issue 14's heal targets) count"
        )
    sub.add_parser("list", help="list the scenarios")
    sub.add_parser("cleanup", help="remove namespaces, processes and mounts a crashed run left")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run" and args.seed is None:
        import random

        args.seed = random.SystemRandom().randrange(1, 1 << 31)
    try:
        return {"run": cmd_run, "matrix": cmd_matrix, "list": cmd_list, "cleanup": cmd_cleanup}[args.command](
            args
        )
    except KeyboardInterrupt:
        print("chaos: interrupted (namespaces and processes were removed)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
