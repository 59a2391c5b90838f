"""REINFORCE with a group baseline, a KL budget and reward constraints, on a tiny random generator
with a fake token-counting reward. Configs come from FinetuneSettings, as in the worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import TokenFractionReward, embed, one_thread, prompts_for, tiny_generator  # noqa: F401 - fixture

from finetune_worker.configs import reinforce_config
from finetune_worker.settings import FinetuneSettings
from finetune_worker.trainers.base import NonFiniteError
from finetune_worker.trainers.reinforce import (
    Constraints,
    KLController,
    ReinforceConfig,
    ReinforceTrainer,
    leave_one_out,
    token_kl,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _config(**settings) -> ReinforceConfig:
    values = {
        "finetune_steps": 30,
        "finetune_duration_s": 1.5,
        "finetune_stage": "R",
        "finetune_policy_lr": 3e-3,
        "finetune_optimizer": "adamw",
        "finetune_checkpoint_every": 5,
        "finetune_kl_target": 20.0,
        "finetune_kl_budget": 40.0,
    } | {f"finetune_{k}": v for k, v in settings.items()}
    return reinforce_config(FinetuneSettings(**values))


def _trainer(tmp_path=None, reward=None, candidates=None, **settings) -> ReinforceTrainer:
    return ReinforceTrainer(
        _config(**settings),
        tiny_generator(),
        reward or TokenFractionReward(),
        prompts_for,
        embed,
        checkpoint_dir=tmp_path,
        candidates_dir=candidates,
    )


class TargetVersusOther(TokenFractionReward):
    """Stage U on a fake: the target ('preference') rewards token 3, which costs 'text_adherence' (token 5 share)."""

    def __call__(self, prompts, tokens):
        tokens = np.asarray(tokens)
        return {
            "preference": (tokens == 3).mean(axis=1),
            "text_adherence": (tokens == 5).mean(axis=1) + 0.2,
            "quality": np.full(len(tokens), 0.5),
        }


def test_reward_goes_up_and_the_history_names_the_paper_quantities():
    out = _trainer(steps=40).train()
    rewards = [m["reward"] for m in out.history]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1
    assert all(np.isfinite(m["kl"]) and m["kl"] >= 0 for m in out.history)
    assert {"reward", "kl", "kl_target", "kl_budget", "alpha", "entropy", "reward/text_adherence"} <= set(out.last)


def test_leave_one_out_baseline_subtracts_the_mean_of_the_other_rollouts_of_the_same_prompt():
    values = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    np.testing.assert_allclose(leave_one_out(values, 3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # a reward that only depends on the prompt carries no signal: every advantage is zero
    assert np.allclose(leave_one_out(np.repeat([0.3, 0.9, 0.1, 0.5], 4), 4), 0.0)


def test_rollouts_come_in_groups_of_one_prompt_with_distinct_seeds():
    trainer = _trainer(group_size=4, batch_size=16)
    prompts, _, tokens = trainer.rollout(0)
    assert len(prompts) == 16 and all(len(set(prompts[i : i + 4])) == 1 for i in range(0, 16, 4))
    assert tokens.shape == (16, 1, trainer.config.n_frames)  # [B, K, T]: one codebook
    assert len({tuple(row) for row in tokens[:4, 0].tolist()}) > 1


def test_kl_controller_raises_alpha_above_target_and_lowers_it_below():
    control = KLController(alpha=0.1, target=10.0, steps=10, gain=0.5)
    assert control.target_at(5) == pytest.approx(5.0) and control.target_at(20) == 10.0
    assert control.update(kl=20.0, step=10) == pytest.approx(0.125)  # error clipped at +0.5
    assert control.update(kl=0.0, step=10) == pytest.approx(0.125 * 0.75)


def test_the_controller_holds_the_cycle_near_its_kl_target():
    free = _trainer(steps=30, kl_target=35.0, kl_budget=49.0, alpha=0.01, kl_gain=1e-6).train()
    held = _trainer(steps=30, kl_target=2.0, kl_budget=49.0, alpha=0.01, kl_gain=1.0).train()
    assert held.last["alpha"] > 10 * free.last["alpha"]
    assert held.last["kl"] < 0.5 * free.last["kl"]


def test_early_stop_when_the_kl_passes_the_budget(tmp_path):
    trainer = _trainer(
        steps=60,
        kl_target=0.5,
        kl_budget=1.0,
        alpha=1e-4,
        kl_gain=1e-6,
        policy_lr=1e-2,
        candidates=tmp_path / "candidates",
    )
    out = trainer.train()
    assert out.step < 60 and out.last["stopped_early"] == 1.0 and out.last["kl"] > 1.0
    assert all(m["kl"] <= 1.0 for m in out.history[:-1])
    # the last snapshot is the policy at the stop
    assert (tmp_path / "candidates" / f"step-{out.step:04d}" / "meta.json").is_file()


def test_constraint_multiplier_rises_while_violated_and_protects_the_other_reward():
    constraints = Constraints(("text_adherence",), slack=0.0, lr=1.0, warmup=2, smoothing=0.5)
    constraints.update({"text_adherence": 0.4}, {"text_adherence": 0.1})  # warm-up: the starting level
    constraints.update({"text_adherence": 0.6}, {"text_adherence": 0.1})
    assert (
        constraints.start["text_adherence"] == pytest.approx(0.5) and constraints.multipliers["text_adherence"] == 0.0
    )
    constraints.update({"text_adherence": 0.3}, {"text_adherence": 0.1})
    assert constraints.multipliers["text_adherence"] == pytest.approx(1.0)  # (0.5 - 0.4) / 0.1
    for _ in range(10):
        constraints.update({"text_adherence": 0.6}, {"text_adherence": 0.1})
    assert constraints.multipliers["text_adherence"] == 0.0

    def other_reward_drop(lagrange_lr: float) -> tuple[float, float]:
        out = _trainer(
            steps=30, stage="U", reward=TargetVersusOther(), lagrange_lr=lagrange_lr, constraint_slack=0.0
        ).train()
        first, last = out.history[:3], out.history[-3:]
        mean = lambda rows, key: float(np.mean([m[key] for m in rows]))  # noqa: E731
        return (
            mean(first, "reward/text_adherence") - mean(last, "reward/text_adherence"),
            out.last["lambda/text_adherence"],
        )

    unconstrained_drop, _ = other_reward_drop(0.0)
    constrained_drop, multiplier = other_reward_drop(2.0)
    assert multiplier > 0 and constrained_drop < unconstrained_drop


def test_snapshots_every_n_steps_and_at_the_end(tmp_path):
    _trainer(steps=7, candidate_every=3, candidates=tmp_path).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0003", "step-0006", "step-0007"]


def test_token_kl_is_zero_for_identical_models_and_positive_otherwise():
    logits = torch.randn(2, 5, 7)
    assert torch.allclose(token_kl(logits, logits), torch.zeros(2, 5), atol=1e-6)
    assert (token_kl(logits, torch.randn(2, 5, 7)) > 0).all()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    straight = _trainer(steps=10).train()
    first = _trainer(tmp_path, steps=5)
    first.train()
    first.save_checkpoint()
    out = _trainer(tmp_path, steps=10).train()
    assert out.resumed_from == 5 and out.step == 10
    assert [round(m["reward"], 6) for m in out.history] == [round(m["reward"], 6) for m in straight.history]
    assert [round(m["alpha"], 9) for m in out.history] == [round(m["alpha"], 9) for m in straight.history]


def test_nan_reward_stops_training():
    trainer = _trainer(steps=3)
    trainer.reward_fn = lambda prompts, tokens: {
        "text_adherence": np.full(len(tokens), np.nan),
        "quality": np.zeros(len(tokens)),
    }
    with pytest.raises(NonFiniteError):
        trainer.train()


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="stage"):
        _config(stage="X")
    with pytest.raises(ValueError, match="multiple of"):
        _config(batch_size=10, group_size=4)
    with pytest.raises(ValueError, match="kl_target < finetune_kl_budget"):
        _config(kl_target=12.0, kl_budget=10.0)
    trainer = _trainer(steps=1, stage="U")
    trainer.reward_fn = lambda prompts, tokens: {"text_adherence": np.zeros(len(tokens))}
    with pytest.raises(KeyError, match="preference"):
        trainer.train()
