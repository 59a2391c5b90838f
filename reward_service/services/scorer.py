"""Score one micro-batch of clips with the reward models of one snapshot.

Per batch: every distinct prompt is embedded once, every clip's log-mel
spectrogram is computed once and shared by the text-adherence and quality
models, and each model runs once per window shape over the windows of all
clips in the batch. That last point is what micro-batching buys.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from musicrl.schemas.scores import Component
from reward_service.services.inputs import Clip
from reward_service.services.models import ModelSnapshot

Window = tuple[int, int]  # [start, stop) along the time axis
Windows = Callable[[int], list[Window]]


@dataclass(frozen=True, eq=False)
class Task:
    clip: Clip
    components: tuple[Component, ...]


@dataclass(frozen=True)
class Windowing:
    """Window layouts, in mel frames and token frames (from musicrl.rewards)."""

    text_adherence: Windows  # 10 s segments of the mel frames
    quality: Windows  # first and last 20 s of the mel frames
    preference: Windows  # first and last 20 s of the tokens


class PromptCache:
    """Prompt embeddings by text: finetuning rollouts repeat a few prompts many times."""

    def __init__(self, embed: Callable[[list[str]], np.ndarray], size: int = 4096):
        self.embed = embed
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            for prompt, vector in zip(missing, np.asarray(self.embed(missing), dtype=np.float32)):
                self._cache[prompt] = vector
        rows = []
        for prompt in prompts:
            self._cache.move_to_end(prompt)
            rows.append(self._cache[prompt])
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return np.stack(rows)


def _run_windowed(
    series: Sequence[np.ndarray | None],
    windows: Windows,
    model: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rows: np.ndarray,
) -> list[np.ndarray | None]:
    """Cut each clip's series (time on the last axis) into windows, run ``model``
    once per window shape over the windows of every clip, and return each clip's
    per-window outputs. ``rows[i]`` is passed along with each of clip i's windows."""
    groups: dict[tuple[int, ...], list[tuple[int, int, np.ndarray]]] = defaultdict(list)
    counts: list[int] = []
    for i, x in enumerate(series):
        if x is None:
            counts.append(0)
            continue
        spans = windows(x.shape[-1])
        counts.append(len(spans))
        for w, (start, stop) in enumerate(spans):
            piece = x[..., start:stop]
            groups[piece.shape].append((i, w, piece))
    outputs: list[list] = [[None] * n for n in counts]
    for members in groups.values():
        batch = np.stack([piece for _, _, piece in members])
        result = np.asarray(model(batch, rows[[i for i, _, _ in members]]))
        for (i, w, _), value in zip(members, result):
            outputs[i][w] = value
    return [np.stack(o) if o else None for o in outputs]


def score_batch(
    snapshot: ModelSnapshot,
    tasks: Sequence[Task],
    *,
    prompt_embeddings: Callable[[Sequence[str]], np.ndarray],
    log_mel: Callable[[np.ndarray], np.ndarray],
    windowing: Windowing,
) -> list[dict[Component, float]]:
    wanted = [set(t.components) for t in tasks]
    needs = lambda c: [c in w for w in wanted]  # noqa: E731
    results: list[dict[Component, float]] = [{} for _ in tasks]
    text = prompt_embeddings([t.clip.prompt for t in tasks])

    need_mel = [("text_adherence" in w) or ("quality" in w) for w in wanted]
    mels = [log_mel(t.clip.wave) if need else None for t, need in zip(tasks, need_mel)]

    if any(needs("text_adherence")):
        model = snapshot.models["text_adherence"]
        series = [m if n else None for m, n in zip(mels, needs("text_adherence"))]

        def cosine(windows: np.ndarray, prompt_rows: np.ndarray) -> np.ndarray:
            audio = np.asarray(model.embed_audio(windows), dtype=np.float32)
            audio = audio / np.maximum(np.linalg.norm(audio, axis=1, keepdims=True), 1e-12)
            return np.sum(audio * prompt_rows, axis=1)

        for i, values in enumerate(_run_windowed(series, windowing.text_adherence, cosine, text)):
            if values is not None:
                results[i]["text_adherence"] = float(np.mean(values))

    if any(needs("quality")):
        model = snapshot.models["quality"]
        series = [m if n else None for m, n in zip(mels, needs("quality"))]
        mos = lambda windows, _rows: model.mos(windows)  # noqa: E731
        for i, values in enumerate(_run_windowed(series, windowing.quality, mos, text)):
            if values is not None:
                results[i]["quality_mos"] = float(np.mean(values))

    if any(needs("preference")):
        model = snapshot.models["preference"]
        series = [t.clip.tokens if n else None for t, n in zip(tasks, needs("preference"))]
        if any(n and s is None for s, n in zip(series, needs("preference"))):
            raise ValueError("the preference model needs tokens for every clip it scores")
        bt = lambda windows, rows: model.score(rows, windows)  # noqa: E731
        for i, values in enumerate(_run_windowed(series, windowing.preference, bt, text)):
            if values is not None:
                results[i]["preference"] = float(np.mean(values))
    return results
