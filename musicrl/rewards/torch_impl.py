"""Reward models backed by the torch modules (what training and evaluation use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musicrl.models.audio_export import load_torch_model


class TorchTextAdherence:
    def __init__(self, model: torch.nn.Module, version: str) -> None:
        self.model, self.version = model.eval(), version
        self.text_dim = model.config.out_dim

    @classmethod
    def load(cls, directory: Path, version: str | None = None) -> TorchTextAdherence:
        model, meta = load_torch_model(directory, "text_adherence")
        return cls(model, version or meta["version"])

    @torch.no_grad()
    def embed_audio(self, mels: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.asarray(mels, dtype=np.float32))).numpy()


class TorchQuality:
    def __init__(self, model: torch.nn.Module, version: str) -> None:
        self.model, self.version = model.eval(), version

    @classmethod
    def load(cls, directory: Path, version: str | None = None) -> TorchQuality:
        model, meta = load_torch_model(directory, "quality")
        return cls(model, version or meta["version"])

    @torch.no_grad()
    def mos(self, mels: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.asarray(mels, dtype=np.float32))).numpy()
