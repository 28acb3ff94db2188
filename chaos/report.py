"""The report of a run: one JSON document and a short human summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from chaos.checkers import CheckResult, availability
from chaos.history import OUTCOMES, RunRecord


def build_report(
    scenario,
    seed: int,
    record: RunRecord | None,
    results: list[CheckResult],
    *,
    workdir: Path,
    duration_s: float,
    error: str | None,
    strict: bool,
) -> dict[str, Any]:
    ops = record.ops if record else []
    by_outcome = Counter(o.outcome for o in ops)
    by_kind: dict[str, dict[str, int]] = {}
    for op in ops:
        by_kind.setdefault(op.kind, dict.fromkeys(OUTCOMES, 0))[op.outcome] += 1
    faults = [f for f in (record.faults if record else []) if f.action == "apply"]
    counted = [r for r in results if strict or not r.advisory]
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "seed": seed,
        "replay": f"python -m chaos run {scenario.name} --seed {seed}" + (" --strict" if strict else ""),
        "duration_s": round(duration_s, 1),
        "workdir": str(workdir),
        "error": error,
        "cluster": {
            "nodes": record.spec.sites if record else {},
            "timings": record.spec.timings if record else {},
            "membership_bound_s": record.spec.membership_bound_s if record else None,
        },
        "faults": [
            {"t_s": f.t_s, "nemesis": f.nemesis, "description": f.description, "detail": f.detail}
            for f in faults
        ],
        "fault_events": [
            {"t_s": f.t_s, "action": f.action, "nemesis": f.nemesis}
            for f in (record.faults if record else [])
        ],
        "operations": {**{o: by_outcome.get(o, 0) for o in OUTCOMES}, "by_kind": by_kind},
        "checkers": [
            {
                "name": r.name,
                "status": r.status,
                "advisory": r.advisory,
                "summary": r.summary,
                "problems": r.problems,
                "figures": r.figures,
            }
            for r in results
        ],
        "checkers_passed": sum(r.status == "pass" for r in counted),
        "checkers_failed": sum(r.status == "fail" for r in counted),
        "checkers_skipped": sum(r.status == "skip" for r in counted),
        "availability": availability(record) if record else [],
        "measurements": record.measurements if record else {},
        "healed_at_s": record.healed_at_s if record else None,
        "converged_at_s": record.converged_at_s if record else None,
    }


def summary_text(report: dict[str, Any]) -> str:
    lines = [
        f"scenario {report['scenario']} seed {report['seed']} ({report['duration_s']:.0f}s): "
        f"{report['description']}",
        f"replay: {report['replay']}",
        f"work dir: {report['workdir']} (report.json, record.json, logs/)",
    ]
    if report["error"]:
        lines.append(f"HARNESS ERROR: {report['error']}")
    lines.append(f"faults: {len(report['faults'])}")
    for f in report["faults"]:
        lines.append(f"  t={f['t_s']:6.1f}s {f['nemesis']}: {f['description']}")
    ops = report["operations"]
    lines.append(
        f"operations: {ops['acknowledged']} acknowledged, {ops['refused']} refused, {ops['unknown']} unknown"
        + "".join(
            f"; {k} {v['acknowledged']}/{v['refused']}/{v['unknown']}"
            for k, v in sorted(ops["by_kind"].items())
        )
    )
    lines.append(
        f"checkers: {report['checkers_passed']} passed, {report['checkers_failed']} failed, "
        f"{report['checkers_skipped']} skipped"
    )
    for c in report["checkers"]:
        mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}[c["status"]]
        note = " (advisory)" if c["advisory"] else ""
        lines.append(f"  {mark} {c['name']}{note}: {c['summary']}")
        for problem in c["problems"][1:6]:
            lines.append(f"         {problem}")
    lines.append("availability (Infer answered, writes acknowledged):")
    for row in report["availability"]:
        infer = f"{row['infer_answered']}/{row['infer']}" + (
            f" ({row['infer_share']:.0%})" if row["infer"] else ""
        )
        writes = f"{row['writes_acknowledged']}/{row['writes']}"
        lines.append(
            f"  {row['phase']:<40} t={row['from_s']:6.1f}..{row['to_s']:6.1f}s  infer {infer:<14} "
            f"writes {writes}"
        )
    heal = (report.get("measurements") or {}).get("heal")
    if heal:
        current = heal.get("time_to_current_reads_s") or {}
        lines.append(f"heal (issue 14): leader {heal.get('leader_at_split')} with sides {heal.get('sides')}")
        lines.append(
            "  time until each replica serves current reads: "
            + ", ".join(f"{n} {'never' if t is None else f'{t:.1f}s'}" for n, t in sorted(current.items()))
            + f"; all: {heal.get('all_current_after_s')}"
        )
        lines.append(
            f"  live nodes declared dead in the 20 s after the heal: {heal.get('dead_marks_20s')} (status "
            f"samples), {heal.get('log_dead_lines_20s')} (node logs); dead marks left from the partition: "
            f"{heal.get('dead_from_partition_still_marked')}, "
            + (
                f"last seen at +{heal['last_live_node_seen_dead_at_s']}s"
                if heal.get("last_live_node_seen_dead_at_s") is not None
                else "none seen"
            )
        )
        sockets = heal.get("sockets_1s_after_heal") or {}
        syn = {n: len(v["syn_sent"]) for n, v in sockets.items() if v["syn_sent"]}
        unacked = {n: len(v["grpc_unacked"]) for n, v in sockets.items() if v["grpc_unacked"]}
        lines.append(
            f"  1 s after the heal: connects in SYN-SENT {syn or 'none'}; "
            f"gRPC connections with unacknowledged data {unacked or 'none'} (diag/ss-*.txt)"
        )
        seen = heal.get("terms_after_heal") or []
        terms = seen or ["-"]
        lines.append(
            f"  Raft after the heal: {len(seen)} terms ({terms[0]}..{terms[-1]}), "
            f"{heal.get('leaders_after_heal')} (term, leader) pairs named"
        )
    return "\n".join(lines)
