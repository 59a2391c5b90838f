"""The policy interface: what serving and finetuning need from a text-to-music model.

Two implementations: the project's own generator (``GeneratorPolicy``, kind
``default``) and MusicGen (``musicrl.models.musicgen.MusicgenPolicy``, kind
``musicgen``). ``load_policy(directory)`` picks one from the directory itself,
so a version directory alone says what it holds:

- ``policy.json`` with ``{"kind": ...}`` (what ``Policy.save`` writes for MusicGen);
- else a transformers ``config.json`` with ``"model_type": "musicgen"`` (a plain
  ``save_pretrained`` directory, e.g. a snapshot of ``facebook/musicgen-small``);
- else the default generator checkpoint (``config.json`` + ``weights.pt``), whose
  format is unchanged, so every existing version still loads.

Tokens are ``[B, K, T]`` everywhere: K codebooks (1 for the default, 4 for
MusicGen) by T frames. A clip's log-probability is the sum over frames and
codebooks; any interleaving of codebooks (MusicGen's delay pattern) stays
inside the implementation. A policy is an ``nn.Module`` whose ``forward`` gives
the teacher-forced logits, so the trainers optimise and DDP-wrap it as before.

Conditioning is computed once per batch with ``condition(prompts)`` and passed
to ``sample`` and ``forward``: the default embeds prompts with its frozen
sentence encoder (the Triton backend receives that embedding from the gateway),
MusicGen runs its frozen T5. The value is opaque to callers.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from musicrl.audio import codec
from musicrl.models.generator import Generator, filter_logits, load_generator, save_generator, write_atomic

POLICY_FILE = "policy.json"
KINDS = ("default", "musicgen")


class Policy(nn.Module, ABC):
    kind: str
    sample_rate: int  # of decode's audio
    frame_rate: float  # token frames per second
    num_codebooks: int  # K
    vocab_size: int  # V: tokens of one codebook
    max_frames: int  # longest clip, in frames
    # True when a clip of n frames is exactly the first n frames of a longer one with the same seed:
    # Triton may then sample a batch of mixed lengths at the longest and cut (MusicGen's delay breaks it).
    prefix_stable: bool

    @abstractmethod
    def condition(self, prompts: Sequence[str]) -> Any:
        """What ``sample`` and ``forward`` condition on, for these prompts (no gradient)."""

    @abstractmethod
    def sample(
        self,
        cond: Any,
        n_frames: int,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        seeds: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, K, T] and their log-probs [B, K, T] under the tempered, top-k-filtered policy they were
        drawn from. Temperature and top-k: one value or one per row; a row depends only on its own seed."""

    @abstractmethod
    def forward(self, cond: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, K, T, V]: ``logits[:, k, t]`` is the distribution of ``tokens[:, k, t]``."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """Audio [B, samples] float32 in [-1, 1] at ``sample_rate``."""

    @abstractmethod
    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        """A version directory ``load_policy`` reads back."""

    def logprobs(
        self,
        cond: Any,
        tokens: torch.Tensor,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
    ) -> torch.Tensor:
        """Differentiable log-probs [B, K, T] of ``tokens`` under the tempered, top-k-filtered policy
        (with the sampling settings, what ``sample`` returned)."""
        return token_logprobs(self(cond, tokens), tokens, temperature, top_k)

    def frames_for(self, duration_s: float) -> int:
        """Frames of a clip of ``duration_s`` seconds (rounded to the nearest frame, as ``codec.frames_for``)."""
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        return int(round(duration_s * self.frame_rate))


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
) -> torch.Tensor:
    """log p(tokens) [B, K, T] from logits [B, K, T, V] after temperature and top-k (scalars or one per row)."""
    B, K, T, V = logits.shape
    device = logits.device
    temperatures = torch.as_tensor(temperature, dtype=torch.float32, device=device).expand(B)
    top_ks = torch.as_tensor(top_k, dtype=torch.long, device=device).expand(B).clamp(max=V)
    flat = filter_logits(
        logits.reshape(B * K * T, V), temperatures.repeat_interleave(K * T), top_ks.repeat_interleave(K * T)
    )
    return F.log_softmax(flat, dim=-1).gather(-1, tokens.reshape(-1, 1)).view(B, K, T)


class GeneratorPolicy(Policy):
    """The project's own generator (``musicrl.models.generator``) behind the interface, one codebook.

    ``embed`` maps prompts to the sentence embeddings the generator was trained on; by default the
    frozen encoder its config names (``musicrl.text.load_text_encoder``), loaded on first use.
    """

    kind = "default"
    prefix_stable = True

    def __init__(self, generator: Generator, embed: Callable[[list[str]], np.ndarray] | None = None) -> None:
        super().__init__()
        self.generator = generator
        self.embed = embed
        self.sample_rate, self.frame_rate, self.num_codebooks = codec.SAMPLE_RATE, codec.FRAME_RATE, 1
        self.vocab_size, self.max_frames = generator.config.vocab_size, generator.config.max_frames

    def condition(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.embed is None:
            from musicrl.text import load_text_encoder  # noqa: PLC0415 - loads sentence-transformers

            self.embed = load_text_encoder(self.generator.config.text_encoder).embed
        return torch.from_numpy(np.asarray(self.embed(list(prompts)), dtype=np.float32)).to(self.generator.bos.device)

    def sample(self, cond, n_frames, temperature=1.0, top_k=0, seeds=None):
        tokens, logprobs = self.generator.sample(cond, n_frames, temperature, top_k, seeds)
        return tokens[:, None], logprobs[:, None]

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.generator(cond, tokens[:, 0])[:, None]

    def decode(self, tokens) -> np.ndarray:
        tokens = torch.as_tensor(tokens).cpu().numpy()
        return np.stack([codec.decode(row[0]) for row in tokens]).astype(np.float32)

    def save(self, directory, meta=None) -> Path:
        return save_generator(self.generator, directory, meta)


def policy_kind(directory: str | Path) -> str:
    """Which implementation a version directory holds (see the module docstring)."""
    directory = Path(directory)
    if (directory / POLICY_FILE).is_file():
        kind = json.loads((directory / POLICY_FILE).read_text()).get("kind")
        if kind not in KINDS:
            raise ValueError(f"{directory / POLICY_FILE}: unknown policy kind {kind!r}; expected one of {KINDS}")
        return kind
    config = directory / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "musicgen":
        return "musicgen"
    return "default"


def load_policy(
    directory: str | Path, device: str | torch.device = "cpu", embed: Callable[[list[str]], np.ndarray] | None = None
) -> Policy:
    """The policy in ``directory`` in eval mode, whichever implementation it is (``embed``: default kind only)."""
    if policy_kind(directory) == "musicgen":
        from musicrl.models.musicgen import MusicgenPolicy  # noqa: PLC0415 - imports transformers

        return MusicgenPolicy.load(directory, device).eval()
    generator, _ = load_generator(directory, device)
    return GeneratorPolicy(generator, embed).eval()


def as_policy(model: Generator | Policy, embed: Callable[[list[str]], np.ndarray] | None = None) -> Policy:
    """A policy for a model handed over either way: a ``Policy`` as it is, the default ``Generator`` wrapped
    (with ``embed`` as its prompt encoder); the wrapper shares the generator's parameters, so training one trains
    both."""
    return model if isinstance(model, Policy) else GeneratorPolicy(model, embed)


def save_policy_atomic(
    model: Generator | Policy,
    directory: str | Path,
    meta: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save either kind into a staging sibling renamed into place (``musicrl.models.generator.write_atomic``)."""
    policy = as_policy(model)
    return write_atomic(lambda staging: policy.save(staging, meta), directory, extra_files)
