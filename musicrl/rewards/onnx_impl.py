"""Reward models backed by ONNX Runtime (what the reward service serves).

One intra-op thread by default (fastest per process on a shared small CPU);
the CUDA provider is used when onnxruntime-gpu is installed and sees a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from musicrl.models.audio_export import META_FILE, ONNX_FILE


def onnx_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


class _OnnxMelModel:
    output = ""

    def __init__(self, directory: Path, version: str | None = None, threads: int = 1) -> None:
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        self.session = onnx_session(directory / ONNX_FILE, threads)
        self.version = version or meta["version"]

    @classmethod
    def load(cls, directory: Path, version: str | None = None, threads: int = 1):
        return cls(directory, version, threads)

    def _run(self, mels: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {"mels": np.ascontiguousarray(mels, dtype=np.float32)})[0]


class OnnxTextAdherence(_OnnxMelModel):
    output = "embedding"

    def __init__(self, directory: Path, version: str | None = None, threads: int = 1) -> None:
        super().__init__(directory, version, threads)
        self.text_dim = int(self.session.get_outputs()[0].shape[1])

    def embed_audio(self, mels: np.ndarray) -> np.ndarray:
        return self._run(mels)


class OnnxQuality(_OnnxMelModel):
    output = "mos"

    def mos(self, mels: np.ndarray) -> np.ndarray:
        return self._run(mels)
