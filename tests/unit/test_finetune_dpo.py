"""Online DPO on pairs sampled from a tiny generator, judged by a fake listener."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from finetune_helpers import TARGET_TOKEN, TokenFractionReward, embed, one_thread, prompts_for, tiny_generator  # noqa: F401 - fixture

from finetune_worker.configs import dpo_config
from finetune_worker.settings import FinetuneSettings
from finetune_worker.trainers.dpo import DPOPair, OnlineDPOTrainer, pairs_from_buffer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _sampled_pairs(model, n_pairs=48, n_frames=12, temperature=0.99):
    """Pairs as the buffer stores them: both clips sampled by the served policy with their log-probs."""
    prompts = prompts_for(0, 0, n_pairs)
    cond = torch.from_numpy(embed(prompts))
    a, la = model.sample(cond, n_frames, temperature, 0, seeds=list(range(n_pairs)))
    b, lb = model.sample(cond, n_frames, temperature, 0, seeds=list(range(1000, 1000 + n_pairs)))
    pairs = []
    for i in range(n_pairs):
        score_a, score_b = (a[i] == TARGET_TOKEN).sum(), (b[i] == TARGET_TOKEN).sum()
        first = score_a >= score_b
        win, lose = (a, b) if first else (b, a)
        lwin, llose = (la, lb) if first else (lb, la)
        pairs.append(
            DPOPair(prompts[i], win[i].numpy(), lose[i].numpy(), lwin[i].numpy(), llose[i].numpy(), temperature)
        )
    return pairs


def _fraction_of_target(model, n=64):
    prompts = prompts_for(99, 0, n)
    tokens, _ = model.sample(torch.from_numpy(embed(prompts)), 12, 0.99, 0, seeds=list(range(5000, 5000 + n)))
    return float(TokenFractionReward()(prompts, tokens.numpy())["text_adherence"].mean())


def _trainer(pairs, model, steps=30, **overrides):
    settings = FinetuneSettings(
        finetune_trainer="dpo",
        finetune_steps=steps,
        finetune_batch_size=16,
        finetune_dpo_beta=0.5,
        finetune_policy_lr=3e-3,
        finetune_optimizer="adamw",
    )
    config = replace(dpo_config(settings), **overrides)
    return OnlineDPOTrainer(config, model, copy.deepcopy(model), pairs, embed)


def test_first_step_sees_no_margin_because_stored_logprobs_are_the_reference():
    model = tiny_generator()
    trainer = _trainer(_sampled_pairs(model), model, steps=1)
    first = trainer.train().last
    assert abs(first["rewards/margin"]) < 1e-3
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_moves_the_policy_towards_the_preferred_clips():
    model = tiny_generator()
    before = _fraction_of_target(model)
    out = _trainer(_sampled_pairs(model), model, steps=30).train()
    after = _fraction_of_target(model)
    assert after > before + 0.05
    assert out.last["rewards/accuracy"] > 0.7
    assert out.last["kl"] > 0


def test_recomputed_reference_agrees_with_stored_logprobs():
    model = tiny_generator()
    pairs = _sampled_pairs(model)
    stored = _trainer(pairs, model, steps=1).train().last
    recomputed = _trainer(pairs, tiny_generator(), steps=1, use_stored_logprobs=False).train().last
    assert stored["loss"] == pytest.approx(recomputed["loss"], abs=1e-3)


def test_pairs_from_buffer_orders_by_choice_and_skips_ties():
    import pyarrow as pa

    rows = [
        {
            "prompt": "p",
            "choice": c,
            "tokens_a": [1, 2],
            "tokens_b": [3, 4],
            "logprobs_a": [-1.0, -1.0],
            "logprobs_b": [-2.0, -2.0],
            "temperature": 0.99,
            "top_k": 0,
        }
        for c in ("a", "b", "tie")
    ]
    pairs = pairs_from_buffer(pa.Table.from_pylist(rows))
    assert len(pairs) == 2
    assert pairs[0].chosen.tolist() == [1, 2] and pairs[1].chosen.tolist() == [3, 4]
    assert pairs[1].rejected_logprobs.tolist() == [-1.0, -1.0]


def test_no_pairs_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one"):
        _trainer([], tiny_generator())
