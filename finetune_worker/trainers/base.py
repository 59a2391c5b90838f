"""What the RL trainers share: the reward-function interface, data parallelism,
mixed precision, and crash-safe checkpoints of the whole training state."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from musicrl.checkpoint import load_torch, save_torch_atomic
from musicrl.logging import get_logger

log = get_logger(__name__)

CHECKPOINT_FILE = "trainer_state.pt"


class RewardFunction(Protocol):
    """Scores rollouts: prompts and their audio tokens -> one array per reward component.

    Tokens are what ``reward_input`` makes of the rollouts: [B, T] for the one-codebook
    default generator (the reward service decodes them), [B, K, T] for a multi-codebook
    policy (MusicGen). Components are those of the reward service (``text_adherence``,
    ``quality`` normalised to 0..1, ``quality_mos``, ``preference``); ``versions`` names
    the reward models that produced them, for the lineage of what gets trained.
    """

    def __call__(self, prompts: list[str], tokens: np.ndarray) -> dict[str, np.ndarray]: ...

    @property
    def versions(self) -> dict[str, str]: ...


def reward_input(tokens: torch.Tensor) -> np.ndarray:
    """Rollout tokens [B, K, T] as a reward function takes them: [B, T] when K is 1, else as they are."""
    tokens = tokens.detach().cpu().numpy()
    return tokens[:, 0] if tokens.shape[1] == 1 else tokens


def combine_rewards(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The scalar reward of each rollout: sum of weight * component."""
    missing = [name for name in weights if name not in components]
    if missing:
        raise KeyError(f"reward components {missing} were not computed (got {sorted(components)})")
    return sum(float(w) * np.asarray(components[name], dtype=np.float64) for name, w in weights.items())


# ----------------------------------------------------------------------------- devices


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only: CPU and XLA run in fp32 (CPU bf16 is slower here, XLA casts itself)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mark_step(device: torch.device) -> None:
    """XLA builds graphs lazily; cut one per optimizer step so it compiles the same graph each time."""
    if device.type == "xla":
        import torch_xla.core.xla_model as xm  # noqa: PLC0415 - optional extra

        xm.mark_step()


# ----------------------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class DistributedContext:
    """Rank and world size; a single process is rank 0 of 1 and never touches torch.distributed."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, backend: str | None = None) -> DistributedContext:
        """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else run alone.

        ``backend``: "gloo" for CPU tensors, "nccl" when every process drives its own GPU.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend=backend or "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (each rank saw its own rollouts)."""
        if not self.enabled or not values:
            return values
        names = sorted(values)
        tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(tensor)
        return {n: float(v) / self.world_size for n, v in zip(names, tensor.tolist())}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def wrap_ddp(module: torch.nn.Module, ctx: DistributedContext, device: torch.device) -> torch.nn.Module:
    if not ctx.enabled:
        return module
    device_ids = [device.index or 0] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def rollout_seed(base_seed: int, step: int, rank: int, index: int) -> int:
    """Seeds are a function of (step, rank, index), so a resumed run samples what the killed one would have."""
    digest = hashlib.sha256(f"{base_seed}:{step}:{rank}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# ----------------------------------------------------------------------------- checkpoints


def save_state_atomic(state: dict[str, Any], directory: Path) -> Path:
    """Write ``trainer_state.pt`` via a temporary file and ``os.replace``: a kill mid-write leaves the old one."""
    return save_torch_atomic(state, directory / CHECKPOINT_FILE)


def load_state(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return load_torch(path)


# ----------------------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class TrainerArgs:
    """Fields every trainer config has (the TRL ``TrainingArguments`` of this project).

    No defaults: every value comes from ``FinetuneSettings`` through ``finetune_worker.configs``.
    """

    steps: int  # most optimizer steps (a trainer may stop earlier)
    batch_size: int  # rollouts (REINFORCE) or pairs (DPO) per process per step
    seed: int
    device: str
    mixed_precision: bool  # bf16 autocast, used on CUDA only
    max_grad_norm: float
    checkpoint_every: int  # steps between resumable training states; 0 disables them
    candidate_every: int  # steps between policy snapshots the gate chooses from
    log_every: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainOutput:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class OnlineTrainer:
    """The training loop around ``step()``: progress bar, history, checkpoint and resume.

    Subclasses implement ``step() -> metrics`` and ``state_dict()/load_state_dict()``,
    and may stop early by returning True from ``on_step_end(metrics)``. A checkpoint is
    the whole state (weights, optimizers, step, history), written by rank 0 atomically;
    ``train()`` resumes from it when one is present in ``checkpoint_dir``, so a killed
    worker restarts where it stopped. Every ``candidate_every`` steps, and at the last
    step, rank 0 saves the policy to ``candidates_dir/step-NNNN``: the gate chooses among them.
    """

    args: TrainerArgs

    def __init__(
        self,
        args: TrainerArgs,
        checkpoint_dir: str | Path | None,
        dist_ctx: DistributedContext | None,
        candidates_dir: str | Path | None = None,
    ):
        self.args = args
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.candidates_dir = Path(candidates_dir) if candidates_dir else None
        self.dist = dist_ctx or DistributedContext()
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.stopped_early = False

    # subclass API
    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def on_step_end(self, metrics: dict[str, float]) -> bool:
        """Called with every step's (process-averaged) metrics; True ends training after this step."""
        return False

    # shared
    def save_candidate(self) -> Path | None:
        """The policy as it is now, a complete version directory (either kind), renamed into place when written."""
        from musicrl.models.policy import save_policy_atomic  # noqa: PLC0415 - trainers/base stays model-agnostic

        if self.candidates_dir is None or not self.dist.is_main:
            self.dist.barrier()
            return None
        target = save_policy_atomic(
            self.model,
            self.candidates_dir / f"step-{self.global_step:04d}",
            {"step": self.global_step, "metrics": self.history[-1] if self.history else {}},
        )
        self.dist.barrier()
        return target

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None or not self.dist.is_main:
            self.dist.barrier()
            return None
        state = {
            "global_step": self.global_step,
            "history": self.history,
            "args": self.args.to_dict(),
            "stopped_early": self.stopped_early,
            **self.state_dict(),
        }
        path = save_state_atomic(state, self.checkpoint_dir)
        self.dist.barrier()
        return path

    def maybe_resume(self) -> int | None:
        if self.checkpoint_dir is None:
            return None
        state = load_state(self.checkpoint_dir)
        if state is None:
            return None
        self.load_state_dict(state)
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.stopped_early = bool(state.get("stopped_early", False))
        log.info("trainer.resumed", step=self.global_step, checkpoint=str(self.checkpoint_dir))
        return self.global_step

    def train(self) -> TrainOutput:
        resumed = self.maybe_resume()
        bar = tqdm(
            total=self.args.steps,
            initial=self.global_step,
            disable=not self.dist.is_main,
            desc=type(self).__name__,
            leave=False,
        )
        started = time.perf_counter()
        while self.global_step < self.args.steps and not self.stopped_early:
            metrics = self.dist.mean(self.step())
            self.global_step += 1
            metrics = {"step": float(self.global_step), **metrics, "elapsed_s": time.perf_counter() - started}
            _check_finite(metrics)
            self.stopped_early = self.on_step_end(metrics)
            metrics["stopped_early"] = float(self.stopped_early)
            self.history.append(metrics)
            bar.update(1)
            if self.dist.is_main and self.global_step % max(1, self.args.log_every) == 0:
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("reward", "kl", "loss") if k in metrics})
                log.info("trainer.step", **{k: round(v, 6) for k, v in metrics.items()})
            finished = self.stopped_early or self.global_step >= self.args.steps
            if finished or self.global_step % self.args.candidate_every == 0:
                self.save_candidate()
            every = self.args.checkpoint_every
            if every and self.global_step % every == 0 and not finished:
                self.save_checkpoint()
        if self.stopped_early:
            log.info("trainer.early_stop", step=self.global_step, kl=self.history[-1].get("kl"))
        bar.close()
        return TrainOutput(step=self.global_step, history=list(self.history), resumed_from=resumed)


class NonFiniteError(FloatingPointError):
    """A metric went NaN or infinite: training stops instead of publishing garbage."""


def _check_finite(metrics: dict[str, float]) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"non-finite training metrics: {json.dumps(bad)}")
