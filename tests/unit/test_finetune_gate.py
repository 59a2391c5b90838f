"""The evaluation gate's checks, the prompt mixer and split, and the training plots."""

from __future__ import annotations

import math

import pytest
import torch
from finetune_helpers import tiny_generator

from finetune_worker.gate import GateConfig, choose, evaluate_gate, refusal_reason, weights_finite
from finetune_worker.plots import plot_training
from finetune_worker.prompts import PromptMixer, split_prompts

pytestmark = pytest.mark.unit

BASE = {"reward": 0.50, "kl": 0.0, "reward/text_adherence": 0.30, "reward/quality": 0.60, "reward/preference": 0.50}


def _gate(**candidate):
    return evaluate_gate(
        {**BASE, **candidate}, BASE, ["preference"], GateConfig(min_reward_gain=0.0, max_kl=10.0, max_other_drop=0.05)
    )


def test_the_sum_of_the_rewards_is_not_a_second_quality_check():
    """combined = weighted sum incl. quality: a quality drop within bounds must not fail the gate through it."""
    base = {**BASE, "reward/combined": 1.4, "reward/quality_mos": 3.4}
    candidate = {
        **base,
        "reward": 0.6,
        "reward/preference": 0.6,
        "reward/quality": 0.56,
        "reward/combined": 1.3,
        "reward/quality_mos": 3.2,
    }
    config = GateConfig(min_reward_gain=0.0, max_kl=10.0, max_other_drop=0.05)
    assert evaluate_gate(candidate, base, ["preference"], config).passed
    report = evaluate_gate({**candidate, "reward/quality": 0.5}, base, ["preference"], config)
    assert not report.passed and "reward/quality" in report.reason and "combined" not in report.reason


def test_a_better_close_candidate_passes():
    report = _gate(reward=0.6, kl=2.0, **{"reward/preference": 0.6, "reward/text_adherence": 0.28})
    assert report.passed and report.reason == "all checks passed"


@pytest.mark.parametrize(
    ("candidate", "failed"),
    [
        ({"reward": 0.49}, "reward_improved"),
        ({"reward": 0.6, "kl": 11.0}, "kl_bounded"),
        ({"reward": 0.6, "reward/text_adherence": 0.2}, "no_collapse"),  # over-optimised the user reward
        ({"reward": float("nan")}, "finite"),
    ],
)
def test_each_failure_is_named_in_the_reason(candidate, failed):
    report = _gate(**candidate)
    assert not report.passed and failed in report.reason
    assert report.to_dict()["reason"] == report.reason


def test_target_component_may_move_and_nan_weights_fail():
    assert _gate(reward=0.9, **{"reward/preference": 0.9}).passed
    model = tiny_generator()
    assert weights_finite(model)
    with torch.no_grad():
        model.bos[0] = math.inf
    assert not weights_finite(model)
    report = evaluate_gate(
        {**BASE, "reward": 0.9}, BASE, ["preference"], GateConfig(0.0, 50.0, 0.05), candidate_weights_finite=False
    )
    assert not report.passed and "finite" in report.reason


def test_prompt_split_is_deterministic_disjoint_and_mixer_is_reproducible():
    prompts = [f"prompt {i}" for i in range(200)] + ["prompt 1"]
    train, heldout = split_prompts(prompts, 0.2)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 200
    assert 20 < len(heldout) < 60 and split_prompts(list(reversed(prompts)), 0.2)[1] == list(reversed(heldout))
    mixer = PromptMixer(["user a", "user b"], ["caption"], user_fraction=0.75, seed=3)
    batch = mixer(5, 0, 400)
    assert batch == mixer(5, 0, 400) and batch != mixer(6, 0, 400) and batch != mixer(5, 1, 400)
    assert 0.65 < sum(p.startswith("user") for p in batch) / 400 < 0.85
    assert set(PromptMixer([], ["only"], 0.9)(0, 0, 5)) == {"only"}
    with pytest.raises(ValueError, match="no prompts"):
        PromptMixer([], [], 0.5)


def test_plots_are_written(tmp_path):
    history = [{"step": float(i), "reward": 0.1 * i, "kl": 0.5 * i, "reward/quality": 0.2} for i in range(1, 6)]
    paths = plot_training(history, tmp_path)
    assert [p.name for p in paths] == ["reward_vs_step.png", "reward_vs_kl.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_the_gate_chooses_the_best_passing_checkpoint_and_refuses_only_when_none_passes():
    config = GateConfig(min_reward_gain=0.0, max_kl=10.0, max_other_drop=0.05)

    def report(reward: float, kl: float, text_adherence: float = 0.30):
        scored = {
            **BASE,
            "reward": reward,
            "kl": kl,
            "reward/preference": reward,
            "reward/text_adherence": text_adherence,
        }
        return evaluate_gate(scored, BASE, ["preference"], config)

    early, best_but_too_far, good, collapsed = (
        report(0.55, 2.0),
        report(0.95, 12.0),
        report(0.70, 6.0),
        report(0.9, 5.0, 0.2),
    )
    assert choose([early, best_but_too_far, good, collapsed]) == 2  # the highest reward among those that pass
    assert choose([early, early]) == 0  # a tie goes to the earlier (closer) snapshot
    refused = [best_but_too_far, collapsed]
    assert choose(refused) is None
    reason = refusal_reason([10, 20], refused)
    assert reason.startswith("no checkpoint passed the gate: step 10: kl_bounded") and "step 20: no_collapse" in reason
