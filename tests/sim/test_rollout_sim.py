"""`mesh sim rollout`: a bad version stays in its first wave and is rolled back everywhere; the
closed-form model matches the cores, and a model that is wrong on purpose is caught."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.sim.rollout import RolloutScenario, expected, run_cores

TOLERANCE = 0.20
FIGURES = ("bad_exposure_share", "seconds_to_first_fail", "seconds_to_rollback")


@pytest.mark.parametrize(("devices", "sites", "seed"), [(1000, 10, 1), (3000, 30, 2), (2000, 1, 3)])
def test_a_bad_version_is_rolled_back_before_its_second_wave(devices: int, sites: int, seed: int) -> None:
    sc = RolloutScenario(devices, sites, seed=seed)
    data = run_cores(sc).to_json()
    assert data["final_states"] == {"aborted": sites}, data
    assert data["furthest_wave"] == 1, data
    assert data["bad_exposure_share"] <= data["first_wave_share"] + 1 / devices, data
    model = expected(sc)
    for figure in FIGURES:
        error = model[figure] / data[figure] - 1
        assert abs(error) <= TOLERANCE, f"seed {seed}: {figure} cores {data[figure]} model {model[figure]}"


def test_a_model_that_is_wrong_on_purpose_is_caught() -> None:
    # The model told that evidence travels three times slower than it does.
    sc = RolloutScenario(10_000, 100, seed=4)
    data = run_cores(sc).to_json()
    wrong = expected(dataclasses.replace(sc, dissemination_s=3 * sc.dissemination_s))
    assert abs(wrong["seconds_to_rollback"] / data["seconds_to_rollback"] - 1) > TOLERANCE


def test_a_good_version_is_not_rolled_back() -> None:
    # Ten wave-1 devices at 1 request/s need about 10 s for min_requests; a 30 s soak gets them there.
    sc = RolloutScenario(1000, 10, seed=5, bad_error_share=0.0, soak_s=30.0, time_limit_s=300.0)
    data = run_cores(sc).to_json()
    assert data["final_states"] == {"completed": 10}, data
    assert data["furthest_wave"] == 3


def test_the_same_seed_gives_the_same_run() -> None:
    sc = RolloutScenario(2000, 20, seed=6)
    assert run_cores(sc).to_json() | {"rollout_wall_s": 0} == run_cores(sc).to_json() | {"rollout_wall_s": 0}
