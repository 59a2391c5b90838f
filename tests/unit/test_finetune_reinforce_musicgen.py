"""REINFORCE and the held-out evaluation through the policy interface, on a tiny random MusicGen
(T5 + 4-codebook decoder + EnCodec) with a fake reward over its [B, K, T] tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from finetune_helpers import PROMPTS, TokenFractionReward, embed, one_thread, prompts_for, tiny_generator  # noqa: F401 - fixture
from pretrained_helpers import tiny_musicgen

from finetune_worker.configs import reinforce_config
from finetune_worker.evaluation import evaluate_policy
from finetune_worker.settings import FinetuneSettings
from finetune_worker.trainers.reinforce import ReinforceTrainer
from musicrl.models.musicgen import MusicgenPolicy
from musicrl.models.policy import load_policy

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]
TARGET = 3


class FirstCodebookReward:
    """text_adherence = share of the first codebook's frames that are code TARGET (tokens [B, K, T])."""

    versions = {"text_adherence": "fake", "quality": "fake"}

    def __init__(self):
        self.shapes = []

    def __call__(self, prompts, tokens):
        tokens = np.asarray(tokens)
        self.shapes.append(tokens.shape)
        return {"text_adherence": (tokens[:, 0] == TARGET).mean(axis=1), "quality": np.zeros(len(tokens))}


def test_two_reinforce_steps_on_musicgen(tmp_path):
    policy = load_policy(tiny_musicgen(tmp_path / "musicgen", guidance_scale=3.0))
    text_encoder = [p.clone() for p in policy.model.text_encoder.parameters()]
    decoder = [p.clone() for p in policy.model.decoder.parameters()]
    settings = FinetuneSettings(
        finetune_steps=2,
        finetune_stage="R",
        finetune_optimizer="adamw",
        finetune_policy_lr=1e-2,
        finetune_batch_size=8,
        finetune_group_size=4,
        finetune_checkpoint_every=0,
        finetune_kl_target=20.0,
        finetune_kl_budget=40.0,
    )
    config = dataclasses.replace(reinforce_config(settings), n_frames=policy.frames_for(0.2))  # 10 frames at 50/s
    reward = FirstCodebookReward()
    trainer = ReinforceTrainer(config, policy, reward, prompts_for, None, candidates_dir=tmp_path / "candidates")
    out = trainer.train()

    assert out.step == 2 and reward.shapes == [(8, 4, 10)] * 2
    assert out.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first batch is scored before any update
    assert out.history[1]["kl"] > 0 and all(np.isfinite(list(m.values())).all() for m in out.history)
    assert any(not torch.equal(a, b) for a, b in zip(decoder, policy.model.decoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(text_encoder, policy.model.text_encoder.parameters()))  # frozen

    candidate = load_policy(tmp_path / "candidates" / "step-0002")  # a MusicGen version directory again
    assert isinstance(candidate, MusicgenPolicy) and candidate.guidance_scale == 3.0
    tokens = torch.randint(0, 16, (2, 4, 6))
    cond = policy.condition(["calm piano", "fast drums"])
    torch.testing.assert_close(
        candidate(candidate.condition(["calm piano", "fast drums"]), tokens), policy.eval()(cond, tokens)
    )

    start = load_policy(tmp_path / "musicgen")
    metrics = evaluate_policy(
        candidate,
        start,
        ["calm piano", "sad strings"],
        None,
        FirstCodebookReward(),
        {"text_adherence": 1.0},
        n_frames=10,
        samples_per_prompt=2,
    )
    assert metrics["n_clips"] == 4 and metrics["kl"] > 0 and 0.0 <= metrics["reward"] <= 1.0
    assert evaluate_policy(
        start, start, ["calm piano"], None, FirstCodebookReward(), {"text_adherence": 1.0}, n_frames=10
    )["kl"] == pytest.approx(0.0, abs=1e-5)


def test_evaluation_still_takes_the_default_generator():
    """The cycle hands evaluate_policy Generators and a prompt encoder, as before."""
    policy, reference = tiny_generator(seed=0), tiny_generator(seed=1)
    reward = TokenFractionReward()
    same = evaluate_policy(policy, policy, PROMPTS, embed, reward, {"text_adherence": 1.0}, n_frames=6, temperature=1.0)
    other = evaluate_policy(
        policy, reference, PROMPTS, embed, reward, {"text_adherence": 1.0}, n_frames=6, temperature=1.0
    )
    assert same["kl"] == pytest.approx(0.0, abs=1e-5) and other["kl"] > 0.01
    assert same["reward"] == other["reward"] and same["n_clips"] == 2 * len(PROMPTS)  # the candidate's rollouts, paired
