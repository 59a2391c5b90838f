"""`RewardSuite`: every reward of a batch of clips from one log-mel per clip.

Components: text_adherence (cosine between the prompt's text embedding and the
audio embedding, averaged over 10 s segments; the raw cosine in [-1, 1], for
the default model and for CLAP alike), quality_mos (1..5, averaged
over the first and last 20 s) and quality = (mos - 1) / 4, preference
(Bradley-Terry score of (prompt, tokens); audio-only clips are analysed into
tokens with `codec.encode`), and combined = sum of weight * component
(quality normalised), as MusicRL-R (text adherence + quality) and MusicRL-U/RU
combine them.

Clips may come at any sample rate: the log-mel models get 16 kHz (the codec's
rate), an `AudioTextModel` (CLAP) its own rate, each resampled from the clip as
given, so a 32 kHz MusicGen clip reaches CLAP at full bandwidth.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musicrl.audio import codec
from musicrl.audio.features import log_mel, resample
from musicrl.rewards.interfaces import AudioTextModel
from musicrl.rewards.loader import RewardModels
from musicrl.rewards.windowing import EDGE_WINDOW_S, TEXT_SEGMENT_S, edge_windows, mel_frames, segments

COMPONENTS = ("text_adherence", "quality", "preference")
DEFAULT_WEIGHTS = {"text_adherence": 1.0, "quality": 1.0, "preference": 1.0}
MIN_DURATION_S = 0.25


@dataclass
class Clip:
    prompt: str
    wave: np.ndarray | None = None  # mono float at sample_rate
    tokens: np.ndarray | None = None
    sample_rate: int = codec.SAMPLE_RATE  # of wave (tokens decode at codec.SAMPLE_RATE)

    def audio(self) -> tuple[np.ndarray, int]:
        """The waveform and its sample rate."""
        if self.wave is not None:
            wave = np.asarray(self.wave, dtype=np.float32)
            if wave.ndim != 1 or not np.all(np.isfinite(wave)):
                raise ValueError("audio must be a finite mono waveform")
            return wave, int(self.sample_rate)
        if self.tokens is None:
            raise ValueError("a clip needs audio or tokens")
        return codec.decode(np.asarray(self.tokens)), codec.SAMPLE_RATE

    def token_ids(self, wave: np.ndarray) -> np.ndarray:
        return codec.encode(wave, codec.SAMPLE_RATE) if self.tokens is None else np.asarray(self.tokens, dtype=np.int64)


def _window_means(arrays: list[np.ndarray], ranges: list[list[tuple[int, int]]], model_fn) -> list[np.ndarray]:
    """Run `model_fn` once per window length over every window of every clip; per-clip rows of outputs.

    Windows are cut along the last axis: frames of a log-mel, samples of a waveform."""
    by_length: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for clip, clip_ranges in enumerate(ranges):
        for start, end in clip_ranges:
            by_length[end - start].append((clip, start, end))
    outputs: list[list[np.ndarray]] = [[] for _ in arrays]
    for windows in by_length.values():
        batch = np.stack([arrays[clip][..., start:end] for clip, start, end in windows])
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

    def score(
        self, clips: Sequence[Clip], components: Sequence[str] | None = None, weights: dict[str, float] | None = None
    ) -> list[dict]:
        components = tuple(components or self.available())
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown reward components {sorted(unknown)}; choose from {COMPONENTS}")
        if "preference" in components and self.models.preference is None:
            raise ValueError("no preference model is loaded")
        weights = self.weights | (weights or {})
        native = [clip.audio() for clip in clips]
        for wave, rate in native:
            if len(wave) < MIN_DURATION_S * rate:
                raise ValueError(f"clip shorter than {MIN_DURATION_S} s cannot be scored")
        waves = [resample(wave, rate, codec.SAMPLE_RATE) for wave, rate in native]
        results: list[dict] = [
            {c: None for c in ("text_adherence", "quality_mos", "quality", "preference")} for _ in clips
        ]
        if not clips:
            return results
        audio_text = isinstance(self.models.text_adherence, AudioTextModel)
        # The frozen text encoder's prompt embeddings: the text side of the default text-adherence
        # model and the preference model's condition (CLAP embeds prompts with its own tower).
        cond_components = {"preference"} if audio_text else {"text_adherence", "preference"}
        if cond_components & set(components):
            prompts = sorted({clip.prompt for clip in clips})
            text = dict(zip(prompts, self.models.text_encoder.embed(prompts), strict=True))
            cond = np.stack([text[clip.prompt] for clip in clips])
        mel_components = {"quality"} if audio_text else {"text_adherence", "quality"}
        mels = [log_mel(wave) for wave in waves] if mel_components & set(components) else []

        if "text_adherence" in components:
            if audio_text:
                cosines = self._audio_text_cosines(clips, native)
            else:
                ranges = [segments(m.shape[1], mel_frames(TEXT_SEGMENT_S)) for m in mels]
                embeddings = _window_means(mels, ranges, self.models.text_adherence.embed_audio)
                cosines = [rows @ cond[i] for i, rows in enumerate(embeddings)]
            for i, values in enumerate(cosines):
                results[i]["text_adherence"] = float(np.mean(values))
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

    def _audio_text_cosines(self, clips: Sequence[Clip], native: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Per clip, the cosine of each 10 s window with the prompt, both embedded by the model's own towers."""
        model = self.models.text_adherence
        prompts = sorted({clip.prompt for clip in clips})
        text = dict(zip(prompts, model.embed_text(prompts), strict=True))
        waves = [resample(wave, rate, model.sample_rate) for wave, rate in native]
        ranges = [segments(len(wave), int(TEXT_SEGMENT_S * model.sample_rate)) for wave in waves]
        embeddings = _window_means(waves, ranges, model.embed_waves)
        return [rows @ text[clip.prompt] for clip, rows in zip(clips, embeddings, strict=True)]
