"""`mesh rollout` and `mesh admin pending` against real nodes (one site of four, in process): start with the
publisher key, status per wave, a held wave shown with the command that unblocks it, approve with the
operator key, ls, abort, and the refusals an operator can make."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from mesh.cli import main
from mesh.inference.fixtures import PARTLY_NAN_LAYERS, mlp_model
from mesh.node.local import LocalFleet, wait_for
from mesh.node.local_rollouts import RolloutFleet, Traffic
from mesh.rollout.state import RolloutState

pytestmark = pytest.mark.asyncio


async def mesh(*args: str) -> tuple[int, str, str]:
    """Run `mesh ARGS` in a thread (its client blocks) while the nodes run on this loop; stderr comes back
    with rich's line wrapping undone."""
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


async def test_an_operator_starts_watches_approves_and_aborts_rollouts(tmp_path):
    f = RolloutFleet(LocalFleet(tmp_path / "fleet"), tmp_path / "nodes", nodes=4, sites=1, seed=3)
    traffic = Traffic(f, rate_per_node_s=8.0, bad_share=0.0)
    try:
        await f.start()
        await f.ready()
        f.publish("1.0", mlp_model(PARTLY_NAN_LAYERS, seed=1))
        await wait_for(lambda: f.all_serving("1.0"), 60, "every node on 1.0", interval_s=0.2)
        f.publish("2.0", mlp_model(PARTLY_NAN_LAYERS, seed=2))
        traffic.start()
        node = f.nodes["node-00"].address
        creds = ("--creds", str(f.fleet.operator.directory), "--node", node)
        publisher, operator = (
            str(f.fleet.directory / "publisher.key"),
            str(f.fleet.directory / "operator.key"),
        )

        code, out, err = await mesh(
            "rollout", "start", "mlp", "9.9", "--soak", "2s", "--key", publisher, *creds
        )
        assert code == 1 and "9.9 is not held on this node" in err
        code, out, err = await mesh(
            "rollout", "start", "mlp", "2.0", "--waves", "1,200", "--key", publisher, *creds
        )
        assert code == 2 and "percentage in (0, 100]" in err
        code, out, err = await mesh("rollout", "start", "mlp", "2.0", "--key", operator, *creds)
        assert code == 1 and "sign the plan with the fleet's publisher key" in err

        code, out, err = await mesh(
            "rollout",
            "start",
            "mlp",
            "2.0",
            "--waves",
            "10,100",
            "--soak",
            "2s",
            "--min-requests",
            "5",
            "--relative-margin",
            "0.02",
            "--autonomous-share",
            "25",  # the 10% wave of 4 devices is one device: 25%, within this scope
            "--id",
            "mlp-2",
            "--key",
            publisher,
            *creds,
            "--json",
        )
        assert code == 0, err
        started = json.loads(out)
        assert started["outcome"] == "applied" and started["plan"]["baseline_version"] == "1.0"
        assert started["plan"]["waves"][0]["share_ppm"] == 100_000
        assert {w["relative_margin"] for w in started["plan"]["waves"]} == {0.02}

        await wait_for(lambda: f.every_site("mlp-2", RolloutState.WAITING_APPROVAL), 60, "held before 100%")
        code, out, err = await mesh("rollout", "status", "mlp-2", *creds, "--json")
        assert code == 0, err
        report = json.loads(out)
        assert [w["status"] for w in report["waves"]] == ["passed", "held"]
        assert report["waves"][0]["on_target"] == report["waves"][0]["in_cohort"] == 1
        code, out, err = await mesh("rollout", "status", *creds)  # the newest, as a table
        assert code == 0 and "waiting_approval" in out and "held" in out and "mesh rollout approve" in out

        code, out, err = await mesh("admin", "pending", *creds)
        assert code == 0, err
        approve_line = next(line for line in out.splitlines() if "mesh rollout approve" in line)
        assert "mlp-2 --wave 2" in approve_line and operator in approve_line
        code, out, err = await mesh("admin", "pending", *creds, "--json")
        assert json.loads(out)["rollouts"][0]["commands"]["approve"].startswith("mesh rollout approve mlp-2")

        code, out, err = await mesh("rollout", "approve", "mlp-2", "--wave", "2", "--key", publisher, *creds)
        assert code == 1 and "refused" in err and "not_operator_key" in err
        code, out, err = await mesh("rollout", "approve", "mlp-2", "--wave", "2", "--key", operator, *creds)
        assert code == 0 and "soaking wave 2" in out, out + err
        code, out, err = await mesh("rollout", "status", "mlp-2", "--watch", *creds, "--json")
        assert code == 0, err
        assert json.loads(out.strip().split("\n}\n")[-1] if "\n}\n" in out else out)["state"] == "completed"
        assert f.all_serving("2.0")

        f.publish("3.0", mlp_model(PARTLY_NAN_LAYERS, seed=3))
        code, out, err = await mesh(
            "rollout", "start", "mlp", "3.0", "--soak", "30s", "--id", "mlp-3", "--key", publisher, *creds
        )
        assert code == 0 and "started" in out and "mesh rollout status mlp-3 --watch" in out, err
        # Pause, resume and promote, each signed by the operator and carried out by the site. Wave 1 of
        # 4 devices (1%: one device, 25%) is above the default autonomous scope (10%): it waits.
        (site,) = f.site_names()
        await wait_for(lambda: f.every_site("mlp-3", RolloutState.WAITING_APPROVAL), 30, "wave 1 held")
        code, out, err = await mesh(
            "rollout", "pause", "mlp-3", "--reason", "look first", "--key", operator, *creds
        )
        assert code == 0, out + err
        await wait_for(lambda: f.every_site("mlp-3", RolloutState.PAUSED), 30, "paused")
        code, out, err = await mesh("rollout", "resume", "mlp-3", "--key", operator, *creds)
        assert code == 0, out + err
        await wait_for(lambda: f.every_site("mlp-3", RolloutState.WAITING_APPROVAL), 30, "held again")
        code, out, err = await mesh("rollout", "promote", "mlp-3", "--wave", "1", "--key", operator, *creds)
        assert code == 0, out + err
        await wait_for(lambda: f.every_site("mlp-3", RolloutState.SOAKING), 30, "wave 1 soaks on promotion")
        assert f.site_state(site, "mlp-3").wave == 1
        code, out, err = await mesh("rollout", "abort", "mlp-3", "--key", operator, *creds)
        assert code == 2 and "--reason" in err
        code, out, err = await mesh(
            "rollout", "abort", "mlp-3", "--reason", "changed my mind", "--key", operator, *creds
        )
        assert code == 0, err
        await wait_for(lambda: f.every_site("mlp-3", RolloutState.ABORTED), 30, "aborted")
        code, out, err = await mesh("rollout", "status", "mlp-3", "--watch", *creds)
        assert code == 1 and "aborted" in out
        code, out, err = await mesh("rollout", "ls", *creds, "--json")
        assert [r["rollout_id"] for r in json.loads(out)] == ["mlp-3", "mlp-2"]
        assert [r["state"] for r in json.loads(out)] == ["aborted", "completed"]
        code, out, err = await mesh("rollout", "status", "nope", *creds)
        assert code == 1 and "knows of no rollout nope" in err
        assert traffic.failures() == []

        # Every node serves the rollout metrics (names as in deploy/prometheus/METRICS.md).
        from prometheus_client import generate_latest

        scraped = generate_latest(f.nodes["node-01"].metrics.registry).decode()
        for sample in (
            'fleetmesh_rollout_state{model="mlp",rollout="mlp-2",state="completed",version="2.0"} 1.0',
            'fleetmesh_rollout_state{model="mlp",rollout="mlp-3",state="rolled_back",version="3.0"} 1.0',
            'fleetmesh_rollout_wave{rollout="mlp-2"} 1.0',
            'fleetmesh_rollout_wave_target_ratio{rollout="mlp-2"} 1.0',
        ):
            assert sample in scraped, sample
        assert (
            "fleetmesh_rollout_gate_verdicts_total" in scraped
            and "fleetmesh_rollout_rollbacks_total" in scraped
        )
        leader = next(n for n in f.nodes.values() if n.group.raft.is_leader)
        assert leader.rollouts.gate_counts.get(("mlp-2", "pass"), 0) >= 1 or any(
            n.rollouts.gate_counts.get(("mlp-2", "pass")) for n in f.nodes.values()
        )
    finally:
        await traffic.stop()
        await f.close()
