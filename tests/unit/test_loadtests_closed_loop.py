"""Unit tests of the closed-loop experiment's statistics and reports, the bench suite's
summaries, and the stack components of the services (no servers are started here)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy.stats import binomtest

from loadtests.bench_suite import collect, headline, hot_swap_summary, markdown
from loadtests.closed_loop import HeldOutJudge, WinRate, _finite, results_table, wilson_interval, write_reports
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
    row = {"round": 1, "policy_version": "2", "preferences_total": 60,
           "win_rate": {"win_rate": win_rate, "ci_low": ci_low, "ci_high": 0.8, "wins": 70, "losses": 30, "ties": 3,
                        "expected_win_rate": 0.66},
           "rewards": {"kl": 2.5, "reward/text_adherence": 0.11, "reward/quality_mos": 4.2, "reward/preference": 0.4},
           "base_rewards_same_rm": {"reward/preference": 0.1}, "reward_model": {"heldout_accuracy": float("nan")},
           "cycle": {"status": "deployed"}}
    base = {"round": 0, "policy_version": "1", "preferences_total": 0, "win_rate": None, "rewards": {"kl": 0.0}}
    return {"rounds": [base, row], "final": {"policy_version": "2", "win_rate": win_rate, "ci_low": ci_low, "ci_high": 0.8,
                                             "target_met": win_rate >= 0.7 and ci_low > 0.5},
            "elapsed_s": 600.0, "machine": {"cores": 2, "cpu": "test cpu"}}


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
    row = {"hot_swap": {"steady": {"requests": 20, "failed": 0, "p50_ms": 100.0, "p99_ms": 200.0},
                        "during_swap": {"requests": 5, "failed": 0, "p50_ms": 150.0, "p99_ms": 300.0},
                        "versions_seen": ["1", "2"]},
           "cycle": {"status": "deployed", "timings_s": {"deploy": 12.0}}, "preference_to_deployed_s": 90.0,
           "buffer_landed_s": 9.0, "preferences_round": 50}
    summary = hot_swap_summary({"rounds": [row], "machine": {}})
    assert summary["p99_ratio"] == 1.5 and summary["requests"] == 25 and summary["swap_failed"] == 0
    assert headline("hot_swap", summary)["preference_to_deployed_s"] == 90.0


def test_bench_report_names_the_machine_and_every_benchmark():
    rows = [{"name": "serving", "what": "w", "command": "gateway bench", "exit": 0, "seconds": 1.0,
             "results": "results/does-not-exist.json", "log": "x.log"}]
    report = collect(rows)
    assert {"cpu", "cores", "memory_gb", "python", "torch"} <= set(report["machine"])
    text = markdown(report)
    assert "| serving |" in text and "results not refreshed" in text and "No results" in text


def test_services_join_stack_up_but_not_the_server_list(tmp_path):
    settings = free_port_settings(tmp_path)
    assert [c.name for c in COMPONENTS] == ["seaweedfs", "tansu", "triton"]
    assert [c.name for c in default_components(settings)] == ["seaweedfs", "tansu", "triton", "reward", "finetune", "gateway", "consumer"]
    assert [c.name for c in default_components(settings.model_copy(update={"stack_services": False}))] == ["seaweedfs", "tansu", "triton"]
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
