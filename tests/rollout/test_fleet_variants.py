"""An INT8 variant rolled out by selector on a real fleet: 6 in-process nodes on loopback (mTLS, SWIM, the
swarm, LiteRT, one Raft group per site) in 2 sites, one device in each site labelled
``device_class=camera-lite``, with traffic against every device.

The variant is what an operator makes with ``mesh model optimize --int8 --io-dtype float32``
(`optimize_model`: LiteRT's calibrator, then its outputs checked against the float model's), published
as a version of the same model. A rollout with ``selector device_class=camera-lite`` moves exactly the
lite devices to it, wave by wave, and every other device keeps serving the float model. (The same
optimisation of a mediapipe model is tests/inference/test_optimize.py's; this fleet serves the MLP its
traffic is made for.)
"""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio

from mesh.inference.fixtures import PARTLY_NAN_LAYERS, mlp_model, partly_nan_input
from mesh.inference.optimize import optimize_model
from mesh.node.local import LocalFleet, wait_for
from mesh.node.local_rollouts import RolloutFleet, Traffic, took_effect
from mesh.rollout.plan import Selector
from mesh.rollout.state import RolloutState

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODES, SITES = 6, 2
LITE = ("node-02", "node-03")  # node i is in site i % 2: one lite device per site
FLOAT = mlp_model(PARTLY_NAN_LAYERS, seed=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("variants")
    f = RolloutFleet(
        LocalFleet(directory / "fleet"),
        directory / "nodes",
        nodes=NODES,
        sites=SITES,
        seed=5,
        labels={n: {"device_class": "camera-lite"} for n in LITE},
    )
    traffic = Traffic(f, rate_per_node_s=8.0, bad_share=0.3, seed=5)
    try:
        await f.start()
        await f.ready(timeout_s=90)
        f.publish("1.0", FLOAT)
        await wait_for(lambda: f.all_serving("1.0"), 90, what="every node serves 1.0", interval_s=0.2)
        f.traffic = traffic
        traffic.start()
        yield f
    finally:
        await traffic.stop()
        await f.close()


def int8_variant() -> bytes:
    """The float model quantised to INT8 with float32 I/O, on inputs like the traffic's (some unusual)."""
    rng = np.random.default_rng(11)
    samples = [
        [partly_nan_input(PARTLY_NAN_LAYERS[0], bad=bool(rng.random() < 0.3), rng=rng)] for _ in range(64)
    ]
    quantized, report = optimize_model(FLOAT, samples, io_dtype="float32")
    assert report.within_tolerance, report.to_dict()
    return quantized


async def test_an_int8_variant_reaches_only_the_devices_its_selector_names(fleet):
    f = fleet
    f.publish("1.0-int8", int8_variant())
    plan = f.plan(
        "lite-int8",
        target="1.0-int8",
        baseline="1.0",
        selector=Selector.of(device_class="camera-lite"),
        soak_s=2.0,
        min_requests=5,
        deadline_s=60,
        autonomous_share_ppm=1_000_000,  # the whole selection may move without an approval
    )
    assert took_effect(await f.start_rollout(plan))
    try:
        await wait_for(lambda: f.every_site("lite-int8", RolloutState.COMPLETED), 120, "completed everywhere")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; sites: {f.states('lite-int8')}") from None
    assert {n for n in f.nodes if f.serving(n) == "1.0-int8"} == set(LITE)
    assert {n for n in f.nodes if f.serving(n) == "1.0"} == set(f.nodes) - set(LITE)
    assert f.traffic.nodes_served_by("1.0-int8") == set(LITE), "only the lite devices ever answered with it"
    assert f.traffic.failures() == [], "requests failed:\n" + "\n".join(f.traffic.failures()[:20])
    # Each site recorded at the start how many devices the selector takes fleet-wide: the lite ones.
    for site in f.site_names():
        assert f.site_state(site, "lite-int8").fleet_eligible_count == len(LITE), site
    report = f.nodes["node-00"].rollouts.report("lite-int8")
    assert report["selector"] == {"device_class": ["camera-lite"]}, report["selector"]
