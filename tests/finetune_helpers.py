"""Tiny models and fake rewards shared by the finetune worker's unit tests."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from musicrl.models.generator import Generator, GeneratorConfig

TEXT_DIM = 8
TARGET_TOKEN = 3
PROMPTS = ["calm piano", "fast drums", "sad strings", "happy brass"]


def tiny_generator(seed: int = 0, vocab_size: int = 16) -> Generator:
    import torch

    torch.manual_seed(seed)
    return Generator(GeneratorConfig(vocab_size=vocab_size, text_dim=TEXT_DIM, max_frames=32, n_layers=1, n_heads=2, d_model=32))


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
    return Generator(GeneratorConfig(vocab_size=codec.VOCAB_SIZE, text_dim=384, max_frames=64, n_layers=1, n_heads=2, d_model=32))


class HoldFractionReward(TokenFractionReward):
    """TokenFractionReward under the name the finetune settings point at (python:finetune_helpers:HoldFractionReward)."""


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
