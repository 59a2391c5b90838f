"""Triton Python backend for the music generator, whichever policy the version holds.

The version directory says which (``musicrl.models.policy.load_policy``): the
project's default generator (``config.json``, ``weights.pt``, ``meta.json``) or
MusicGen (a ``save_pretrained`` directory). The prompt arrives as the gateway
sends it for that kind: ``PROMPT_EMBEDDING`` (the frozen sentence encoder's
vector) for the default, ``PROMPT`` (the text; MusicGen runs its own T5) for
MusicGen. ``N_FRAMES`` counts the policy's own frames (8/s default, 50/s MusicGen).

One ``execute`` call receives every request of a dynamic batch and samples
all their rows in one ``sample`` call (per-row seed, temperature and top-k) at
the longest requested length, then cuts each row to its own length. This is
exact when the policy is ``prefix_stable`` (a row depends only on its own
condition, seed and sampling parameters, and a shorter clip is the prefix of a
longer one with the same seed); MusicGen's delay pattern breaks the prefix
property, so its rows are sampled in one call per requested length. Audio is
decoded here, at the policy's own sample rate (16 kHz default, 32 kHz MusicGen),
so the gateway never needs the codec.

Outputs: ``TOKENS`` and ``LOGPROBS`` are ``[T]`` per row for the one-codebook
default (as before) and ``[K, T]`` for MusicGen; the Triton model version is
reported as the policy version of every clip.
"""

from __future__ import annotations

import os
import site
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple


def _apply_launcher_python_path() -> None:
    """Put the launcher's PYTHONPATH (the project and its virtualenv) first on sys.path.

    The stub embeds Python with an isolated configuration, which ignores
    PYTHONPATH; ``site.addsitedir`` also runs the ``.pth`` files of an editable install.
    """
    before = list(sys.path)
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and entry not in before:
            site.addsitedir(entry)
    sys.path[:] = [p for p in sys.path if p not in before] + before


def _drop_working_directory() -> None:
    """Take Triton's working directory off sys.path. The local stack runs Triton in its data directory,
    whose ``triton/`` (backends, repository) would otherwise be found as the ``triton`` package (OpenAI's
    compiler), which torch and transformers probe: MusicGen's import then fails (``triton.language``)."""
    cwd = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != cwd]
    shadow = sys.modules.get("triton")
    if shadow is not None and getattr(shadow, "__file__", None) is None:  # a namespace package: a directory
        del sys.modules["triton"]


_apply_launcher_python_path()
_drop_working_directory()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from musicrl.models.policy import load_policy  # noqa: E402


class Row(NamedTuple):
    request: int  # index of the request in this execute call
    index: int  # row inside that request
    prompt: np.ndarray | str  # the prompt embedding (default policy) or the prompt text (MusicGen)
    seed: int
    n_frames: int
    temperature: float
    top_k: int


class TritonPythonModel:
    def initialize(self, args):
        # One intra-op thread per instance: instances, not threads, use the cores.
        torch.set_num_threads(1)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.policy = load_policy(version_dir)
        self.prompt_input = "PROMPT" if self.policy.kind == "musicgen" else "PROMPT_EMBEDDING"
        self.policy_version = str(args["model_version"]).encode()
        self.max_frames = int(self.policy.max_frames)

    def execute(self, requests):
        rows: list[Row] = []
        errors: dict[int, str] = {}
        for r, request in enumerate(requests):
            prompts = pb_utils.get_input_tensor_by_name(request, self.prompt_input).as_numpy()
            if self.prompt_input == "PROMPT":
                prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in prompts[:, 0]]
            seeds = pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy()[:, 0]
            n_frames = pb_utils.get_input_tensor_by_name(request, "N_FRAMES").as_numpy()[:, 0]
            temperatures = pb_utils.get_input_tensor_by_name(request, "TEMPERATURE").as_numpy()[:, 0]
            top_ks = pb_utils.get_input_tensor_by_name(request, "TOP_K").as_numpy()[:, 0]
            error = self._validate(prompts, n_frames, temperatures, top_ks)
            if error:
                errors[r] = error
                continue
            for i in range(len(seeds)):
                rows.append(
                    Row(r, i, prompts[i], int(seeds[i]), int(n_frames[i]), float(temperatures[i]), int(top_ks[i]))
                )

        try:
            results = self._sample(rows)
        except Exception as err:  # noqa: BLE001 - every request of the batch gets the reason
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"sampling failed: {err}")) for _ in requests]
        responses = []
        for r in range(len(requests)):
            if r in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[r])))
                continue
            responses.append(self._response([results[r][i] for i in sorted(results[r])]))
        return responses

    def _validate(self, prompts, n_frames, temperatures, top_ks) -> str | None:
        if self.prompt_input == "PROMPT_EMBEDDING" and not np.all(np.isfinite(prompts)):
            return "PROMPT_EMBEDDING must be finite"
        if self.prompt_input == "PROMPT" and not all(p.strip() for p in prompts):
            return "PROMPT must not be empty"
        if len(set(n_frames.tolist())) != 1:
            return "all rows of one request must ask for the same N_FRAMES"
        if n_frames.min() < 1 or n_frames.max() > self.max_frames:
            return f"N_FRAMES must be in [1, {self.max_frames}]"
        if not np.all(np.isfinite(temperatures) & (temperatures > 0)):
            return "TEMPERATURE must be finite and > 0"
        if np.any(top_ks < 0):
            return "TOP_K must be >= 0 (0 disables top-k filtering)"
        return None

    def _sample(self, rows: list[Row]) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
        results: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
        if self.policy.prefix_stable:
            groups = [rows] if rows else []
        else:  # one call per length (every row of a request has the same N_FRAMES)
            groups = [[row for row in rows if row.n_frames == n] for n in sorted({row.n_frames for row in rows})]
        for group in groups:
            tokens, logprobs = self.policy.sample(
                self._condition(group),
                max(row.n_frames for row in group),
                temperature=[row.temperature for row in group],
                top_k=[row.top_k for row in group],
                seeds=[row.seed for row in group],
            )
            for j, row in enumerate(group):
                results[row.request][row.index] = (
                    tokens[j, :, : row.n_frames].numpy().astype(np.int64),
                    logprobs[j, :, : row.n_frames].numpy().astype(np.float32),
                )
        return results

    def _condition(self, rows: list[Row]):
        if self.prompt_input == "PROMPT":
            return self.policy.condition([row.prompt for row in rows])
        return torch.from_numpy(np.stack([row.prompt for row in rows]).astype(np.float32))  # embedded by the gateway

    def _response(self, rows):
        tokens = np.stack([t for t, _ in rows])  # [n, K, T]
        logprobs = np.stack([lp for _, lp in rows])
        audio = self.policy.decode(tokens).astype(np.float32)
        if tokens.shape[1] == 1:  # one codebook: [n, T], the contract of the default generator
            tokens, logprobs = tokens[:, 0], logprobs[:, 0]
        n = len(rows)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("TOKENS", tokens),
                pb_utils.Tensor("LOGPROBS", logprobs),
                pb_utils.Tensor("AUDIO", audio),
                pb_utils.Tensor("SAMPLE_RATE", np.full((n, 1), self.policy.sample_rate, dtype=np.int32)),
                pb_utils.Tensor("POLICY_VERSION", np.full((n, 1), self.policy_version, dtype=object)),
            ]
        )

    def finalize(self):
        self.policy = None
