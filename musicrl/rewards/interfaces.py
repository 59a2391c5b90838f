"""The reward-model interfaces. Anything with these methods can be served: the default small
models (torch or ONNX Runtime), the tiny stand-ins, or a real pretrained model (CLAP, a MOS
predictor) wrapped to the same shape.

Text adherence has two shapes. The default model is only an audio tower trained into the space of
the frozen text encoder (`musicrl.text`), so it reads the shared log-mel (`TextAdherenceModel`).
A pretrained text-audio model such as CLAP brings its own text tower and its own front end at its
own sample rate, so it is handed waveforms and prompts (`AudioTextModel`). The suite does the
windowing and the cosine for both, so the reward means the same thing whichever is configured."""

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
class AudioTextModel(Protocol):
    """A text-audio embedding model with both towers (CLAP, MuLan): prompts and waveforms into one space."""

    version: str
    sample_rate: int  # the rate `embed_waves` expects; the suite resamples to it

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """n prompts -> L2-normalised embeddings (n, dim) float32."""
        ...

    def embed_waves(self, waves: np.ndarray) -> np.ndarray:
        """Mono waveforms (n, samples) float32 at `sample_rate`, at most one 10 s window each ->
        L2-normalised embeddings (n, dim) float32."""
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
