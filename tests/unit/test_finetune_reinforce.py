"""KL-regularised REINFORCE on a tiny random generator with a fake token-counting reward."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from finetune_worker.trainers.base import NonFiniteError
from finetune_worker.trainers.reinforce import ReinforceConfig, ReinforceTrainer, ValueModel, token_kl
from finetune_helpers import TokenFractionReward, embed, prompts_for, tiny_generator, one_thread  # noqa: F401 - fixture

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


class ScaledReward(TokenFractionReward):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def __call__(self, prompts, tokens):
        return {name: self.scale * value for name, value in super().__call__(prompts, tokens).items()}


def _trainer(tmp_path=None, steps=30, alpha=0.001, reward=None, **overrides):
    policy = tiny_generator()
    ref = copy.deepcopy(policy)
    overrides.setdefault("stage", "R")
    config = ReinforceConfig(
        steps=steps, batch_size=16, n_frames=12, alpha=alpha, policy_lr=3e-3, value_lr=1e-2,
        optimizer="adamw", checkpoint_every=5, **overrides,
    )
    return ReinforceTrainer(config, policy, ref, reward or TokenFractionReward(), prompts_for, embed, checkpoint_dir=tmp_path)


def test_reward_goes_up_and_kl_stays_bounded():
    trainer = _trainer(steps=40)
    out = trainer.train()
    rewards = [m["reward"] for m in out.history]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1
    assert all(np.isfinite(m["kl"]) and m["kl"] >= 0 for m in out.history)
    assert {"reward", "kl", "value_loss", "entropy", "reward/text_adherence"} <= set(out.last)
    # the value baseline learns the mean return
    assert out.history[-1]["value_loss"] < out.history[0]["value_loss"]


def test_stronger_kl_keeps_the_policy_closer_to_the_reference():
    loose = _trainer(steps=25, alpha=0.0).train().last["kl"]
    tight = _trainer(steps=25, alpha=0.5).train().last["kl"]
    assert tight < loose


def test_normalized_advantages_make_the_kl_trade_off_independent_of_the_reward_scale():
    def final_kl(scale: float, normalize: bool) -> float:
        trainer = _trainer(steps=12, alpha=0.2, reward=ScaledReward(scale), normalize_advantages=normalize)
        return trainer.train().last["kl"]

    # raw advantages: a 1000x larger reward drowns the KL term and the policy runs far from the reference
    assert final_kl(1000.0, normalize=False) > 3 * final_kl(1.0, normalize=False)
    # normalised: the same reward up to scale gives the same trade-off
    assert final_kl(1000.0, normalize=True) == pytest.approx(final_kl(1.0, normalize=True), rel=0.25)


def test_token_kl_is_zero_for_identical_models_and_positive_otherwise():
    logits = torch.randn(2, 5, 7)
    assert torch.allclose(token_kl(logits, logits), torch.zeros(2, 5), atol=1e-6)
    assert (token_kl(logits, torch.randn(2, 5, 7)) > 0).all()


def test_value_model_starts_from_the_policy_trunk_and_predicts_per_position():
    policy = tiny_generator()
    value = ValueModel(policy)
    assert torch.equal(value.trunk.tok_emb.weight, policy.tok_emb.weight)
    assert value.trunk.tok_emb.weight.data_ptr() != policy.tok_emb.weight.data_ptr()
    out = value(torch.from_numpy(embed(["a", "b"])), torch.zeros(2, 6, dtype=torch.long))
    assert out.shape == (2, 6)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    straight = _trainer(steps=10).train()
    first = _trainer(tmp_path, steps=5)
    first.train()
    first.save_checkpoint()
    resumed = _trainer(tmp_path, steps=10)
    out = resumed.train()
    assert out.resumed_from == 5 and out.step == 10
    assert [round(m["reward"], 6) for m in out.history] == [round(m["reward"], 6) for m in straight.history]


def test_nan_reward_stops_training():
    trainer = _trainer(steps=3)
    trainer.reward_fn = lambda prompts, tokens: {"text_adherence": np.full(len(tokens), np.nan), "quality": np.zeros(len(tokens))}
    with pytest.raises(NonFiniteError):
        trainer.train()


def test_unknown_stage_and_missing_component_are_clear_errors():
    with pytest.raises(ValueError, match="stage"):
        ReinforceConfig(stage="X")
    trainer = _trainer(steps=1, stage="U")
    trainer.reward_fn = lambda prompts, tokens: {"text_adherence": np.zeros(len(tokens))}
    with pytest.raises(KeyError, match="preference"):
        trainer.train()
