"""`mesh sim distribution`: the slot model agrees with the real schedulers, a version crosses each
site boundary about once, and a model that is wrong on purpose is caught by the tolerance."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.sim.distribution import DistributionScenario, run, run_tier

TOLERANCE = 0.20


def completion_error(
    sc: DistributionScenario, model_sc: DistributionScenario, nodes: int, *, seeded: bool, seed: int
) -> tuple[float, str]:
    cores = run_tier(sc, nodes, seeded=seeded, seed=seed, engine="cores")
    model = run_tier(model_sc, nodes, seeded=seeded, seed=seed, engine="model")
    summary = (
        f"seed {seed}, {nodes} nodes, seeded={seeded}: last node cores {cores.completion_s.max():.2f} s, "
        f"model {model.completion_s.max():.2f} s"
    )
    return float(model.completion_s.max() / cores.completion_s.max() - 1), summary


@pytest.mark.parametrize("seed", [1, 2])
def test_the_slot_model_agrees_with_the_schedulers(seed: int) -> None:
    sc = DistributionScenario(400, 20, seed=seed)
    for nodes, seeded in ((20, False), (30, True)):
        error, summary = completion_error(sc, sc, nodes, seeded=seeded, seed=seed)
        print(summary)
        assert abs(error) <= TOLERANCE, summary


def test_a_model_that_is_wrong_on_purpose_is_caught() -> None:
    # The model told that uploads are twice as fast as they are: the tolerance must reject it.
    sc = DistributionScenario(400, 20, seed=3)
    wrong = dataclasses.replace(sc, upload_cap_bytes_per_s=2 * sc.upload_cap_bytes_per_s)
    error, summary = completion_error(sc, wrong, 20, seeded=False, seed=3)
    assert abs(error) > TOLERANCE, f"a model with double the upload cap passed: {summary}"


@pytest.mark.parametrize("engine", ["cores", "model"])
def test_a_version_crosses_each_site_boundary_about_once(engine: str) -> None:
    result = run(DistributionScenario(600, 12, seed=5, site_samples=2), engine)
    data = result.to_json()
    assert data["origin_copies"] <= 1.2, data
    assert data["cross_site_copies_max_site"] <= 1.2, data
    assert result.device_done_s.size == 600 and (result.device_done_s > 0).all()
    # No device beats one upload link sending one copy.
    assert data["seconds_all_hold"] >= result.scenario.lower_bound_s, data


def test_the_same_seed_gives_the_same_run() -> None:
    sc = DistributionScenario(5000, 500, seed=9, site_samples=2)
    assert run(sc, "model").to_json()["seconds_all_hold"] == run(sc, "model").to_json()["seconds_all_hold"]
