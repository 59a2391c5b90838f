"""Deliberately tiny reward models with no trained weights: they prove the seams.

They follow the interfaces and react to the audio in a sensible direction, but
they are not good reward models; the loader plugs them in with impl="tiny".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from musicrl.audio import codec
from musicrl.audio.features import LOG_FLOOR, N_MELS


class TinyTextAdherence:
    """Mean and spread of each mel band, through a fixed random projection into the text space."""

    version = "tiny-1"

    def __init__(self, text_dim: int = 384, seed: int = 0) -> None:
        self.text_dim = text_dim
        self.projection = np.random.default_rng(seed).standard_normal((2 * N_MELS, text_dim)).astype(np.float32)

    def embed_audio(self, mels: np.ndarray) -> np.ndarray:
        mels = np.asarray(mels, dtype=np.float32)
        stats = np.concatenate([mels.mean(axis=2), mels.std(axis=2)], axis=1)
        embedding = (stats - stats.mean(axis=1, keepdims=True)) @ self.projection
        return embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)


class TinyQuality:
    """MOS falls with the spectral flatness of the sounding frames: noise is flat, notes are peaky."""

    version = "tiny-1"

    def mos(self, mels: np.ndarray) -> np.ndarray:
        mels = np.asarray(mels, dtype=np.float32)
        flatness = np.exp(mels.mean(axis=1) - np.log(np.exp(mels).mean(axis=1) + 1e-12))  # per frame, 0..1
        sounding = mels.max(axis=1) > np.log(LOG_FLOOR) + 3
        mean_flatness = (flatness * sounding).sum(axis=1) / np.maximum(sounding.sum(axis=1), 1)
        return np.clip(5.0 - 4.0 * mean_flatness, 1.0, 5.0).astype(np.float32)


class TinyPreference:
    """Prefers clips with fewer glitch tokens and more distinct notes; ignores the caption."""

    version = "tiny-1"

    def score(self, cond: np.ndarray, tokens: Sequence[np.ndarray]) -> np.ndarray:
        if len(cond) != len(tokens):
            raise ValueError(f"cond has {len(cond)} rows for {len(tokens)} clips")
        scores = []
        for clip in tokens:
            clip = np.asarray(clip, dtype=np.int64)
            if clip.size == 0:
                scores.append(0.0)
                continue
            glitches = np.isin(clip, codec.GLITCH_TOKENS).mean()
            variety = len(np.unique(clip[clip >= codec.NOTE_OFFSET])) / max(1, len(clip))
            scores.append(variety - 5.0 * glitches)
        return np.asarray(scores, dtype=np.float32)
