"""Unit tests of the closed-loop experiment's statistics and reports, the bench suite's
summaries, and the stack components of the services (no servers are started here)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy.stats import binomtest

from loadtests.bench_suite import collect, headline, hot_swap_summary, markdown
from loadtests.closed_loop import (
    CLOSED_LOOP_SIZE,
    SIZE_FIELDS,
    ClosedLoopConfig,
    HeldOutJudge,
    WinRate,
    _finite,
    algorithm_overrides,
    effective_finetune_settings,
    overrides_warning,
    results_table,
    summarize_runs,
    wilson_interval,
    write_reports,
    write_summary,
)
from loadtests.demo import DEMO_SIZE, DemoConfig, win_rate_line
from musicrl.stack import free_port_settings
from musicrl.stack.stack import COMPONENTS, SERVICES, StackInfo, default_components

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("wins,trials", [(0, 10), (7, 10), (140, 200), (200, 200), (1, 3)])
def test_wilson_interval_matches_scipy(wins, trials):
    expected = binomtest(wins, trials).proportion_ci(method="wilson")
    low, high = wilson_interval(wins, trials)
    assert low == pytest.approx(expected.low, abs=1e-6) and high == pytest.approx(expected.high, abs=1e-6)


def test_win_rate_ignores_ties_and_reports_interval():
    result = WinRate(wins=140, losses=60, ties=25, expected=0.68).to_dict()
    assert result["win_rate"] == 0.7 and result["ties"] == 25
    assert result["ci_low"] > 0.5 and result["ci_high"] < 0.8
    assert np.isnan(WinRate(0, 0, 4, 0.5).rate)


def _results(win_rate: float, ci_low: float) -> dict:
    row = {
        "round": 1,
        "policy_version": "2",
        "preferences_total": 60,
        "win_rate": {
            "win_rate": win_rate,
            "ci_low": ci_low,
            "ci_high": 0.8,
            "wins": 70,
            "losses": 30,
            "ties": 3,
            "expected_win_rate": 0.66,
        },
        "rewards": {"kl": 2.5, "reward/text_adherence": 0.11, "reward/quality_mos": 4.2, "reward/preference": 0.4},
        "base_rewards_same_rm": {"reward/preference": 0.1},
        "reward_model": {"heldout_accuracy": float("nan")},
        "cycle": {"status": "deployed"},
    }
    base = {"round": 0, "policy_version": "1", "preferences_total": 0, "win_rate": None, "rewards": {"kl": 0.0}}
    return {
        "rounds": [base, row],
        "final": {
            "policy_version": "2",
            "win_rate": win_rate,
            "ci_low": ci_low,
            "ci_high": 0.8,
            "target_met": win_rate >= 0.7 and ci_low > 0.5,
        },
        "elapsed_s": 600.0,
        "machine": {"cores": 2, "cpu": "test cpu"},
    }


def test_table_has_a_row_per_policy_and_states_the_target(tmp_path):
    table = results_table(_results(0.7, 0.6))
    assert "| base (v1) | 0 |" in table and "MusicRL-U round 1 (v2)" in table and "70.0% [60.0%, 80.0%]" in table
    assert "70-30-3" in table and "target (>= 0.70, CI above 0.5) met" in table
    assert "not met" in results_table(_results(0.65, 0.55))


def test_reports_are_strict_json_a_table_and_a_plot(tmp_path):
    json_path, table_path, plot_path = write_reports(_results(0.7, 0.6), tmp_path)
    data = json.loads(json_path.read_text())  # NaN would not parse as strict JSON elsewhere
    assert data["rounds"][1]["reward_model"]["heldout_accuracy"] is None
    assert table_path.read_text().startswith("| policy |") and plot_path.read_bytes()[:4] == b"\x89PNG"
    assert _finite([float("inf"), 1.0]) == [None, 1.0]


# ------------------------------------------------------------------ one configuration: the worker's defaults


def test_harnesses_change_only_the_size_of_the_work():
    from finetune_worker.settings import FinetuneSettings

    assert SIZE_FIELDS <= set(FinetuneSettings.model_fields)
    assert set(CLOSED_LOOP_SIZE) <= SIZE_FIELDS and set(DEMO_SIZE) <= SIZE_FIELDS
    assert CLOSED_LOOP_SIZE["finetune_steps"] == 30 and DEMO_SIZE["finetune_steps"] == 12
    assert DemoConfig().pairs == 400
    config = ClosedLoopConfig(clip_s=2.0)
    assert config.finetune_overrides() == CLOSED_LOOP_SIZE | {"finetune_duration_s": 2.0}  # rollouts as long as clips
    assert (
        algorithm_overrides(config.finetune_overrides()) == {}
        and overrides_warning(config.finetune_overrides()) is None
    )


def test_algorithm_overrides_are_allowed_but_recorded_and_warned_about():
    config = ClosedLoopConfig(finetune={"finetune_steps": 60, "finetune_policy_lr": "3e-4", "finetune_alpha": 0.01})
    overrides = config.finetune_overrides()
    assert overrides["finetune_steps"] == 60 and overrides["finetune_policy_lr"] == "3e-4"
    assert algorithm_overrides(overrides) == {"finetune_policy_lr": "3e-4", "finetune_alpha": 0.01}
    assert overrides_warning(overrides) == "not the shipped defaults: finetune_alpha=0.01, finetune_policy_lr=3e-4"
    table = results_table(_results(0.7, 0.6) | {"algorithm_overrides": algorithm_overrides(overrides)})
    assert "not the shipped defaults: finetune_alpha=0.01" in table


def test_results_record_every_effective_finetune_setting_without_secrets():
    from finetune_worker.settings import FinetuneSettings

    settings = FinetuneSettings(finetune_steps=7, finetune_reward_admin_token="s3cret")
    recorded = effective_finetune_settings(settings)
    expected = {name for name in FinetuneSettings.model_fields if name.startswith("finetune_")} - {
        "finetune_reward_admin_token"
    }
    assert set(recorded) == expected
    assert recorded["finetune_steps"] == 7 and recorded["finetune_optimizer"] == settings.finetune_optimizer
    text = json.dumps(recorded, allow_nan=False)  # plain JSON: paths as strings
    assert "s3cret" not in text and "s3_secret" not in text


# ------------------------------------------------------------------ repeated runs


def _run(seed: int, final: float, ci_low: float, statuses: list[str], population: str = "default", kl=2.0) -> dict:
    rounds = [{"round": 0, "policy_version": "1", "win_rate": None}]
    for i, status in enumerate(statuses, start=1):
        rounds.append(
            {
                "round": i,
                "policy_version": str(i + 1),
                "cycle": {"status": status},
                "gate": {"candidate": {"kl": kl * i}} if status != "skipped" else {},
                "win_rate": {"win_rate": final - 0.05 * (len(statuses) - i), "ci_low": ci_low, "ci_high": 0.8},
            }
        )
    return {
        "population": population,
        "seed": seed,
        "rounds": rounds,
        "elapsed_s": 600.0 + 60 * seed,
        "final": {
            "policy_version": str(len(statuses) + 1),
            "win_rate": final,
            "ci_low": ci_low,
            "ci_high": final + 0.07,
            "expected_win_rate": final - 0.02,
        },
    }


def test_summarize_runs_reports_spread_accepted_share_and_targets():
    runs = [
        _run(0, 0.72, 0.64, ["deployed", "deployed", "deployed"]),
        _run(1, 0.66, 0.58, ["deployed", "rejected", "deployed"]),
        _run(2, 0.75, 0.67, ["deployed", "published", "deployed"]),
        _run(3, 0.70, 0.62, ["deployed", "deployed", "deployed"]),
        _run(4, 0.58, 0.49, ["rejected", "deployed", "skipped"]),
    ]
    summary = summarize_runs(runs)
    finals = summary["final_win_rate"]
    assert finals["median"] == 0.70 and finals["min"] == 0.58 and finals["max"] == 0.75
    assert finals["q25"] == 0.66 and finals["q75"] == 0.72 and finals["iqr"] == pytest.approx(0.06)
    assert summary["runs_ge_65_ci_above_50"] == 4
    assert summary["cycles_accepted"] == 12 and summary["cycles_total"] == 15 and summary["accepted_share"] == 0.8
    assert summary["median_elapsed_min"] == 12.0
    first = summary["runs"][0]
    assert first["seed"] == 0 and first["cycles_accepted"] == 3 and first["candidate_kl"] == [2.0, 4.0, 6.0]
    assert summary["runs"][4]["candidate_kl"] == [2.0, 4.0, None] and first["elapsed_min"] == 10.0
    assert summary["targets"] == {
        "median >= 0.70": True,
        "runs_ge_65_ci_above_50 >= 4 of 5": True,
        "accepted_share >= 0.8": True,
    }
    assert summary["targets_met"]

    worse = summarize_runs(runs[:4] + [_run(4, 0.58, 0.49, ["rejected", "rejected", "rejected"])])
    assert worse["accepted_share"] == pytest.approx(11 / 15, abs=1e-4)
    assert not worse["targets"]["accepted_share >= 0.8"] and not worse["targets_met"]
    assert not summarize_runs(runs[1:2])["targets_met"]  # one run: median 0.66 < 0.70

    opposite = summarize_runs(
        [_run(seed, 0.66, 0.55, ["deployed", "rejected"], population="opposite") for seed in range(3)]
    )
    assert (
        opposite["population"] == "opposite"
        and opposite["targets"] == {"median >= 0.65": True}
        and opposite["targets_met"]
    )
    with pytest.raises(ValueError, match="different populations"):
        summarize_runs([runs[0], _run(9, 0.6, 0.5, ["deployed"], population="opposite")])
    with pytest.raises(ValueError):
        summarize_runs([])


def test_summary_files_are_written(tmp_path):
    runs = [_run(seed, 0.6 + 0.03 * seed, 0.55, ["deployed", "rejected"]) for seed in range(3)]
    runs[1]["final"]["ci_high"] = float("nan")
    summary, (json_path, md_path, png_path) = write_summary(runs, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["n_runs"] == 3 and data["runs"][1]["ci_high"] is None and data == summary
    text = md_path.read_text()
    assert "| 2 | 66.0% [55.0%, 73.0%]" in text and "median 0.630" in text and "NOT met" in text
    assert png_path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ demo


def test_demo_reports_the_held_out_win_rate_against_the_previous_policy():
    summary = {
        "policy_before": "3",
        "policy_after": "4",
        "win_rate_vs_previous": WinRate(wins=59, losses=33, ties=4, expected=0.6).to_dict(),
    }
    assert win_rate_line(summary) == "held-out listeners prefer v4 over v3: 64.1% [53.9, 73.2] (59-33-4)"
    kept = {
        "policy_before": "3",
        "policy_after": "3",
        "win_rate_vs_previous": None,
        "win_rate_vs_previous_reason": "no new policy deployed (cycle rejected: gate)",
    }
    assert "no new policy deployed (cycle rejected: gate)" in win_rate_line(kept)


def test_closed_loop_command_rejects_an_unknown_population_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from loadtests.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["closed-loop", "--population", "jazz", "--work-dir", str(tmp_path / "work")])
    assert result.exit_code != 0 and "default, opposite" in result.output
    assert not (tmp_path / "work").exists()
    help_text = runner.invoke(app, ["closed-loop", "--help"]).output
    assert "--seeds" in help_text and "--population" in help_text


class _Judge:
    """A judge whose utility is the mean of the wave: louder clips win."""

    def utility(self, wave):
        return float(np.mean(wave))

    def outcome_probabilities(self, utility_a, utility_b):
        p_a = 1.0 / (1.0 + np.exp(-(utility_a - utility_b) * 50))
        return {"a": p_a, "b": 1 - p_a, "tie": 0.0}


def test_held_out_judge_pairs_each_policy_clip_with_its_base_clip(monkeypatch):
    waves = {"base": [np.zeros(10)] * 40, "better": [np.full(10, 0.5)] * 40, "worse": [np.full(10, -0.5)] * 40}
    judge = object.__new__(HeldOutJudge)
    judge.config = type("C", (), {"seed": 0})()
    judge.judges = [_Judge()] * 40
    judge.base_first = np.arange(40) % 2 == 0
    judge.seeds = list(range(40))
    monkeypatch.setattr(judge, "_waves", lambda policy_dir, seeds: waves[str(policy_dir)], raising=False)
    judge.base_utilities = judge._utilities("base")
    better, worse = judge.win_rate("better"), judge.win_rate("worse")
    assert better.wins == 40 and better.expected > 0.99
    assert worse.losses == 40 and worse.expected < 0.01


def test_hot_swap_summary_compares_the_swap_window_with_steady_state():
    row = {
        "hot_swap": {
            "steady": {"requests": 20, "failed": 0, "p50_ms": 100.0, "p99_ms": 200.0},
            "during_swap": {"requests": 5, "failed": 0, "p50_ms": 150.0, "p99_ms": 300.0},
            "versions_seen": ["1", "2"],
        },
        "cycle": {"status": "deployed", "timings_s": {"deploy": 12.0}},
        "preference_to_deployed_s": 90.0,
        "buffer_landed_s": 9.0,
        "preferences_round": 50,
    }
    summary = hot_swap_summary({"rounds": [row], "machine": {}})
    assert summary["p99_ratio"] == 1.5 and summary["requests"] == 25 and summary["swap_failed"] == 0
    assert headline("hot_swap", summary)["preference_to_deployed_s"] == 90.0


def test_bench_report_names_the_machine_and_every_benchmark():
    rows = [
        {
            "name": "serving",
            "what": "w",
            "command": "gateway bench",
            "exit": 0,
            "seconds": 1.0,
            "results": "results/does-not-exist.json",
            "log": "x.log",
        }
    ]
    report = collect(rows)
    assert {"cpu", "cores", "memory_gb", "python", "torch"} <= set(report["machine"])
    text = markdown(report)
    assert "| serving |" in text and "results not refreshed" in text and "No results" in text


def test_services_join_stack_up_but_not_the_server_list(tmp_path):
    settings = free_port_settings(tmp_path)
    assert [c.name for c in COMPONENTS] == ["seaweedfs", "tansu", "triton"]
    assert [c.name for c in default_components(settings)] == [
        "seaweedfs",
        "tansu",
        "triton",
        "reward",
        "finetune",
        "gateway",
        "consumer",
    ]
    assert [c.name for c in default_components(settings.model_copy(update={"stack_services": False}))] == [
        "seaweedfs",
        "tansu",
        "triton",
    ]
    processes = {c.name: c.process(settings) for c in SERVICES}
    assert processes["gateway"].ports == {"http": settings.stack_gateway_port}
    assert processes["gateway"].argv[:5] == [sys.executable, "-m", "musicrl.cli", "gateway", "serve"]
    assert processes["reward"].ports == {"http": settings.stack_reward_port}
    assert processes["consumer"].env["MUSICRL_CONSUMER_METRICS_PORT"] == str(settings.stack_consumer_metrics_port)
    finetune_env = processes["finetune"].env
    assert finetune_env["MUSICRL_FINETUNE_TRITON_REPO"] == str(settings.triton_repo)
    info = StackInfo(settings)
    for process in processes.values():
        assert process.env["MUSICRL_S3_ENDPOINT"] == info.s3_endpoint
        assert process.env["MUSICRL_KAFKA_BOOTSTRAP"] == info.kafka_bootstrap
    assert processes["gateway"].env["MUSICRL_REWARD_URL"] == info.reward_url
