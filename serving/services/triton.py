"""The gateway's client of the Triton model ``generator`` (gRPC, asyncio).

One candidate is one inference request: concurrent candidates (of one request
or of many) reach Triton concurrently and its dynamic batcher groups them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.errors import UpstreamFailed, UpstreamUnavailable
from serving.metrics import TRITON_SECONDS, UPSTREAM_ERRORS

# gRPC status codes that mean "try again later" rather than "this request is wrong".
RETRYABLE_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED")


@dataclass
class Candidate:
    tokens: np.ndarray  # int64 [T]
    logprobs: np.ndarray  # float32 [T]
    audio: np.ndarray  # float32 [samples]
    sample_rate: int
    policy_version: str
    model_name: str


class GeneratorClient(Protocol):
    async def generate(
        self, model_name: str, embedding: np.ndarray, seed: int, n_frames: int, temperature: float, top_k: int
    ) -> Candidate: ...

    async def is_ready(self, model_name: str) -> bool: ...

    async def close(self) -> None: ...


class TritonGeneratorClient:
    def __init__(self, url: str, timeout_s: float):
        from tritonclient.grpc import aio as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout_s = timeout_s

    async def generate(
        self, model_name: str, embedding: np.ndarray, seed: int, n_frames: int, temperature: float, top_k: int
    ) -> Candidate:
        from tritonclient.utils import InferenceServerException

        inputs = [
            self._input("PROMPT_EMBEDDING", np.asarray(embedding, dtype=np.float32).reshape(1, -1), "FP32"),
            self._input("SEED", np.array([[seed]], dtype=np.int64), "INT64"),
            self._input("N_FRAMES", np.array([[n_frames]], dtype=np.int32), "INT32"),
            self._input("TEMPERATURE", np.array([[temperature]], dtype=np.float32), "FP32"),
            self._input("TOP_K", np.array([[top_k]], dtype=np.int32), "INT32"),
        ]
        start = time.perf_counter()
        outcome = "ok"
        try:
            result = await self.client.infer(model_name, inputs, client_timeout=self.timeout_s)
        except InferenceServerException as err:
            status = str(err.status() or "")
            retryable = any(code in status for code in RETRYABLE_STATUSES) or "unknown model" in str(err)
            outcome = "unavailable" if retryable else "error"
            UPSTREAM_ERRORS.labels("triton").inc()
            if retryable:
                raise UpstreamUnavailable("triton", f"{model_name}: {err.message() or status}") from err
            raise UpstreamFailed(f"triton {model_name}: {err.message() or status}") from err
        except OSError as err:  # resolver or socket failures before gRPC has a status
            outcome = "unavailable"
            UPSTREAM_ERRORS.labels("triton").inc()
            raise UpstreamUnavailable("triton", str(err)) from err
        finally:
            TRITON_SECONDS.labels(model_name, outcome).observe(time.perf_counter() - start)
        return Candidate(
            tokens=result.as_numpy("TOKENS")[0],
            logprobs=result.as_numpy("LOGPROBS")[0],
            audio=result.as_numpy("AUDIO")[0],
            sample_rate=int(result.as_numpy("SAMPLE_RATE")[0, 0]),
            policy_version=_as_text(result.as_numpy("POLICY_VERSION")[0, 0]),
            model_name=model_name,
        )

    async def is_ready(self, model_name: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self.client.is_model_ready(model_name, client_timeout=min(self.timeout_s, 5.0)))
        except (InferenceServerException, OSError):
            return False

    async def close(self) -> None:
        await self.client.close()

    def _input(self, name: str, array: np.ndarray, datatype: str):
        tensor = self._grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
