"""`musicrl experiment listeners`: the calibration report on corpus music."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loadtests.cli import app

pytestmark = pytest.mark.unit


def test_listeners_command_writes_the_calibration_report(tmp_path):
    output = tmp_path / "listeners.json"
    result = CliRunner().invoke(
        app,
        [
            "listeners",
            "--clips",
            "12",
            "--votes",
            "40",
            "--prompts",
            "1",
            "--temperature",
            "0.5",
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    assert report["config"]["temperature"] == 0.5 and report["clips"] == 12
    assert sum(report["choices"].values()) == 40
    assert 0.5 <= report["agreement"] <= 1.0
    assert 0.0 < report["no_vote_rate"] < 1.0
    assert 0.0 < report["mean_listen_share"] <= 1.0
    assert 0.0 <= report["heldout_win_rate_best_of_8"] <= 1.0
    assert "agreement" in result.output


def test_listeners_command_rejects_a_bad_configuration(tmp_path):
    result = CliRunner().invoke(app, ["listeners", "--temperature", "-1", "--output", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "temperature" in result.output
    assert not (tmp_path / "x.json").exists()
