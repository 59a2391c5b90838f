"""The gateway's client of the Triton model ``generator`` (gRPC, asyncio).

One candidate is one inference request: concurrent candidates (of one request
or of many) reach Triton concurrently and its dynamic batcher groups them.

What a model needs is learnt from Triton itself, never configured a second time
(``ModelSpec``, cached per model name): its metadata says which prompt input it
declares (``PROMPT_EMBEDDING``: the default generator, embedded by the gateway;
``PROMPT``: the text, for MusicGen), and one probe inference of a single frame says
its sample rate, codebooks and frame rate (``SAMPLE_RATE / len(AUDIO)``: 8/s for the
default codec, 50/s for MusicGen). Metadata and inference are what a restricted
Triton allows the gateway (docs/deploy.md); the model-config API is not needed.
A model whose longest clip is exceeded answers with the backend's ``N_FRAMES must be
in [1, M]``, which becomes ``FramesOutOfRange`` (the gateway's 422).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from serving.errors import UpstreamFailed, UpstreamUnavailable
from serving.metrics import TRITON_SECONDS, UPSTREAM_ERRORS

# gRPC status codes that mean "try again later" rather than "this request is wrong".
RETRYABLE_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED")


# The Triton backend's refusal of a clip longer than the policy's (serving/model_repository/generator/model.py).
FRAMES_OUT_OF_RANGE = re.compile(r"N_FRAMES must be in \[1, (\d+)\]")


@dataclass
class Candidate:
    tokens: np.ndarray  # int64 [T] (one codebook) or [K, T]
    logprobs: np.ndarray  # float32, the shape of tokens
    audio: np.ndarray  # float32 [samples]
    sample_rate: int
    policy_version: str
    model_name: str


@dataclass(frozen=True)
class ModelSpec:
    """What the gateway must send a Triton generator model, as the model itself says."""

    prompt_input: str  # "PROMPT_EMBEDDING" (the default generator) or "PROMPT" (the text: MusicGen)
    frame_rate: float  # token frames per second: N_FRAMES = round(duration_s * frame_rate)
    sample_rate: int
    num_codebooks: int
    max_frames: int | None = field(default=None, compare=False)  # learnt from the first refusal

    @property
    def takes_text(self) -> bool:
        return self.prompt_input == "PROMPT"

    def frames_for(self, duration_s: float) -> int:
        return max(1, int(round(duration_s * self.frame_rate)))


class FramesOutOfRange(UpstreamFailed):
    """The model refused N_FRAMES: the clip is longer than it can make (``max_frames``)."""

    def __init__(self, model_name: str, max_frames: int):
        super().__init__(f"triton {model_name}: N_FRAMES must be in [1, {max_frames}]")
        self.model_name, self.max_frames = model_name, max_frames


class GeneratorClient(Protocol):
    async def model_spec(self, model_name: str) -> ModelSpec: ...

    def forget(self, model_name: str) -> None:
        """Drop the cached spec (the model changed kind): the next ``model_spec`` asks Triton again."""

    async def generate(
        self, model_name: str, prompt: np.ndarray | str, seed: int, n_frames: int, temperature: float, top_k: int
    ) -> Candidate:
        """One clip; ``prompt`` is the embedding for a ``PROMPT_EMBEDDING`` model, the text for a ``PROMPT`` one."""

    async def is_ready(self, model_name: str) -> bool: ...

    async def close(self) -> None: ...


class TritonGeneratorClient:
    def __init__(self, url: str, timeout_s: float):
        from tritonclient.grpc import aio as grpcclient

        self._grpc = grpcclient
        self.grpc = grpcclient.InferenceServerClient(url)
        self.timeout_s = timeout_s
        self._specs: dict[str, ModelSpec] = {}

    async def model_spec(self, model_name: str) -> ModelSpec:
        spec = self._specs.get(model_name)
        if spec is None:
            spec = self._specs[model_name] = await self._learn_spec(model_name)
        return spec

    def forget(self, model_name: str) -> None:
        self._specs.pop(model_name, None)

    async def _learn_spec(self, model_name: str) -> ModelSpec:
        """The prompt input from the model's metadata, the rest from one probe inference of one frame."""
        metadata = await self._call(model_name, self.grpc.get_model_metadata, model_name, as_json=True, observe=False)
        inputs = {tensor["name"]: tensor for tensor in metadata.get("inputs", [])}
        if "PROMPT" in inputs:
            prompt: np.ndarray | str = "probe"
        elif "PROMPT_EMBEDDING" in inputs:
            prompt = np.zeros(int(inputs["PROMPT_EMBEDDING"]["shape"][-1]), dtype=np.float32)
        else:
            raise UpstreamFailed(
                f"triton {model_name}: declares neither PROMPT nor PROMPT_EMBEDDING ({sorted(inputs)})"
            )
        probe = await self.generate(model_name, prompt, 0, 1, 1.0, 0)
        if probe.audio.size == 0:
            raise UpstreamFailed(f"triton {model_name}: a one-frame probe returned no audio")
        return ModelSpec(
            prompt_input="PROMPT" if isinstance(prompt, str) else "PROMPT_EMBEDDING",
            frame_rate=probe.sample_rate / probe.audio.size,
            sample_rate=probe.sample_rate,
            num_codebooks=1 if probe.tokens.ndim == 1 else int(probe.tokens.shape[0]),
        )

    async def generate(
        self, model_name: str, prompt: np.ndarray | str, seed: int, n_frames: int, temperature: float, top_k: int
    ) -> Candidate:
        if isinstance(prompt, str):
            prompt_input = self._input("PROMPT", np.array([[prompt.encode()]], dtype=object), "BYTES")
        else:
            prompt_input = self._input("PROMPT_EMBEDDING", np.asarray(prompt, dtype=np.float32).reshape(1, -1), "FP32")
        inputs = [
            prompt_input,
            self._input("SEED", np.array([[seed]], dtype=np.int64), "INT64"),
            self._input("N_FRAMES", np.array([[n_frames]], dtype=np.int32), "INT32"),
            self._input("TEMPERATURE", np.array([[temperature]], dtype=np.float32), "FP32"),
            self._input("TOP_K", np.array([[top_k]], dtype=np.int32), "INT32"),
        ]
        result = await self._call(model_name, self.grpc.infer, model_name, inputs)
        return Candidate(
            tokens=result.as_numpy("TOKENS")[0],
            logprobs=result.as_numpy("LOGPROBS")[0],
            audio=result.as_numpy("AUDIO")[0],
            sample_rate=int(result.as_numpy("SAMPLE_RATE")[0, 0]),
            policy_version=_as_text(result.as_numpy("POLICY_VERSION")[0, 0]),
            model_name=model_name,
        )

    async def _call(self, model_name: str, method, *args, observe: bool = True, **kwargs):
        """One gRPC call about ``model_name``, its failures mapped to HTTP meaning and counted
        (``observe``: its latency is an inference's, in ``musicrl_gateway_triton_seconds``)."""
        from tritonclient.utils import InferenceServerException

        start = time.perf_counter()
        outcome = "ok"
        try:
            return await method(*args, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as err:
            status = str(err.status() or "")
            retryable = any(code in status for code in RETRYABLE_STATUSES) or "unknown model" in str(err)
            outcome = "unavailable" if retryable else "error"
            UPSTREAM_ERRORS.labels("triton").inc()
            if retryable:
                raise UpstreamUnavailable("triton", f"{model_name}: {err.message() or status}") from err
            frames = FRAMES_OUT_OF_RANGE.search(err.message() or "")
            if frames is not None:
                max_frames = int(frames.group(1))
                if model_name in self._specs:  # later requests are refused without asking Triton
                    self._specs[model_name] = replace(self._specs[model_name], max_frames=max_frames)
                raise FramesOutOfRange(model_name, max_frames) from err
            raise UpstreamFailed(f"triton {model_name}: {err.message() or status}") from err
        except OSError as err:  # resolver or socket failures before gRPC has a status
            outcome = "unavailable"
            UPSTREAM_ERRORS.labels("triton").inc()
            raise UpstreamUnavailable("triton", str(err)) from err
        finally:
            if observe:
                TRITON_SECONDS.labels(model_name, outcome).observe(time.perf_counter() - start)

    async def is_ready(self, model_name: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self.grpc.is_model_ready(model_name, client_timeout=min(self.timeout_s, 5.0)))
        except (InferenceServerException, OSError):
            return False

    async def close(self) -> None:
        await self.grpc.close()

    def _input(self, name: str, array: np.ndarray, datatype: str):
        tensor = self._grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
