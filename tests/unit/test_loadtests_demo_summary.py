"""The summary of repeated `make demo` runs (loadtests/demo_repeat.sh)."""

from __future__ import annotations

import json

import pytest

from loadtests.demo import main, summarize_demo_runs

pytestmark = pytest.mark.unit


def _run(after: str, win_rate: float | None) -> dict:
    return {
        "policy_before": "1",
        "policy_after": after,
        "cycle": {"status": "deployed" if after != "1" else "rejected"},
        "win_rate_vs_previous": {"win_rate": win_rate} if win_rate is not None else None,
        "reward_model": {},
    }


def test_four_deployments_in_five_runs_meet_the_target_and_the_median_is_of_deployed_runs(tmp_path, capsys):
    runs = [_run("2", 0.6), _run("1", None), _run("2", 0.55), _run("2", 0.7), _run("2", 0.5)]
    summary = summarize_demo_runs(runs)
    assert (
        summary["deployed"] == 4
        and summary["target_met"]
        and summary["median_win_rate_vs_previous"] == pytest.approx(0.575)
    )
    assert not summarize_demo_runs(runs[:4])["target_met"]  # four runs are not five
    paths = []
    for k, run in enumerate(runs):
        paths.append(tmp_path / f"run{k}.json")
        paths[-1].write_text(json.dumps(run))
    main([str(tmp_path / "summary.json"), *map(str, paths)])
    assert json.loads((tmp_path / "summary.json").read_text())["deployed"] == 4
    assert "4 of 5 runs deployed" in capsys.readouterr().out
