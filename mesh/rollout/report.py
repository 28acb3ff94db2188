"""Where a rollout stands, fleet-wide, as one node can tell from what it holds and what membership carries.
Pure: the documents `mesh rollout status` and `mesh rollout ls` print (JSON-ready dicts).

Per site: its state and wave (this node's own replica for its own site, members' notes for the others,
with the reason when a member of that site was asked), what it waits for and the gate's latest verdict.
Per wave: eligible devices (fleet-wide: reachable, selected, serving the model, not skipping), how
many are in the wave's cohort and how many of those serve the target, the target's requests and error
rate in that cohort against the baseline's outside it (cumulative counters, as gossiped), the wave's
status across sites (passed, soaking, held, paused, failed, pending) and what it waits for. Devices
that skip the rollout are listed with their reason kind, unreachable ones by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mesh.rollout.announce import RolloutNote, Serving
from mesh.rollout.cohort import wave_over_scope
from mesh.rollout.fleet import PeerView, participates, selected
from mesh.rollout.plan import RolloutPlan, format_share
from mesh.rollout.state import APPROVE_HINT, RESUME_HINT, RolloutState, SiteRollout, wave_needs_approval

MAX_NAMED = 32
# A wave's status across sites, most pressing first: the one shown when sites differ.
_STATUS_ORDER = ("failed", "paused", "held", "soaking", "pending", "cancelled", "passed")


def overall_state(states: Iterable[RolloutState]) -> str:
    """One word for a rollout across its sites."""
    found = set(states)
    if not found:
        return "unregistered"
    most_pressing_first: tuple[RolloutState, ...] = (
        RolloutState.ABORTED,
        RolloutState.PAUSED,
        RolloutState.WAITING_APPROVAL,
        RolloutState.SOAKING,
        RolloutState.PENDING,
    )
    for state in most_pressing_first:
        if state in found:
            return state.value
    return RolloutState.COMPLETED.value


def _site_rows(
    plan: RolloutPlan,
    *,
    site: str,
    own: SiteRollout | None,
    own_verdict: Mapping[str, Any] | None,
    peers: list[PeerView],
    site_views: Mapping[tuple[str, str], Mapping[str, Any]],
) -> list[dict[str, Any]]:
    sites = sorted(
        {p.site for p in peers if p.site and (selected(plan, p) or p.note(plan) is not None)}
        | ({site} if site else set())
    )
    rows = []
    for s in sites:
        # Each note with the state it announces (notes of members that have not registered the plan
        # carry none and are left out).
        notes = [
            (p, n, n.state)
            for p in peers
            if p.site == s and (n := p.note(plan)) is not None and n.state is not None
        ]
        seen = site_views.get((s, plan.rollout_id))
        if s == site and own is not None:
            state, wave, reason, source = own.state, own.wave, own.reason, "this node's replica"
        elif notes:
            # The leader's note (it carries the verdict) is the freshest; else the most advanced replica.
            peer, note, note_state = max(
                notes, key=lambda pns: (pns[1].verdict is not None, pns[2].final, pns[1].wave)
            )
            state, wave, source = note_state, note.wave, f"announced by {peer.node_id}"
            reason = ""
            if (
                seen is not None
                and seen["state"].get("state") == state.value
                and seen["state"].get("wave") == wave
            ):
                reason = str(seen["state"].get("reason", ""))
        else:
            rows.append(
                {
                    "site": s,
                    "state": "unregistered",
                    "wave": 0,
                    "reason": "",
                    "waiting_for": "its site leader to register the plan (learnt from peers)",
                    "verdict": None,
                    "source": "no member of this site announces it",
                }
            )
            continue
        verdict = None
        if s == site and own_verdict is not None:
            verdict = {"outcome": own_verdict["outcome"], "reason": own_verdict["reason"]}
        elif seen is not None and seen.get("verdict"):
            verdict = {"outcome": seen["verdict"]["outcome"], "reason": seen["verdict"]["reason"]}
        else:
            leader_verdict = next((n.verdict for _, n, _ in notes if n.verdict is not None), None)
            if leader_verdict is not None:
                verdict = {"outcome": leader_verdict.value, "reason": ""}
        shown = SiteRollout(plan.rollout_id, plan.digest, state=state, wave=wave, reason=reason)
        rows.append(
            {
                "site": s,
                "state": state.value,
                "wave": wave,
                "reason": reason,
                "waiting_for": shown.waiting_for(plan),
                "verdict": verdict,
                "source": source,
            }
        )
    return rows


def _wave_status(plan: RolloutPlan, k: int, row: Mapping[str, Any]) -> str:
    state, wave = row["state"], row["wave"]
    if state == "unregistered" or state == RolloutState.PENDING.value:
        return "pending"
    if state == RolloutState.COMPLETED.value:
        return "passed"
    if state == RolloutState.ABORTED.value:
        return "passed" if k < wave else "failed" if k == wave else "cancelled"
    if k < wave:
        return "passed"
    if k == wave:
        return {
            RolloutState.SOAKING.value: "soaking",
            RolloutState.PAUSED.value: "paused",
            RolloutState.WAITING_APPROVAL.value: "passed",
        }.get(state, "pending")
    if k == wave + 1 and state == RolloutState.WAITING_APPROVAL.value:
        return "held"
    return "pending"


def _counters(peer: PeerView, model: str, version: str) -> tuple[int, int] | None:
    """A device's counters of `version` as it gossips them; None if it gossips none (devices publish
    counters only while a rollout of their model runs)."""
    c = None if peer.health is None else peer.health.counters(model, version)
    return None if c is None else (c.requests, c.serving_errors)


def _rate(errors: int | None, requests: int | None) -> float | None:
    return errors / requests if requests and errors is not None else None


def rollout_report(
    plan: RolloutPlan,
    *,
    site: str,
    node_id: str,
    own: SiteRollout | None,
    own_verdict: Mapping[str, Any] | None,
    peers: list[PeerView],
    site_views: Mapping[tuple[str, str], Mapping[str, Any]],
    now: float,
    max_share_ppm: int | None = None,
) -> dict[str, Any]:
    """The status document of `plan` as node `node_id` of `site` sees it (see the module doc).
    `max_share_ppm`: this site's `[guard] rollout_max_share`, which narrows the plan's scope here."""
    sites = _site_rows(plan, site=site, own=own, own_verdict=own_verdict, peers=peers, site_views=site_views)
    taking_part = [p for p in peers if participates(plan, p)]
    eligible = [p for p in taking_part if p.reachable]
    notes: dict[str, RolloutNote] = {p.node_id: n for p in taking_part if (n := p.note(plan)) is not None}
    waves = []
    for k, w in enumerate(plan.waves, start=1):
        cohort = [p for p in taking_part if 1 <= notes[p.node_id].first_wave <= k]
        outside = [p for p in taking_part if not 1 <= notes[p.node_id].first_wave <= k]
        target = [c for p in cohort if (c := _counters(p, plan.model, plan.target_version)) is not None]
        baseline = [c for p in outside if (c := _counters(p, plan.model, plan.baseline_version)) is not None]
        t_req = sum(r for r, _ in target) if target else None
        t_err = sum(e for _, e in target) if target else None
        b_req = sum(r for r, _ in baseline) if baseline else None
        b_err = sum(e for _, e in baseline) if baseline else None
        statuses = [_wave_status(plan, k, row) for row in sites] or ["pending"]
        status = min(statuses, key=_STATUS_ORDER.index)
        if status == "passed" and any(s != "passed" for s in statuses):
            status = "soaking" if "soaking" in statuses else "pending"
        waiting = ""
        if status == "held":
            waiting = "an operator approval: " + APPROVE_HINT.format(rollout_id=plan.rollout_id, wave=k)
        elif status == "paused":
            waiting = "an operator: " + RESUME_HINT.format(rollout_id=plan.rollout_id) + " (or abort)"
        elif status == "soaking":
            waiting = (
                f"its gate: {w.soak_s:g} s soak, {w.min_requests} requests, errors <= {w.max_error_rate:.0%}"
            )
        waves.append(
            {
                "wave": k,
                "share": format_share(w.share_ppm),
                "soak_s": w.soak_s,
                "min_requests": w.min_requests,
                "max_error_rate": w.max_error_rate,
                # As the site's ledger judges it once started (the fleet count it recorded, the site's
                # own limit); before that, by the share and the devices this node sees.
                "needs_approval": wave_needs_approval(plan, own, k, max_share_ppm)
                if own is not None and own.fleet_eligible_count > 0
                else wave_over_scope(w.share_ppm, plan.scope_ppm(max_share_ppm), len(eligible)),
                "eligible": len(eligible),
                "in_cohort": len(cohort),
                "on_target": sum(1 for p in cohort if notes[p.node_id].serving is Serving.TARGET),
                "requests": t_req,
                "errors": t_err,
                "error_rate": _rate(t_err, t_req),
                "baseline_requests": b_req,
                "baseline_errors": b_err,
                "baseline_error_rate": _rate(b_err, b_req),
                "status": status,
                "waiting_for": waiting,
            }
        )
    skipped = sorted((p.node_id, n.skip.value) for p in peers if (n := p.note(plan)) is not None and n.skip)
    unreachable = sorted(p.node_id for p in taking_part if not p.reachable)
    return {
        "rollout_id": plan.rollout_id,
        "model": plan.model,
        "baseline_version": plan.baseline_version,
        "target_version": plan.target_version,
        "plan_digest": plan.digest,
        "created_at": plan.created_at,
        "expires_at": plan.expires_at,
        "selector": plan.selector.to_dict(),
        "prefetch": plan.prefetch.value,
        "autonomous_share": format_share(plan.autonomous_scope.max_share_ppm),
        "state": overall_state(RolloutState(r["state"]) for r in sites if r["state"] != "unregistered"),
        "asked": {"node_id": node_id, "site": site, "at": now},
        "sites": sites,
        "waves": waves,
        "serving_target": sum(1 for n in notes.values() if n.serving is Serving.TARGET),
        "skipped": [{"node_id": n, "kind": k} for n, k in skipped[:MAX_NAMED]],
        "skipped_count": len(skipped),
        "unreachable": unreachable[:MAX_NAMED],
        "unreachable_count": len(unreachable),
    }


def rollout_summary(
    plan: RolloutPlan, *, site: str, own: SiteRollout | None, peers: list[PeerView]
) -> dict[str, Any]:
    """One line of `mesh rollout ls`."""
    states: dict[str, tuple[str, int]] = {}
    for p in peers:
        note = p.note(plan)
        if (
            note is not None
            and note.state is not None
            and p.site
            and (p.site not in states or (note.verdict is not None, note.wave) > (False, states[p.site][1]))
        ):
            states[p.site] = (note.state.value, note.wave)
    if own is not None and site:
        states[site] = (own.state.value, own.wave)
    return {
        "rollout_id": plan.rollout_id,
        "model": plan.model,
        "baseline_version": plan.baseline_version,
        "target_version": plan.target_version,
        "created_at": plan.created_at,
        "waves": [format_share(w.share_ppm) for w in plan.waves],
        "state": overall_state(RolloutState(s) for s, _ in states.values()),
        "sites": {s: {"state": st, "wave": w} for s, (st, w) in sorted(states.items())},
        "own_site": None
        if own is None
        else {
            "site": site,
            "state": own.state.value,
            "wave": own.wave,
            "reason": own.reason,
            "waiting_for": own.waiting_for(plan),
        },
    }
