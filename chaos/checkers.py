"""Invariant checkers, run on a `RunRecord` after the faults healed and the cluster settled.

Each checker is a pure function of the record and returns a `CheckResult` whose problems
name what broke and where (node, decision, stream, term). A checker that cannot judge
(the node exposes nothing to judge by) says `skip` and why; it never passes silently.

- acknowledged_decisions: every decision a client saw applied is in the audit log of every
  replica of its site, and every replica routes each moved stream where that decision put it
  unless a later applied decision moved it again (Jepsen's set checker, for a routing table).
- replicas_agree: the replicas of a site hold the same routes and allocations, each read
  after a read barrier (etcd's hash check).
- guard_scope: no decision above the configured scope is applied on any replica without an
  `approved` record by a trusted operator key before it (recomputed from the policy).
- audit_chains: every audit chain verifies; a log a nemesis tampered with must *not* verify.
- model_versions: every serving node ends on the same version of the model (where the run
  rolls a version out: the version its site's outcome says, judged by `rollouts`), and no node
  ever served a version signed by a key outside the fleet or one nobody published.
- rollouts: every replica of every site ends each rollout finished (completed or aborted) and
  agreeing with its site; every node ends on its site's outcome (the target of a completed
  rollout, the baseline of an aborted one; the baseline where the rollout never started); a bad
  version's rollout starts and every site aborts it; and where a site aborted, no device outside
  the waves the site reached ever served the target.
- membership: after the heal every running node sees every other running node alive, within
  a bound derived from the SWIM timings.
- one_leader_per_term: in each site, no two nodes are named leader for the same Raft term.
- nodes_running: no node process died by itself (every one the harness did not kill runs).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos.history import ACKNOWLEDGED, NodeFinal, RunRecord
from mesh.rollout.cohort import cohort_score, first_wave

PASS, FAIL, SKIP = "pass", "fail", "skip"
MAX_PROBLEMS_SHOWN = 20


@dataclass
class CheckResult:
    name: str
    status: str
    summary: str
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    advisory: bool = False  # reported, but a failure does not fail the run (unless --strict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def _result(
    name: str, problems: list[str], ok_summary: str, figures: dict[str, Any] | None = None
) -> CheckResult:
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = f" (+{len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        return CheckResult(name, FAIL, f"{len(problems)} problem(s): {shown[0]}{more}", shown, figures or {})
    return CheckResult(name, PASS, ok_summary, [], figures or {})


# -- audit helpers ------------------------------------------------------------------------------


@dataclass
class _Applied:
    decision_id: str
    raft_index: int | None
    seq: int
    moves: list[dict[str, str]]
    approved_by: str | None
    kind: str
    allocations: list[dict[str, Any]]


def _records(final: NodeFinal) -> list[dict[str, Any]]:
    return list((final.audit or {}).get("records") or [])


def _applied(records: Iterable[dict[str, Any]]) -> dict[str, _Applied]:
    out = {}
    for r in records:
        if r.get("kind") != "applied":
            continue
        p = r.get("payload") or {}
        did = p.get("decision_id")
        if did:
            out[did] = _Applied(
                did,
                p.get("raft_index"),
                r.get("seq", 0),
                list(p.get("moves") or []),
                p.get("approved_by"),
                p.get("kind", ""),
                list(p.get("allocations") or []),
            )
    return out


def _route_writes(records: Iterable[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(raft_index, stream, node) for every route a log says was set (applied moves, initial claims)."""
    out = []
    for r in records:
        p = r.get("payload") or {}
        index = p.get("raft_index")
        if not isinstance(index, int):
            continue
        if r.get("kind") == "applied":
            out += [(index, m["stream"], m["to"]) for m in p.get("moves") or []]
        elif r.get("kind") == "routes_assigned":
            out += [(index, s, n) for s, n in (p.get("routes") or {}).items()]
    return out


def _gaps(records: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    """Raft index ranges this replica never applied (it installed another member's snapshot)."""
    return [
        (int(r["payload"]["from_index"]), int(r["payload"]["to_index"]))
        for r in records
        if r.get("kind") == "snapshot_installed" and isinstance((r.get("payload") or {}).get("to_index"), int)
    ]


def _site_nodes(record: RunRecord, site: str) -> list[str]:
    return sorted(n for n, s in record.spec.sites.items() if s == site)


def _unreadable(record: RunRecord, nodes: Iterable[str], what: str, attr: str) -> list[str]:
    problems = []
    for node in nodes:
        final = record.final.get(node)
        if final is None or getattr(final, attr) is None:
            why = "; ".join(final.errors) if final and final.errors else "it did not answer"
            problems.append(f"cannot read {what} of {node} after the run ({why})")
    return problems


# -- checkers -----------------------------------------------------------------------------------


def acknowledged_decisions(record: RunRecord) -> CheckResult:
    name = "acknowledged_decisions"
    acked = [
        op
        for op in record.ops
        if op.kind in ("move", "approve")
        and op.outcome == ACKNOWLEDGED
        and op.detail.get("outcome") == "applied"
        and op.detail.get("decision_id")
    ]
    if not acked:  # a lost acknowledged decision needs one acknowledged first
        return CheckResult(
            name, SKIP, "no decision was acknowledged as applied: nothing to look for in the replicas",
            figures={"acknowledged_applied": 0},
        )
    problems: list[str] = []
    sites = sorted({op.site for op in acked})
    tampered = set(record.spec.tampered_audit)
    checked = 0
    for site in sites:
        nodes = _site_nodes(record, site)
        problems += _unreadable(record, nodes, "the audit log", "audit")
        problems += _unreadable(record, nodes, "the routes", "routes")
        logs = {n: _records(record.final[n]) for n in nodes if n in record.final and record.final[n].audit}
        applied = {n: _applied(rs) for n, rs in logs.items()}
        union: dict[str, _Applied] = {}
        for per_node in applied.values():
            for did, a in per_node.items():
                union.setdefault(did, a)
        writes = sorted({w for rs in logs.values() for w in _route_writes(rs)})
        for op in (o for o in acked if o.site == site):
            did = op.detail["decision_id"]
            index = union[did].raft_index if did in union else None
            moves = op.detail.get("moves") or (union[did].moves if did in union else [])
            what = (
                f"decision {did} ({_moves_text(moves)}; {op.kind} acknowledged as applied by {op.node} "
                f"at t={op.end_s or op.start_s:.1f}s)"
            )
            for node, per_node in applied.items():
                if node in tampered:
                    continue  # a nemesis altered this log on disk: audit_chains judges it
                checked += 1
                if did in per_node:
                    continue
                if index is not None and any(lo <= index <= hi for lo, hi in _gaps(logs[node])):
                    continue  # covered by a snapshot this replica installed: on the record as a gap
                problems.append(f"{what} is missing from {node}'s audit log")
            for move in moves:
                stream, target = move["stream"], move["to"]
                later = index is not None and any(i > index and s == stream for i, s, _ in writes)
                if later:
                    continue
                for node in nodes:
                    routes = (record.final.get(node) and record.final[node].routes or {}).get("routes")
                    if routes is None:
                        continue
                    if routes.get(stream) != target:
                        problems.append(
                            f"{node} routes {stream} to {routes.get(stream)}, but {what} moved it "
                            f"to {target} and no later applied decision moved it"
                        )
    return _result(
        name,
        problems,
        f"{len(acked)} acknowledged applied decisions present on every replica ({checked} replica checks)",
        {"acknowledged_applied": len(acked)},
    )


def _moves_text(moves: list[dict[str, str]]) -> str:
    return ", ".join(f"{m.get('stream')} {m.get('from')}->{m.get('to')}" for m in moves) or "no moves"


def replicas_agree(record: RunRecord) -> CheckResult:
    name = "replicas_agree"
    problems: list[str] = []
    sites = sorted(set(record.spec.sites.values()))
    compared = 0
    for site in sites:
        nodes = _site_nodes(record, site)
        problems += _unreadable(record, nodes, "the routes", "routes")
        views = {n: record.final[n].routes for n in nodes if n in record.final and record.final[n].routes}
        for node, view in views.items():
            if not (view.get("group") or {}).get("current", False):
                problems.append(
                    f"{node} could not confirm its routes are current after the run "
                    f"({(view.get('group') or {}).get('note', 'no leader reachable')})"
                )
        if len(views) < 2:
            continue
        compared += 1
        for table in ("routes", "allocations"):
            keys = sorted({k for v in views.values() for k in (v.get(table) or {})})
            for key in keys:
                values = {n: (v.get(table) or {}).get(key) for n, v in views.items()}
                if len(set(values.values())) > 1:
                    spread = ", ".join(f"{n}: {values[n]}" for n in sorted(values))
                    problems.append(f"site {site}: replicas disagree on {table[:-1]} {key} ({spread})")
    return _result(name, problems, f"replicas of {compared} site(s) hold identical routes and allocations")


def _exceeds(scope: dict[str, Any], limits: dict[str, float]) -> list[str]:
    over = []
    if scope.get("nodes_affected", 0) > limits.get("max_nodes", float("inf")):
        over.append(f"{scope['nodes_affected']} nodes > {limits['max_nodes']}")
    if scope.get("fraction_of_group", 0.0) > limits.get("max_fraction", float("inf")) + 1e-9:
        over.append(f"{scope['fraction_of_group']:.2f} of the group > {limits['max_fraction']}")
    if scope.get("streams_moved", 0) > limits.get("max_streams", float("inf")):
        over.append(f"{scope['streams_moved']} streams > {limits['max_streams']}")
    return over


def _own_scope(applied: _Applied, group_size: int) -> dict[str, Any]:
    """The scope of an applied decision from its own record, as the guard computes it (mesh.guard.core):
    the nodes its moves and allocations touch, their share of the group, the streams moved."""
    nodes = {m.get("from") for m in applied.moves} | {m.get("to") for m in applied.moves}
    nodes |= {a.get("node") for a in applied.allocations}
    return {
        "nodes_affected": len(nodes),
        "fraction_of_group": len(nodes) / max(group_size, 1),
        "streams_moved": len(applied.moves),
    }


def guard_scope(record: RunRecord) -> CheckResult:
    name = "guard_scope"
    problems: list[str] = []
    operators = set(record.spec.operator_key_ids)
    proposals: dict[str, dict[str, Any]] = {}
    for final in record.final.values():
        for r in _records(final):
            if r.get("kind") == "proposed":
                p = r.get("payload") or {}
                proposals.setdefault(p.get("decision_id"), p)
    above_proposed = {
        did for did, p in proposals.items()
        if (limits := record.spec.guard.get(p.get("kind") or "")) and _exceeds(p.get("scope") or {}, limits)
    }
    held_anywhere = {
        (r.get("payload") or {}).get("decision_id")
        for final in record.final.values()
        for r in _records(final)
        if r.get("kind") == "held"
    }
    judged = above_seen = 0
    for node, final in sorted(record.final.items()):
        records = _records(final)
        approvals: dict[str, list[tuple[int, str]]] = defaultdict(list)
        held = set()
        for r in records:
            p = r.get("payload") or {}
            if r.get("kind") == "approved":
                approvals[p.get("decision_id")].append((r.get("seq", 0), p.get("key_id")))
            elif r.get("kind") == "held":
                held.add(p.get("decision_id"))
        group_size = record.spec.group_sizes.get(record.spec.sites.get(node, ""), 0)
        for did, a in _applied(records).items():
            proposal = proposals.get(did)
            kind = (proposal or {}).get("kind") or a.kind
            limits = record.spec.guard.get(kind)
            # A decision applied within scope has its proposal in the same entry's records: without one in
            # any log, the applied record's own moves and allocations are what it is judged by. (An approved
            # one is judged by its approval: its proposal may lie in entries a snapshot covered, and a
            # tampered log may have changed its id.)
            if proposal is not None:
                scope = proposal.get("scope")
            else:
                scope = _own_scope(a, group_size) if a.approved_by is None else None
            over = _exceeds(scope or {}, limits) if limits else []
            judged += 1
            if not (over or did in held):
                if a.approved_by is not None and a.approved_by not in operators:
                    problems.append(
                        f"{node} applied {did} naming approver key {a.approved_by}, "
                        "which is not an operator key"
                    )
                continue
            above_seen += 1
            why = "; ".join(over) if over else "it was held"
            if a.approved_by is None:
                problems.append(
                    f"{node} applied {did} ({_moves_text(a.moves)}) without an approval although "
                    f"it is above scope ({why})"
                )
                continue
            if a.approved_by not in operators:
                problems.append(
                    f"{node} applied {did} approved by key {a.approved_by}, which is not an operator "
                    "key of this fleet"
                )
            before = [key for seq, key in approvals.get(did, []) if seq < a.seq]
            if a.approved_by not in before:
                broken = not ((final.audit or {}).get("verdict") or {}).get("ok", True)
                problems.append(
                    f"{node} applied {did} as approved by {a.approved_by}, but its audit log has no "
                    "approval by that key before the apply"
                    + (" (this log's chain is broken too: see audit_chains)" if broken else "")
                )
    figures = {
        "judged": judged,
        "above_scope": above_seen,
        "above_scope_proposed": len(above_proposed | held_anywhere),
    }
    if not problems and not above_proposed and not held_anywhere:  # a guard nobody asked to hold anything
        return CheckResult(
            name, SKIP, "no decision above scope was proposed: the guard was not put to the test", [], figures
        )
    return _result(
        name,
        problems,
        f"{judged} applies judged over every replica's log, {above_seen} of them above scope, each with a "
        f"prior operator approval ({figures['above_scope_proposed']} decisions proposed above scope)",
        figures,
    )


def audit_chains(record: RunRecord) -> CheckResult:
    name = "audit_chains"
    problems: list[str] = []
    tampered = set(record.spec.tampered_audit)
    raft_nodes = sorted(record.spec.sites)
    problems += _unreadable(record, raft_nodes, "the audit log", "audit")
    verified = 0
    for node in raft_nodes:
        final = record.final.get(node)
        if final is None or final.audit is None:
            continue
        verdict = final.audit.get("verdict") or {}
        if node in tampered:
            if verdict.get("ok"):
                problems.append(
                    f"{node}'s audit log was altered on disk by a nemesis, but it still verifies: "
                    "the tampering went undetected"
                )
            continue
        if not verdict.get("ok"):
            problems.append(
                f"{node}'s audit chain is broken at record {verdict.get('first_bad_seq')}: "
                f"{verdict.get('reason')}"
            )
        verified += 1
    return _result(
        name,
        problems,
        f"{verified} audit chains verify"
        + (f"; tampering detected on {', '.join(sorted(tampered))}" if tampered else ""),
    )


def model_versions(record: RunRecord) -> CheckResult:
    name = "model_versions"
    problems: list[str] = []
    published, rogue = set(record.spec.published), set(record.spec.rogue)
    served: dict[str, set[str]] = defaultdict(set)
    for sample in record.samples:
        if sample.kind == "inference" and sample.data.get("active_version"):
            served[sample.node].add(sample.data["active_version"])
    for op in record.ops:
        if op.kind == "infer" and op.outcome == ACKNOWLEDGED and op.detail.get("version"):
            served[op.detail.get("served_by") or op.node].add(op.detail["version"])
    # Bytes: every activation seen (sampled, and at the end) loaded the bytes published as its version.
    loaded = [(s.node, s.data) for s in record.samples if s.kind == "inference"]
    loaded += [(n, f.inference) for n, f in sorted(record.final.items()) if f.running and f.inference]
    wrong_bytes: set[tuple[str, str, str]] = set()
    for node, data in loaded:
        version, digest = data.get("active_version"), data.get("active_sha256")
        expected = record.spec.published_sha256.get(version or "")
        if digest and expected and digest != expected:
            wrong_bytes.add((node, version, digest))
    for node, version, digest in sorted(wrong_bytes):
        problems.append(
            f"{node} activated {record.spec.model} {version} from bytes with sha256 {digest[:16]}..., not "
            f"the {record.spec.published_sha256[version][:16]}... published: it loaded bytes that do not "
            "verify"
        )
    for node, versions in sorted(served.items()):
        for version in sorted(versions & rogue):
            problems.append(
                f"{node} activated {record.spec.model} {version}, whose manifest is signed by a key "
                "outside the fleet"
            )
        for version in sorted(versions - rogue - published):
            problems.append(f"{node} served {record.spec.model} {version}, which nobody published")
    finals = {n: f.inference for n, f in record.final.items() if f.running}
    problems += _unreadable(record, sorted(finals), "the inference status", "inference")
    active = {n: (s or {}).get("active_version") or None for n, s in finals.items() if s is not None}
    if active and record.spec.rollouts:
        idle = sorted(n for n, v in active.items() if v is None)
        if idle:
            problems.append(f"{', '.join(idle)} serve no version of {record.spec.model} at the end")
    elif active:
        if None in active.values():
            idle = sorted(n for n, v in active.items() if v is None)
            problems.append(f"{', '.join(idle)} serve no version of {record.spec.model} at the end")
        ends = {v for v in active.values() if v}
        if len(ends) > 1:
            spread = ", ".join(f"{n}: {v}" for n, v in sorted(active.items()))
            problems.append(f"nodes end on different versions of {record.spec.model} ({spread})")
    final_versions = sorted({v for v in active.values() if v})
    return _result(
        name,
        problems,
        f"{len(active)} nodes end on {record.spec.model} {', '.join(final_versions)}; "
        "no unverified version ever served, every activation seen loaded the published bytes",
        {"final_versions": final_versions},
    )


FINAL_ROLLOUT_STATES = ("completed", "aborted")


def _served(record: RunRecord) -> dict[str, set[str]]:
    """Versions each node was seen serving itself: its sampled active version, and the answers to
    requests it served for itself (device-infer). A stream's request is answered by the stream's
    owner, not by the node asked, so those are left out."""
    served: dict[str, set[str]] = defaultdict(set)
    for sample in record.samples:
        if sample.kind == "inference" and sample.data.get("active_version"):
            served[sample.node].add(sample.data["active_version"])
    for op in record.ops:
        if op.kind == "device-infer" and op.outcome == ACKNOWLEDGED and op.detail.get("version"):
            served[op.node].add(op.detail["version"])
    return served


def _ends_on(record: RunRecord, sites: list[str], expected: str, because: str) -> list[str]:
    """Each running node of the sites that ends on another version than `expected`, as a problem."""
    problems = []
    for site in sites:
        for node in _site_nodes(record, site):
            final = record.final.get(node)
            if final is None or not final.running or final.inference is None:
                continue  # model_versions names unreadable and stopped nodes
            active = final.inference.get("active_version")
            if active != expected:
                problems.append(
                    f"{node} ends on {record.spec.model} {active}, but {because}: it must serve {expected}"
                )
    return problems


def rollouts(record: RunRecord) -> CheckResult:
    name = "rollouts"
    if not record.spec.rollouts:
        if record.spec.bad:  # the run exists to show a bad version rolled back: nothing shown is a failure
            problem = (
                f"bad version(s) {', '.join(record.spec.bad)} were published to be rolled out, but no "
                "rollout was started: the rollback this run is for was never tested (see the publish and "
                "rollout-start operations in the report)"
            )
            return CheckResult(name, FAIL, "a bad version was never rolled out", [problem])
        return CheckResult(name, SKIP, "this run rolled nothing out")
    problems: list[str] = []
    served = _served(record)
    sites = sorted(set(record.spec.sites.values()))
    outcomes: dict[str, dict[str, str]] = {}
    for i, rollout in enumerate(record.spec.rollouts):
        rid, target, baseline = rollout["rollout_id"], rollout["target"], rollout["baseline"]
        started = any(
            o.kind == "rollout-start" and o.outcome == ACKNOWLEDGED and o.detail.get("rollout_id") == rid
            for o in record.ops
        )
        docs = {
            n: (f.rollouts or {}).get(rid)
            for n, f in record.final.items()
            if f.running and f.rollouts is not None and (f.rollouts or {}).get(rid) is not None
        }
        if not started and not any(d.get("has_plan") for d in docs.values()):
            outcomes[rid] = {}
            # Never started (its start was refused everywhere): no wave to judge, but no node may
            # serve its target either, and a bad version's rollout that never ran tested no gate.
            if target in record.spec.bad:
                problems.append(
                    f"rollout {rid} of the bad version {target} never started: no gate was put to the test"
                )
            if i == len(record.spec.rollouts) - 1:
                problems += _ends_on(record, sites, baseline, f"rollout {rid} never started")
            continue
        problems += _unreadable(
            record,
            sorted(n for n, f in record.final.items() if f.running and n not in docs),
            f"rollout {rid}",
            "rollouts",
        )
        outcomes[rid] = {}
        for site in sites:
            states = {n: d["site_state"] for n, d in docs.items() if record.spec.sites.get(n) == site}
            missing = sorted(n for n, st in states.items() if st is None)
            if missing:
                problems.append(f"site {site}: {', '.join(missing)} hold no state of rollout {rid}")
            held = {n: st for n, st in states.items() if st is not None}
            ends = {st["state"] for st in held.values()}
            unfinished = {n: st for n, st in held.items() if st["state"] not in FINAL_ROLLOUT_STATES}
            if unfinished:
                n, st = sorted(unfinished.items())[0]
                problems.append(
                    f"site {site}: rollout {rid} is not finished at the end: {n} holds it {st['state']} at "
                    f"wave {st['wave']}, waiting for {st.get('waiting_for') or '?'}"
                )
            elif len(ends) > 1:
                spread = ", ".join(f"{n}: {st['state']}" for n, st in sorted(held.items()))
                problems.append(f"site {site}: replicas end rollout {rid} differently ({spread})")
            if len(ends) != 1 or unfinished:
                continue
            end = ends.pop()
            outcomes[rid][site] = end
            if end == "completed" and target in record.spec.bad:
                problems.append(
                    f"site {site} completed rollout {rid} of the bad version {target}: its gates never "
                    "caught the errors its devices served"
                )
            if end == "aborted":
                # Waves are nested prefixes of one ranking: the reached wave's threshold bounds them all.
                furthest = max(held.values(), key=lambda st: st["wave"])
                reached = furthest["wave"]
                thresholds = [None if t is None else int(t, 16) for t in furthest.get("thresholds", [])]
                for node in _site_nodes(record, site):
                    if target in served.get(node, set()) and (
                        first_wave(cohort_score(rid, node), thresholds[:reached]) is None
                    ):
                        problems.append(
                            f"{node} served {target} of rollout {rid}, but site {site} aborted it at wave "
                            f"{reached} and {node} is in none of its waves up to there"
                        )
            if i == len(record.spec.rollouts) - 1:
                expected = target if end == "completed" else baseline
                problems += _ends_on(record, [site], expected, f"site {site} {end} rollout {rid}")
        if target in record.spec.bad:
            # a completed site is named above; this names those with no final outcome at all
            unaborted = sorted(site for site in sites if outcomes[rid].get(site) not in FINAL_ROLLOUT_STATES)
            if unaborted:
                problems.append(
                    f"rollout {rid} of the bad version {target} did not end aborted in "
                    f"{', '.join(unaborted)}: every site's gate must roll it back"
                )
    described = "; ".join(
        f"{rid}: " + (", ".join(f"{site} {end}" for site, end in sorted(ends.items())) or "never started")
        for rid, ends in outcomes.items()
    )
    return _result(
        name,
        problems,
        f"{described}; every node on its site's outcome, no device outside the reached waves served a target",
        {"outcomes": outcomes},
    )


def membership(record: RunRecord) -> CheckResult:
    name = "membership"
    problems: list[str] = []
    running = sorted(n for n, f in record.final.items() if f.running)
    problems += _unreadable(record, running, "the membership view", "status")
    for observer in running:
        status = record.final[observer].status
        if status is None:
            continue
        states = {m["node_id"]: m["state"] for m in status.get("members", [])}
        for member in running:
            if member == observer:
                continue
            state = states.get(member, "absent")
            if state != "alive":
                problems.append(
                    f"{observer} sees {member} as {state} after the heal, but {member} is running "
                    "and reachable"
                )
    figures: dict[str, Any] = {"bound_s": record.spec.membership_bound_s}
    if record.healed_at_s is not None:
        if record.converged_at_s is None:
            problems.append(
                f"membership never reconverged after the heal at t={record.healed_at_s:.1f}s "
                f"(settle ended at t={record.settled_at_s or 0:.1f}s)"
            )
        else:
            took = max(0.0, record.converged_at_s - record.healed_at_s)
            figures["reconverged_after_s"] = round(took, 2)
            if took > record.spec.membership_bound_s:
                problems.append(
                    f"membership took {took:.1f}s to reconverge after the heal, above the bound of "
                    f"{record.spec.membership_bound_s:.1f}s derived from the SWIM timings"
                )
    took_text = f" in {figures['reconverged_after_s']}s" if "reconverged_after_s" in figures else ""
    return _result(
        name,
        problems,
        f"{len(running)} running nodes see each other alive{took_text} "
        f"(bound {record.spec.membership_bound_s:.0f}s)",
        figures,
    )


def one_leader_per_term(record: RunRecord) -> CheckResult:
    name = "one_leader_per_term"
    # Only a node's claim to lead (it names itself) counts: a follower's view of who leads can lag a
    # term change by a tick (pysyncobj sets the new leader before it stores the new term).
    terms = [
        s
        for s in record.samples
        if s.kind == "term" and s.data.get("term") is not None and s.data.get("leader") == s.node
    ]
    if not terms:
        return CheckResult(
            name,
            SKIP,
            "no leader's claim with a Raft term was observed (the node reports no term "
            "in `mesh admin status`/routes, and no term sample was taken)",
        )
    named: dict[tuple[str, int], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s in terms:
        leader = s.data.get("leader")
        if not leader:
            continue
        site = record.spec.sites.get(s.node, "?")
        named[(site, int(s.data["term"]))][leader].append(f"{s.t_s:.1f}s")
    problems = []
    for (site, term), leaders in sorted(named.items()):
        if len(leaders) > 1:
            who = "; ".join(
                f"{leader} (claimed at {', '.join(sorted(set(at))[:3])})"
                for leader, at in sorted(leaders.items())
            )
            problems.append(f"site {site}, term {term}: {len(leaders)} leaders: {who}")
    return _result(
        name,
        problems,
        f"{len(named)} (site, term) pairs, one leader each, from {len(terms)} leader claims",
        {"terms_seen": len(named), "samples": len(terms)},
    )


def nodes_running(record: RunRecord) -> CheckResult:
    name = "nodes_running"
    problems = []
    for node, final in sorted(record.final.items()):
        if not final.running:
            why = "; ".join(final.errors) or "its process is gone"
            problems.append(f"{node} is not running at the end of the run ({why})")
    return _result(name, problems, f"all {len(record.final)} node processes running")


CHECKERS: dict[str, Callable[[RunRecord], CheckResult]] = {
    "acknowledged_decisions": acknowledged_decisions,
    "replicas_agree": replicas_agree,
    "guard_scope": guard_scope,
    "audit_chains": audit_chains,
    "model_versions": model_versions,
    "rollouts": rollouts,
    "membership": membership,
    "one_leader_per_term": one_leader_per_term,
    "nodes_running": nodes_running,
}


def run_checkers(record: RunRecord) -> list[CheckResult]:
    results = []
    for name, check in CHECKERS.items():
        try:
            results.append(check(record))
        except Exception as exc:  # noqa: BLE001 - a checker bug must show as a failure, not end the report
            results.append(
                CheckResult(
                    name,
                    FAIL,
                    f"checker crashed: {type(exc).__name__}: {exc}",
                    [f"checker crashed: {type(exc).__name__}: {exc}"],
                )
            )
    return results


# -- availability (reported, never asserted) ---------------------------------------------------


def phases(record: RunRecord, end_s: float | None = None) -> list[tuple[str, float, float]]:
    """(label, start, end) of each phase: before the faults, between each fault change (named by
    the faults active then), and after the last heal."""
    events = sorted(record.faults, key=lambda f: f.t_s)
    end = end_s if end_s is not None else max([o.end_s or o.start_s for o in record.ops] + [0.0]) + 0.001
    if not events:
        return [("no faults", 0.0, end)]
    out = [("before faults", 0.0, events[0].t_s)]
    active: dict[str, str] = {}
    for i, event in enumerate(events):
        if event.action == "apply":
            active[event.nemesis] = event.nemesis
        else:
            active.pop(event.nemesis, None)
        stop = events[i + 1].t_s if i + 1 < len(events) else end
        if stop <= event.t_s:
            continue
        label = (
            ("during " + " + ".join(sorted(active)))
            if active
            else ("after heal" if i == len(events) - 1 else "between faults")
        )
        out.append((label, event.t_s, stop))
    return out


def availability(record: RunRecord) -> list[dict[str, Any]]:
    """Share of Infer requests answered, and of decision writes acknowledged, in each phase."""
    rows = []
    for label, start, end in phases(record):
        infer = [o for o in record.ops if o.kind == "infer" and start <= o.start_s < end]
        writes = [o for o in record.ops if o.kind in ("move", "approve") and start <= o.start_s < end]
        answered = sum(o.outcome == ACKNOWLEDGED for o in infer)
        acked = sum(o.outcome == ACKNOWLEDGED for o in writes)
        rows.append(
            {
                "phase": label,
                "from_s": round(start, 1),
                "to_s": round(end, 1),
                "infer": len(infer),
                "infer_answered": answered,
                "infer_share": round(answered / len(infer), 3) if infer else None,
                "writes": len(writes),
                "writes_acknowledged": acked,
                "writes_share": round(acked / len(writes), 3) if writes else None,
            }
        )
    return rows
