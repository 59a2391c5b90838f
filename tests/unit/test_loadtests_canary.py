"""The canary experiment's pieces that run without servers: the candidates' rewards and the summary."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.canary import AgainstListeners, CanaryExperimentConfig, TowardListeners, summarize

pytestmark = pytest.mark.unit


def _run(kind: str, outcome: str, decided: int = 50) -> dict:
    return {"candidate": kind, "outcome": outcome, "decided_votes_used": decided, "canary_s": 10.0}


def test_summary_targets_follow_the_outcomes():
    config = CanaryExperimentConfig(runs=5, max_votes=400)
    runs = (
        [_run("worse", "rolled_back")] * 4
        + [_run("worse", "inconclusive", 400)]
        + [_run("better", "promoted")] * 4
        + [_run("better", "inconclusive", 400)]
    )
    result = summarize(runs, config)
    assert result["targets"] == {"worse_never_promoted": True, "better_promoted_at_least_4_of_5": True, "vote_cap": 400}
    assert result["summary"]["worse"]["inconclusive"] == 1 and result["summary"]["better"]["median_decided_votes"] == 50
    runs[0] = _run("worse", "promoted")
    runs[5] = _run("better", "rolled_back")
    result = summarize(runs, config)
    assert result["targets"]["worse_never_promoted"] is False
    assert result["targets"]["better_promoted_at_least_4_of_5"] is False  # 3 of 5
    assert summarize(runs[:3], config)["targets"]["worse_never_promoted"] is False  # fewer runs than asked


def test_the_two_candidates_rewards_are_the_listeners_taste_and_its_opposite():
    tokens = np.random.default_rng(0).integers(0, 64, size=(3, 16))
    toward, against = TowardListeners()(["x"] * 3, tokens), AgainstListeners()(["x"] * 3, tokens)
    assert set(toward) == {"preference"} and np.allclose(toward["preference"], -against["preference"])
