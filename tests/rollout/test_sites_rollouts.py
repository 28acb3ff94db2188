"""Canary rollouts in sites mode (`[membership] pools = "sites"`): 16 in-process nodes on loopback in 4
sites of 4, each site its own gossip pool and Raft group, one representative per site in the federation
pool, traffic against every device.

A site leader sees only its own site here; what it needs of the others (their populations, for the wave
sizes; their gate evidence; their aborts) reaches it as its representatives' fleet views
(`mesh.rollout.fleet.FleetView`, polled with GetRollout). The module checks, on a fleet where at least
one site's leader is not its representative:

1. a good version passes each wave with the fleet-wide wave sizes flat mode would use (one device in
   wave 1 of 16), sites without a wave-1 device pass on the other sites' evidence alone, and one approval
   sent to one node releases the held last wave in every site;
2. a bad version rolls back at the first wave in every site, the abort crossing through the
   representatives, and nobody outside wave 1 ever serves it;
3. no device holds another site's members: a node that is no representative sees its site only.
"""

from __future__ import annotations

import contextlib

import pytest
import pytest_asyncio

from mesh.inference.fixtures import PARTLY_NAN_LAYERS, mlp_model, partly_nan_model
from mesh.node.local import LocalFleet, wait_for
from mesh.node.local_rollouts import RolloutFleet, Traffic, took_effect
from mesh.rollout.cohort import wave_size
from mesh.rollout.plan import CommandAction
from mesh.rollout.state import RolloutState

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODES, SITES = 16, 4
SOAK_S = 3.0


def representatives(f: RolloutFleet) -> dict[str, str]:
    """site -> its representative now (one per site here)."""
    return {
        f.sites[n]: n for n, node in f.nodes.items() if node.federation is not None and node.federation.active
    }


def leaders_apart(f: RolloutFleet) -> list[str]:
    """Sites whose Raft leader is not their representative (it then sees no other site at all)."""
    reps = representatives(f)
    out = []
    for site in f.site_names():
        leader = f.leader(site)
        if leader is not None and reps.get(site) not in (None, leader.config.node_id):
            out.append(site)
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sites-rollouts")
    f = RolloutFleet(
        LocalFleet(directory / "fleet"),
        directory / "nodes",
        nodes=NODES,
        sites=SITES,
        seed=11,
        pools="sites",
        representatives=1,
    )
    traffic = Traffic(f, rate_per_node_s=8.0, bad_share=0.8, seed=11)
    try:
        await f.start()
        await f.ready(timeout_s=90)
        # The point of the module is a leader that is no representative: restart a leader that is one
        # until some site has one (its site then elects another member, and chooses its representative
        # again by tenure), at most a few times.
        for _ in range(6):
            if leaders_apart(f):
                break
            site = f.site_names()[0]
            leader = f.leader(site)
            assert leader is not None
            node_id = leader.config.node_id
            await f.stop_node(node_id)
            await f.start_node(node_id)
            await f.ready(timeout_s=90)
        assert leaders_apart(f), f"every site's leader is its representative: {representatives(f)}"
        f.publish("1.0", mlp_model(PARTLY_NAN_LAYERS, seed=1))
        await wait_for(lambda: f.all_serving("1.0"), 90, what="every node serves 1.0", interval_s=0.2)
        f.traffic = traffic
        yield f
    finally:
        await traffic.stop()
        await f.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def traffic_during_each_test(fleet):
    fleet.traffic.start()
    yield
    await fleet.traffic.stop()


def where(f: RolloutFleet, rollout_id: str) -> str:
    out = {}
    for site in f.site_names():
        state = f.site_state(site, rollout_id)
        out[site] = None if state is None else (state.state.value, state.wave, state.reason)
    return f"sites: {out}; leaders apart from their representative: {leaders_apart(f)}"


@contextlib.asynccontextmanager
async def aborted_on_failure(f: RolloutFleet, plan):
    """A test that fails mid-rollout aborts it, so the next test's rollout of the model is not refused
    ("at most one rollout of mlp runs at a time") and one failure reads as one."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            await f.send(f.command(plan, CommandAction.ABORT, reason="the test failed"), via="node-00")
        raise


async def until(f: RolloutFleet, rollout_id: str, predicate, timeout_s: float, what: str) -> None:
    try:
        await wait_for(predicate, timeout_s, what=what, interval_s=0.1)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; {where(f, rollout_id)}") from None


def cohort(f: RolloutFleet, rollout_id: str, wave: int) -> set[str]:
    out = set()
    for site in f.site_names():
        state = f.site_state(site, rollout_id)
        if state is not None:
            out |= state.cohort([n for n in f.members(site) if n in f.nodes], wave)
    return out


async def test_a_good_version_passes_each_wave_across_sites_and_one_approval_releases_them(fleet):
    f = fleet
    f.publish("2.0", mlp_model(PARTLY_NAN_LAYERS, seed=2))
    plan = f.plan("mlp-2", target="2.0", baseline="1.0", soak_s=SOAK_S, deadline_s=60)
    async with aborted_on_failure(f, plan):
        assert took_effect(await f.start_rollout(plan))
        await until(
            f, "mlp-2", lambda: f.every_site("mlp-2", RolloutState.WAITING_APPROVAL), 120, "every site held"
        )
        shares = [w.share_ppm for w in plan.plan.waves]
        assert len(cohort(f, "mlp-2", 1)) == wave_size(shares[0], NODES) == 1
        assert len(cohort(f, "mlp-2", 2)) == wave_size(shares[1], NODES)
        for site in f.site_names():
            state = f.site_state(site, "mlp-2")
            assert state.fleet_eligible_count == NODES, (site, state.fleet_eligible_count)
        # A site with no device in waves 1 and 2 passed them on what the others measured: the gate results its
        # ledger recorded (whichever member led) count requests from devices none of which is its own.
        empty = [s for s in f.site_names() if not f.site_state(s, "mlp-2").cohort(f.members(s), 2)]
        assert empty, "every site had a wave-2 device: nothing shows a pass on other sites' evidence"
        for site in empty:
            member = next(n for n in f.members(site) if n in f.nodes)
            passes = [
                p["gate"]
                for k, p in f.audit_kinds(member, "mlp-2")
                if k in ("rollout_wave_started", "rollout_held") and p.get("gate")
            ]
            assert [g["wave"] for g in passes] == [1, 2], (site, passes)
            assert all(g["cohort_size"] == 0 and g["requests"] > 0 for g in passes), (site, passes)

        result = await f.send(f.command(plan, CommandAction.APPROVE, wave=3), via="node-02")
        assert took_effect(result), result.message
        await until(
            f, "mlp-2", lambda: f.every_site("mlp-2", RolloutState.COMPLETED), 120, "completed everywhere"
        )
        await until(f, "mlp-2", lambda: f.all_serving("2.0"), 60, "every device on 2.0")
        assert f.traffic.failures() == [], "requests failed:\n" + "\n".join(f.traffic.failures()[:20])


async def test_a_bad_version_rolls_back_in_every_site_through_the_representatives(fleet):
    f = fleet
    f.publish("3.0", partly_nan_model(PARTLY_NAN_LAYERS, seed=3))
    plan = f.plan("mlp-3", target="3.0", baseline="2.0", soak_s=SOAK_S, deadline_s=60)
    async with aborted_on_failure(f, plan):
        assert took_effect(await f.start_rollout(plan))
        await until(
            f, "mlp-3", lambda: f.every_site("mlp-3", RolloutState.ABORTED), 120, "aborted everywhere"
        )
        await until(f, "mlp-3", lambda: all(f.serving(n) == "2.0" for n in f.nodes), 60, "everyone on 2.0")
        first = cohort(f, "mlp-3", 1)
        assert len(first) == 1 and f.traffic.nodes_served_by("3.0") <= first
        assert all("3.0" not in f.nodes[n].rollouts.served for n in f.nodes if n not in first)
        (origin_site,) = {f.sites[n] for n in first}
        for site in f.site_names():
            reason = f.site_state(site, "mlp-3").reason
            if site == origin_site:
                assert "gate failed" in reason, reason
            else:  # the abort crossed: from the failing site, through representatives
                assert "aborted it" in reason and "gate failed" in reason, (site, reason)


async def test_a_device_that_is_no_representative_holds_its_site_only(fleet):
    f = fleet
    reps = set(representatives(f).values())
    for node_id, node in f.nodes.items():
        seen = {p.site for p in node.rollouts.peers()}
        if node_id in reps:
            assert seen == set(f.site_names()), (node_id, seen)
        else:
            assert seen == {f.sites[node_id]}, (node_id, seen)
