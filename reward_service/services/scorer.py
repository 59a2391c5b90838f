"""Score one micro-batch of clips with the reward models of one snapshot.

The work itself is ``musicrl.rewards.RewardSuite``: one log-mel per clip shared
by the text-adherence and quality models, every window of every clip of the
batch through each model in one call per window length, the windowing the
models were trained with. This module adds what serving needs around it:
clips asking for different components are scored in groups (so a clip that
did not ask for the preference model is never analysed into tokens), and
prompt embeddings are cached across batches (finetuning repeats prompts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musicrl.rewards import Clip as SuiteClip
from musicrl.rewards import RewardModels, RewardSuite
from musicrl.schemas.scores import Component
from musicrl.text import TextEncoder
from reward_service.services.inputs import Clip
from reward_service.services.models import ModelSnapshot

RAW_FIELDS = ("text_adherence", "quality_mos", "preference")


@dataclass(frozen=True, eq=False)
class Task:
    clip: Clip
    components: tuple[Component, ...]


class CachedTextEncoder:
    """A text encoder with an LRU cache of prompt embeddings (used by the batch thread only)."""

    def __init__(self, encoder: TextEncoder, size: int = 4096):
        self.encoder = encoder
        self.name = encoder.name
        self.dim = encoder.dim
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, vector in zip(missing, np.asarray(self.encoder.embed(missing), dtype=np.float32)):
                self._cache[text] = vector
        rows = []
        for text in texts:
            self._cache.move_to_end(text)
            rows.append(self._cache[text])
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)


def score_batch(snapshot: ModelSnapshot, tasks: Sequence[Task], *, text_encoder: TextEncoder) -> list[dict[str, float]]:
    """Raw rewards (text_adherence, quality_mos, preference) of each task's requested components."""
    suite = RewardSuite(
        RewardModels(
            text_adherence=snapshot.models["text_adherence"],
            quality=snapshot.models["quality"],
            preference=snapshot.models.get("preference"),
            text_encoder=text_encoder,
        )
    )
    results: list[dict[str, float]] = [{} for _ in tasks]
    groups: dict[tuple[Component, ...], list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task.components, []).append(i)
    for components, indices in groups.items():
        clips = [
            SuiteClip(
                tasks[i].clip.prompt,
                wave=tasks[i].clip.wave,
                tokens=tasks[i].clip.tokens,
                sample_rate=tasks[i].clip.sample_rate,
            )
            for i in indices
        ]
        for i, scores in zip(indices, suite.score(clips, components)):
            results[i] = {name: float(scores[name]) for name in RAW_FIELDS if scores[name] is not None}
    return results
