"""A representative's answers to its site leader in sites mode (`RolloutShell.documents` with a fleet
view), on a shell built with stand-ins for what it does not use here (group, boards, runtime): who gets a
view, for which counts, and how many views with wave sizes an interval (each costs in proportion to the
fleet's devices)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from mesh.node.rollouts import (
    MAX_REFUSALS_REMEMBERED,
    REFUSAL_LOG_INTERVAL_S,
    SIZED_VIEWS_PER_INTERVAL,
    RolloutSettings,
    RolloutShell,
    SitesHooks,
)
from mesh.rollout.announce import RolloutNote, Serving
from mesh.rollout.fleet import FleetView, PeerView
from tests.rollout.builders import T0, TRUSTED, make_plan, signed

PLAN = make_plan()


def peer(node: str, site: str, population: int | None = None) -> PeerView:
    note = RolloutNote(PLAN.rollout_id, PLAN.digest, serving=Serving.BASELINE, population=population)
    return PeerView(node, site, (("device_class", "camera"), ("site", site)), True, None, (note,))


def representative(*, active: bool = True, reps: list[str] | None = None) -> tuple[RolloutShell, list[float]]:
    clock = [100.0]
    board = SimpleNamespace(set_meta=lambda blob: None, meta_limit_bytes=256)
    group = SimpleNamespace(
        raft=SimpleNamespace(is_leader=False, leader_id=None),
        own=None,  # this site's replicated state of PLAN (None: not registered)
        rollouts=lambda: [],
        policy=SimpleNamespace(rollout_max_share_ppm=None),
    )
    group.rollout = lambda rid: None if group.own is None or rid != PLAN.rollout_id else (PLAN, group.own)
    shell = RolloutShell(
        node_id="a0",
        site="a",
        labels={"site": "a"},
        model=None,
        group=group,  # type: ignore[arg-type]
        view=SimpleNamespace(members=lambda: [], member=lambda node_id: None),  # type: ignore[arg-type]
        health_board=board,  # type: ignore[arg-type]
        notes_board=board,  # type: ignore[arg-type]
        runtime=None,
        steer=lambda steering: None,
        refused=frozenset,
        history=tuple,
        store=None,  # type: ignore[arg-type]
        data_dir=Path("/nonexistent"),
        trusted=TRUSTED,
        dial=None,  # type: ignore[arg-type]
        settings=RolloutSettings(interval_s=1.0),
        sites=SitesHooks(active=lambda: active, representatives=lambda: ["a0"] if reps is None else reps),
        clock=lambda: T0,
        monotonic=lambda: clock[0],
    )
    shell.docs.add_plan(signed(PLAN), now=T0)
    shell._last_peers = [peer(f"a{i}", "a") for i in range(4)] + [peer("b0", "b", population=96)]
    return shell, clock


def view_of(reply) -> FleetView | None:
    return FleetView.from_json(reply.fleet_json.encode()) if reply.fleet_json else None


def test_a_member_of_the_site_gets_the_view_with_its_wave_sizes():
    shell, _ = representative()
    view = view_of(shell.documents(PLAN.rollout_id, 4, "a2", fleet_view=True))
    assert (
        view is not None and view.fleet_eligible == 100 and view.sizes == (0, 0, 4)
    )  # 1 and 10 of 100: to b
    unsized = view_of(shell.documents(PLAN.rollout_id, None, "a2", fleet_view=True))
    assert unsized is not None and unsized.sizes is None and unsized.sites == 1
    assert json.loads(shell.documents(PLAN.rollout_id, None, "a2").fleet_json or "null") is None  # not asked


def test_no_view_for_another_site_a_count_the_site_cannot_have_or_a_node_that_is_no_representative():
    shell, _ = representative()
    assert view_of(shell.documents(PLAN.rollout_id, 4, "b0", fleet_view=True)) is None
    assert view_of(shell.documents(PLAN.rollout_id, 4, None, fleet_view=True)) is None
    assert view_of(shell.documents(PLAN.rollout_id, 5, "a2", fleet_view=True)) is None  # 4 members
    assert view_of(shell.documents(PLAN.rollout_id, 2**31, "a2", fleet_view=True)) is None
    retired, _ = representative(active=False)
    assert view_of(retired.documents(PLAN.rollout_id, 4, "a2", fleet_view=True)) is None


def test_views_with_sizes_are_few_an_interval_and_the_same_question_is_answered_from_the_cache():
    shell, clock = representative()
    counts = list(range(SIZED_VIEWS_PER_INTERVAL + 2))
    answered = [view_of(shell.documents(PLAN.rollout_id, n, "a1", fleet_view=True)) for n in counts]
    assert [v is not None for v in answered] == [True] * SIZED_VIEWS_PER_INTERVAL + [False, False]
    assert view_of(shell.documents(PLAN.rollout_id, 0, "a1", fleet_view=True)) == answered[0]  # cached
    assert view_of(shell.documents(PLAN.rollout_id, None, "a1", fleet_view=True)) is not None  # no sizes
    clock[0] += 1.0
    assert view_of(shell.documents(PLAN.rollout_id, counts[-1], "a1", fleet_view=True)) is not None


def test_a_caller_refused_a_view_is_logged_at_info_once_a_minute(caplog):
    """A caller that keeps asking for a view it may not have (misconfigured, or hostile) does not fill
    the log: one INFO line per caller and minute, the rest at DEBUG; the callers remembered are bounded."""
    shell, clock = representative()
    caplog.set_level(logging.DEBUG, logger="mesh.rollout")

    def refusals(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "no fleet view for" in r.getMessage() and r.levelno == level]

    for _ in range(5):
        assert view_of(shell.documents(PLAN.rollout_id, 4, "b0", fleet_view=True)) is None
    assert len(refusals(logging.INFO)) == 1 and "only for a member of site a" in refusals(logging.INFO)[0]
    assert len(refusals(logging.DEBUG)) == 4
    shell.documents(PLAN.rollout_id, 4, "c0", fleet_view=True)  # another caller: its own line
    assert len(refusals(logging.INFO)) == 2
    clock[0] += REFUSAL_LOG_INTERVAL_S
    shell.documents(PLAN.rollout_id, 4, "b0", fleet_view=True)
    assert len(refusals(logging.INFO)) == 3
    for i in range(2 * MAX_REFUSALS_REMEMBERED):
        shell.documents(PLAN.rollout_id, 4, f"x{i}", fleet_view=True)
    assert len(shell._refusal_logged_at) <= MAX_REFUSALS_REMEMBERED
    assert len(refusals(logging.INFO)) <= 3 + MAX_REFUSALS_REMEMBERED  # past the bound: DEBUG
    assert f"x{2 * MAX_REFUSALS_REMEMBERED - 1}" in refusals(logging.DEBUG)[-1]


def test_rollout_status_says_why_a_site_waits_for_a_fleet_view():
    """`mesh rollout status` in sites mode: a node that is not the leader points at it; a leader whose
    pending site holds no fresh representative's view says wave 1 waits for one, naming each
    representative and why it gave none (here: a1 is not in its membership view, found by a real poll);
    with a fresh view, or once the rollout is finished, no note; the report stays JSON."""
    import asyncio

    from rich.console import Console

    from mesh.cli.rollout import status_view
    from mesh.rollout.state import RolloutState, SiteRollout

    def rendered(report) -> str:
        console = Console(width=400, record=True)
        console.print(status_view(report))
        return " ".join(console.export_text().split())

    shell, clock = representative(reps=["a0", "a1"])
    doc = shell.report(PLAN.rollout_id)["fleet_views"]
    assert not doc["leader"] and doc["views"] == [] and "this site has no leader now" in doc["note"]
    shell.group.raft.leader_id = "a3"
    assert "the site leader (a3) holds" in shell.report(PLAN.rollout_id)["fleet_views"]["note"]

    shell.group.raft.is_leader = True
    assert "not registered in this site's group yet" in shell.report(PLAN.rollout_id)["fleet_views"]["note"]
    shell._plan_refused[PLAN.rollout_id] = "model_busy"
    assert "refused the plan (model_busy)" in shell.report(PLAN.rollout_id)["fleet_views"]["note"]
    shell.group.own = SiteRollout(PLAN.rollout_id, PLAN.digest)  # registered, pending
    asyncio.run(shell._poll_view(PLAN, "a1", 4))  # a1 has no address here: the poll records why
    report = shell.report(PLAN.rollout_id)
    json.dumps(report)  # what the Status RPC sends
    assert "no fresh view of the other sites" in report["fleet_views"]["note"]
    assert "wave 1 does not start" in report["fleet_views"]["note"]
    assert "representatives: a0, a1 (it is not in this node's membership view)" in rendered(report)
    assert "sites mode: no fresh view" in rendered(report)

    async def step() -> dict:  # a leader that represents makes its own view, and polls a1
        held = shell._views_of(PLAN, shell._last_peers, sized=False)
        await asyncio.gather(*list(shell._fleet_polls.values()))
        return held

    assert set(asyncio.run(step())) == {"a0"}
    doc = shell.report(PLAN.rollout_id)["fleet_views"]
    assert doc["note"] == "" and doc["views"][0]["fresh"] and doc["views"][0]["sites"] == 1
    assert doc["misses"] == {"a1": "it is not in this node's membership view"}
    clock[0] += shell.settings.fleet_max_age + 1  # the view ages out
    assert "no fresh view" in shell.report(PLAN.rollout_id)["fleet_views"]["note"]
    shell.group.own = SiteRollout(PLAN.rollout_id, PLAN.digest, state=RolloutState.COMPLETED)
    assert shell.report(PLAN.rollout_id)["fleet_views"]["note"] == ""

    lonely, _ = representative(reps=[])
    lonely.group.raft.is_leader = True
    lonely.group.own = SiteRollout(PLAN.rollout_id, PLAN.digest)
    note = lonely.report(PLAN.rollout_id)["fleet_views"]["note"]
    assert "no member of this site is advertised as a representative" in note and "REP" not in note


def test_poll_misses_are_forgotten_with_the_rollout():
    shell, _ = representative(reps=["a0", "a1"])
    shell._view_misses[(PLAN.rollout_id, "a1")] = "its GetRollout failed (UNAVAILABLE)"
    shell._view_misses[("gone", "a1")] = "its GetRollout failed (UNAVAILABLE)"
    shell._docs_from_ledger(T0)
    assert set(shell._view_misses) == {(PLAN.rollout_id, "a1")}  # PLAN is live (held, not registered)
