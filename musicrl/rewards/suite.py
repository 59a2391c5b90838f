"""`RewardSuite`: every reward of a batch of clips from one log-mel per clip.

Components: text_adherence (cosine between the prompt's text embedding and the
audio embedding, averaged over 10 s segments), quality_mos (1..5, averaged
over the first and last 20 s) and quality = (mos - 1) / 4, preference
(Bradley-Terry score of (prompt, tokens); audio-only clips are analysed into
tokens with `codec.encode`), and combined = sum of weight * component
(quality normalised), as MusicRL-R (text adherence + quality) and MusicRL-U/RU
combine them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musicrl.audio import codec
from musicrl.audio.features import log_mel
from musicrl.rewards.loader import RewardModels
from musicrl.rewards.windowing import EDGE_WINDOW_S, TEXT_SEGMENT_S, edge_windows, mel_frames, segments

COMPONENTS = ("text_adherence", "quality", "preference")
DEFAULT_WEIGHTS = {"text_adherence": 1.0, "quality": 1.0, "preference": 1.0}
MIN_DURATION_S = 0.25


@dataclass
class Clip:
    prompt: str
    wave: np.ndarray | None = None  # mono float, codec.SAMPLE_RATE
    tokens: np.ndarray | None = None

    def waveform(self) -> np.ndarray:
        if self.wave is not None:
            wave = np.asarray(self.wave, dtype=np.float32)
            if wave.ndim != 1 or not np.all(np.isfinite(wave)):
                raise ValueError("audio must be a finite mono waveform")
            return wave
        if self.tokens is None:
            raise ValueError("a clip needs audio or tokens")
        return codec.decode(np.asarray(self.tokens))

    def token_ids(self, wave: np.ndarray) -> np.ndarray:
        return codec.encode(wave, codec.SAMPLE_RATE) if self.tokens is None else np.asarray(self.tokens, dtype=np.int64)


def _window_means(mels: list[np.ndarray], ranges: list[list[tuple[int, int]]], model_fn) -> list[np.ndarray]:
    """Run `model_fn` once per window length over every window of every clip; per-clip rows of outputs."""
    by_length: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for clip, clip_ranges in enumerate(ranges):
        for start, end in clip_ranges:
            by_length[end - start].append((clip, start, end))
    outputs: list[list[np.ndarray]] = [[] for _ in mels]
    for windows in by_length.values():
        batch = np.stack([mels[clip][:, start:end] for clip, start, end in windows])
        for (clip, _, _), row in zip(windows, model_fn(batch), strict=True):
            outputs[clip].append(row)
    return [np.stack(rows) for rows in outputs]


class RewardSuite:
    def __init__(self, models: RewardModels, weights: dict[str, float] | None = None) -> None:
        self.models = models
        self.weights = DEFAULT_WEIGHTS | (weights or {})

    @property
    def versions(self) -> dict[str, str]:
        return self.models.versions

    def available(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if c != "preference" or self.models.preference is not None)

    def score(self, clips: Sequence[Clip], components: Sequence[str] | None = None,
              weights: dict[str, float] | None = None) -> list[dict]:
        components = tuple(components or self.available())
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown reward components {sorted(unknown)}; choose from {COMPONENTS}")
        if "preference" in components and self.models.preference is None:
            raise ValueError("no preference model is loaded")
        weights = self.weights | (weights or {})
        waves = [clip.waveform() for clip in clips]
        for wave in waves:
            if len(wave) < MIN_DURATION_S * codec.SAMPLE_RATE:
                raise ValueError(f"clip shorter than {MIN_DURATION_S} s cannot be scored")
        results: list[dict] = [{c: None for c in ("text_adherence", "quality_mos", "quality", "preference")} for _ in clips]
        if not clips:
            return results
        prompts = sorted({clip.prompt for clip in clips})
        text = dict(zip(prompts, self.models.text_encoder.embed(prompts), strict=True))
        cond = np.stack([text[clip.prompt] for clip in clips])
        mels = [log_mel(wave) for wave in waves] if {"text_adherence", "quality"} & set(components) else []

        if "text_adherence" in components:
            ranges = [segments(m.shape[1], mel_frames(TEXT_SEGMENT_S)) for m in mels]
            embeddings = _window_means(mels, ranges, self.models.text_adherence.embed_audio)
            for i, rows in enumerate(embeddings):
                results[i]["text_adherence"] = float(np.mean(rows @ cond[i]))
        if "quality" in components:
            ranges = [edge_windows(m.shape[1], mel_frames(EDGE_WINDOW_S)) for m in mels]
            for i, rows in enumerate(_window_means(mels, ranges, self.models.quality.mos)):
                mos = float(np.mean(rows))
                results[i]["quality_mos"], results[i]["quality"] = mos, (mos - 1.0) / 4.0
        if "preference" in components:
            tokens = [clip.token_ids(wave) for clip, wave in zip(clips, waves, strict=True)]
            for i, score in enumerate(self.models.preference.score(cond, tokens)):
                results[i]["preference"] = float(score)
        for result in results:
            result["combined"] = float(sum(weights[c] * result[c] for c in components))
        return results
