"""The reward-model interfaces. Anything with these methods can be served: the default small
models (torch or ONNX Runtime), the tiny stand-ins, or a real pretrained model (CLAP, a MOS
predictor) wrapped to the same shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextAdherenceModel(Protocol):
    """Audio tower of a text-audio embedding model whose text tower is the frozen text encoder."""

    version: str
    text_dim: int

    def embed_audio(self, mels: np.ndarray) -> np.ndarray:
        """log-mels (n, n_mels, frames) float32 -> L2-normalised embeddings (n, text_dim) float32."""
        ...


@runtime_checkable
class QualityModel(Protocol):
    version: str

    def mos(self, mels: np.ndarray) -> np.ndarray:
        """log-mels (n, n_mels, frames) float32 -> mean opinion scores (n,) in [1, 5]."""
        ...


@runtime_checkable
class PreferenceModel(Protocol):
    """Bradley-Terry user-preference reward over (caption embedding, clip tokens)."""

    version: str

    def score(self, cond: np.ndarray, tokens: Sequence[np.ndarray]) -> np.ndarray:
        """cond (n, text_dim) float32 and n token sequences -> scores (n,) (higher is preferred)."""
        ...
