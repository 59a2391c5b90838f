"""The stack-loop harness's pure parts: what counts as a vote, and how the loop's next cycle is observed."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from loadtests.stack_loop import StackLoopConfig, finished_runs, votes_sent, wait_for_cycle

pytestmark = pytest.mark.unit


def _archive(runs_dir, run_id: str, **record) -> None:
    (runs_dir / run_id).mkdir(parents=True)
    (runs_dir / run_id / "run.json").write_text(json.dumps({"run_id": run_id, "parent_version": "1", **record}))


def test_abstentions_are_not_votes():
    assert votes_sent(Counter({"a": 3, "b": 2, "tie": 1, "none": 9})) == 6


@pytest.mark.parametrize(
    "record,version",
    [
        ({"status": "deployed", "candidate_version": "2", "gate": {"passed": True, "chosen_step": 20}}, "2"),
        ({"status": "rejected", "reason": "no checkpoint passed the gate: step 5: kl_bounded"}, "1"),
        ({"status": "skipped", "reason": "no preference model trained on users' votes"}, "1"),
    ],
)
def test_the_next_archived_cycle_is_reported_whatever_its_outcome(tmp_path, record, version):
    _archive(tmp_path, "older", status="deployed", candidate_version="9", created_at="2026-01-01")
    seen = set(finished_runs(tmp_path))
    timer = threading.Timer(0.05, _archive, (tmp_path, "next"), {**record, "created_at": "2026-02-01"})
    timer.start()
    result = wait_for_cycle(tmp_path, seen, timeout_s=5, poll_s=0.01)
    timer.join()
    assert result["status"] == record["status"] and result["version"] == version and result["run_id"] == "next"
    assert seen == {"older", "next"} and result["reason"] == record.get("reason")


def test_a_loop_that_never_finishes_times_out(tmp_path):
    result = wait_for_cycle(tmp_path / "runs", set(), timeout_s=0.05, poll_s=0.01)
    assert result["status"] == "timeout" and "no cycle finished" in result["reason"]


def test_listeners_follow_the_chosen_population():
    config = StackLoopConfig(population="opposite", seed=3).listeners()
    assert config.population == "opposite" and config.seed == 3 and not config.hot_swap_probe


def _seed_result(seed: int, deployed: int, final: dict | None, target_met: bool) -> dict:
    rounds = [
        {
            "round": i + 1,
            "status": "deployed" if i < deployed else "rejected",
            "reward_model": {"heldout_accuracy": 0.55},
        }
        for i in range(3)
    ]
    if final:
        rounds[deployed - 1]["win_rate_vs_base"] = final
    return {
        "config": {"seed": seed},
        "rounds": rounds,
        "deployed": deployed,
        "final_version": str(deployed + 1) if deployed else None,
        "final_win_rate_vs_base": final,
        "target_met": target_met,
        "elapsed_s": 600.0,
    }


def test_seeds_are_summarized_with_their_spread():
    from loadtests.stack_loop import summarize_seeds

    summary = summarize_seeds(
        [
            _seed_result(2, 3, {"win_rate": 0.69, "ci_low": 0.61, "ci_high": 0.75}, True),
            _seed_result(0, 3, {"win_rate": 0.525, "ci_low": 0.45, "ci_high": 0.60}, False),
            _seed_result(1, 0, None, False),  # nothing deployed: the base, 50 %
        ]
    )
    assert [s["seed"] for s in summary["seeds"]] == [0, 1, 2]
    assert summary["seeds_meeting_target"] == 1 and summary["n_seeds"] == 3
    assert summary["final_win_rate"] == {"median": 0.525, "min": 0.5, "max": 0.69}
    assert summary["deployed_total"] == 6 and summary["max_elapsed_min"] == 10.0
    assert summary["seeds"][2]["win_rate_by_round"] == [None, None, 0.69]
