"""`mesh sim fleet|distribution|rollout`: the JSON object has the figures the issue asks for, the
plot is drawn, and a missing matplotlib says what to install."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from mesh.sim.command import sim

REQUIRED = {"devices", "sites", "rounds_known_all", "rounds_bound", "origin_copies",
            "cross_site_copies_per_site", "bad_exposure_share", "first_wave_share", "detection_over_expected",
            "wall_s", "peak_rss_mb"}


def test_fleet_prints_one_json_object_and_draws_the_plot(tmp_path) -> None:
    png = tmp_path / "fleet.png"
    result = CliRunner().invoke(sim, ["fleet", "--devices", "3000", "--sites", "30", "--engine", "model",
                                      "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert set(data) >= REQUIRED
    assert all(data["goals_met"].values()), data["goals_met"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["distribution", "rollout"])
def test_each_part_alone(command: str) -> None:
    result = CliRunner().invoke(sim, [command, "--devices", "1000", "--sites", "10", "--engine", "model"])
    assert result.exit_code == 0, result.output


def test_a_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(sim, ["distribution", "--devices", "1000", "--sites", "10",
                                      "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "pip install 'fleetmesh[sim]'" in result.output


@pytest.mark.parametrize("args", [["fleet", "--devices", "10", "--sites", "20"],
                                  ["rollout", "--devices", "100", "--sites", "2", "--loss", "0.7"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert CliRunner().invoke(sim, args).exit_code == 2
