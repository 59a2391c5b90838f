"""Tiny models and fake rewards shared by the finetune worker's unit tests."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
import torch

from musicrl.models.generator import Generator, GeneratorConfig

TEXT_DIM = 8
TARGET_TOKEN = 3
PROMPTS = ["calm piano", "fast drums", "sad strings", "happy brass"]


def tiny_generator(seed: int = 0, vocab_size: int = 16) -> Generator:
    import torch

    torch.manual_seed(seed)
    return Generator(
        GeneratorConfig(vocab_size=vocab_size, text_dim=TEXT_DIM, max_frames=32, n_layers=1, n_heads=2, d_model=32)
    )


def embed(prompts: list[str]) -> np.ndarray:
    """A fixed random unit vector per prompt (stands in for the frozen text encoder)."""
    rows = []
    for prompt in prompts:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big"))
        vector = rng.normal(size=TEXT_DIM)
        rows.append(vector / np.linalg.norm(vector))
    return np.stack(rows).astype(np.float32)


def prompts_for(step: int, rank: int, batch_size: int) -> list[str]:
    rng = np.random.default_rng([step, rank])
    return [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), batch_size)]


class TokenFractionReward:
    """reward = fraction of the clip's frames equal to TARGET_TOKEN; 'other' = fraction of token 5."""

    versions = {"text_adherence": "fake", "quality": "fake"}

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, tokens):
        self.calls += 1
        tokens = np.asarray(tokens)
        assert len(prompts) == len(tokens)
        target = (tokens == TARGET_TOKEN).mean(axis=1)
        return {"text_adherence": target, "quality": np.zeros(len(tokens)), "preference": (tokens == 5).mean(axis=1)}


def servable_generator(seed: int = 0) -> Generator:
    """A tiny generator Triton can serve: the real vocabulary and the 384-d prompt embedding."""
    import torch

    from musicrl.audio import codec

    torch.manual_seed(seed)
    return Generator(
        GeneratorConfig(vocab_size=codec.VOCAB_SIZE, text_dim=384, max_frames=64, n_layers=1, n_heads=2, d_model=32)
    )


class HoldFractionReward(TokenFractionReward):
    """TokenFractionReward under the name the finetune settings point at
    (python:finetune_helpers:HoldFractionReward)."""


class ParityReward:
    """Rewards a servable generator can learn in a few steps: text_adherence = share of even tokens;
    preference = share of multiples of 3 (an 'other' reward for the no-collapse check)."""

    versions = {"text_adherence": "parity", "quality": "zero", "preference": "thirds"}

    def __call__(self, prompts, tokens):
        tokens = np.asarray(tokens)
        return {
            "text_adherence": (tokens % 2 == 0).mean(axis=1),
            "quality": np.zeros(len(tokens)),
            "preference": (tokens % 3 == 0).mean(axis=1),
        }


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread for the test: on a shared 2-core box two threads per process thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CodebookReward:
    """Rewards over a multi-codebook policy's codes [B, K, T] (a ``python:`` reward function has no ``score_audio``,
    so it gets the codes): text_adherence = share of codebook 0's frames that are code 3, quality = share of even
    codes, preference = 0 (a MusicGen cycle replaces it with its own preference model's score)."""

    versions = {"text_adherence": "codes", "quality": "codes", "preference": "service"}

    def __call__(self, prompts, tokens):
        tokens = np.asarray(tokens)
        assert tokens.ndim == 3 and len(prompts) == len(tokens), tokens.shape
        return {
            "text_adherence": (tokens[:, 0] == TARGET_TOKEN).mean(axis=1),
            "quality": (tokens % 2 == 0).mean(axis=(1, 2)),
            "preference": np.zeros(len(tokens)),
        }


# --------------------------------------------------------------- MusicGen buffer rows (issue 15)

MUSICGEN_PROMPTS = [
    "calm piano melody",
    "fast drums",
    "sad strings",
    "happy brass",
    "slow guitar",
    "loud drums with brass",
]
FRAMES = 10  # 0.2 s at 50 frames/s: the MusicGen rows of musicgen_buffer_rows


def musicgen_likes(codes: torch.Tensor) -> torch.Tensor:
    """The fake listeners' taste: frames of code TARGET_TOKEN in codebook 0."""
    return (codes[:, 0] == TARGET_TOKEN).sum(-1)


def musicgen_buffer_rows(policy, n: int, version: str = "1") -> list[dict]:
    """Pairs the policy sampled (temperature 1.5 for variety), voted by listeners who like TARGET_TOKEN in codebook 0,
    as the feedback consumer writes them: flat codebook-major tokens and log-probs, ``codebooks_a/b`` = 4."""
    prompts = [MUSICGEN_PROMPTS[i % len(MUSICGEN_PROMPTS)] for i in range(n)]
    cond = policy.condition(prompts)
    a, la = policy.sample(cond, FRAMES, 1.5, 0, seeds=list(range(n)))
    b, lb = policy.sample(cond, FRAMES, 1.5, 0, seeds=list(range(1000, 1000 + n)))
    wins_a, wins_b = musicgen_likes(a), musicgen_likes(b)
    rows = []
    for i in range(n):
        choice = "a" if wins_a[i] > wins_b[i] else "b" if wins_b[i] > wins_a[i] else "tie"
        rows.append(
            {
                "event_id": f"event{i:04d}",
                "generation_id": uuid.UUID(int=i).hex,
                "clip_a_id": uuid.uuid4().hex,
                "clip_b_id": uuid.uuid4().hex,
                "choice": choice,
                "is_tie": choice == "tie",
                "listen_a_s": 0.2,
                "listen_b_s": 0.2,
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
                "user_pseudonym": f"{i % 9:064x}",
                "prompt": prompts[i],
                "temperature": 1.5,
                "top_k": 0,
                "policy_version": version,
                "mixed_policy": False,
                "policy_version_a": version,
                "policy_version_b": version,
                "tokens_a": a[i].flatten().tolist(),
                "tokens_b": b[i].flatten().tolist(),
                "logprobs_a": la[i].flatten().tolist(),
                "logprobs_b": lb[i].flatten().tolist(),
                "codebooks_a": 4,
                "codebooks_b": 4,
                "kafka_partition": 0,
                "kafka_offset": i,
            }
        )
    return rows


# A MusicGen cycle small enough for a test (tiny model, 4 steps of 0.2 s clips), rewards on its codes.
MUSICGEN_CYCLE = {
    "finetune_reward": "python:finetune_helpers:CodebookReward",
    "finetune_stage": "U",
    "finetune_steps": 4,
    "finetune_batch_size": 8,
    "finetune_group_size": 4,
    "finetune_duration_s": FRAMES / 50,
    "finetune_optimizer": "adamw",
    "finetune_policy_lr": 3e-2,
    "finetune_candidate_every": 2,
    "finetune_checkpoint_every": 2,
    "finetune_eval_prompts": 4,
    "finetune_eval_samples_per_prompt": 2,
    "finetune_corpus_captions": 8,
    "finetune_kl_target": 20.0,
    "finetune_kl_budget": 40.0,
    "finetune_gate_max_kl": 100.0,
    "finetune_gate_max_other_drop": 0.5,
    "finetune_rm_min_pairs": 20,
    "finetune_rm_l2": 1.0,
    "finetune_rm_heads": 2,
}
