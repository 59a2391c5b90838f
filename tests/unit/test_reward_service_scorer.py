"""One micro-batch through RewardSuite: mixed components, prompt cache."""

from __future__ import annotations

import numpy as np
import pytest

from musicrl.audio import codec
from musicrl.rewards.tiny import TinyPreference, TinyQuality, TinyTextAdherence
from musicrl.text import HashingTextEncoder
from reward_service.services.inputs import Clip
from reward_service.services.models import ModelSnapshot
from reward_service.services.scorer import CachedTextEncoder, Task, score_batch

pytestmark = pytest.mark.unit

SNAPSHOT = ModelSnapshot(
    {"text_adherence": TinyTextAdherence(), "quality": TinyQuality(), "preference": TinyPreference()},
    {"text_adherence": "1", "quality": "1", "preference": "1"},
)


def clip(seed: int, with_tokens: bool) -> Clip:
    tokens = np.random.default_rng(seed).integers(codec.NOTE_OFFSET, codec.VOCAB_SIZE, codec.frames_for(3.0))
    return Clip(f"prompt {seed % 2}", codec.decode(tokens), tokens if with_tokens else None)


def test_a_batch_mixing_components_scores_each_task_with_its_own(monkeypatch):
    def no_analysis(*_):
        raise AssertionError("a clip that did not ask for the preference model was analysed into tokens")

    monkeypatch.setattr(codec, "encode", no_analysis)
    tasks = [
        Task(clip(1, with_tokens=False), ("quality",)),
        Task(clip(2, with_tokens=True), ("text_adherence", "quality", "preference")),
        Task(clip(3, with_tokens=False), ("text_adherence",)),
    ]
    results = score_batch(SNAPSHOT, tasks, text_encoder=CachedTextEncoder(HashingTextEncoder()))
    assert set(results[0]) == {"quality_mos"}
    assert set(results[1]) == {"text_adherence", "quality_mos", "preference"}
    assert set(results[2]) == {"text_adherence"}
    alone = score_batch(SNAPSHOT, tasks[1:2], text_encoder=CachedTextEncoder(HashingTextEncoder()))
    assert alone[0] == pytest.approx(results[1], rel=1e-6)


def test_prompt_embeddings_are_cached_and_evicted_least_recently_used():
    calls: list[list[str]] = []

    class Counting(HashingTextEncoder):
        def embed(self, texts):
            calls.append(list(texts))
            return super().embed(texts)

    cache = CachedTextEncoder(Counting(), size=2)
    first = cache.embed(["a", "b", "a"])
    assert calls == [["a", "b"]] and np.allclose(first[0], first[2])
    cache.embed(["a"])  # "b" is now the least recently used
    cache.embed(["c"])
    cache.embed(["a", "b"])
    assert calls == [["a", "b"], ["c"], ["b"]]
