"""Trainer and gate configurations, built from ``FinetuneSettings`` and nowhere else.

``FinetuneSettings`` is the only source of defaults: the dataclasses the trainers and
the gate take have none of their own, so the worker, ``run_job`` called directly, the
demo and the experiments all train with the same algorithm and rates. Harnesses change
only the size of the work (steps, clip length, prompts), through the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from finetune_worker.gate import GateConfig
from finetune_worker.settings import FinetuneSettings
from finetune_worker.trainers.dpo import DPOConfig
from finetune_worker.trainers.reinforce import ReinforceConfig
from musicrl.audio import codec


def _common(s: FinetuneSettings) -> dict[str, Any]:
    return {
        "steps": s.finetune_steps,
        "batch_size": s.finetune_batch_size,
        "seed": s.finetune_seed,
        "device": s.finetune_device,
        "mixed_precision": s.finetune_mixed_precision,
        "max_grad_norm": s.finetune_max_grad_norm,
        "checkpoint_every": s.finetune_checkpoint_every,
        "candidate_every": s.finetune_candidate_every,
    }


def reinforce_config(s: FinetuneSettings, frames_for: Callable[[float], int] | None = None) -> ReinforceConfig:
    """``frames_for``: the policy's (``Policy.frames_for``: 50 frames/s for MusicGen); the default codec's when None."""
    frames_for = frames_for or codec.frames_for
    return ReinforceConfig(
        **_common(s),
        stage=s.finetune_stage,
        alpha=s.finetune_alpha,
        kl_target=s.finetune_kl_target,
        kl_budget=s.finetune_kl_budget,
        kl_gain=s.finetune_kl_gain,
        group_size=s.finetune_group_size,
        constraint_slack=s.finetune_constraint_slack,
        lagrange_lr=s.finetune_lagrange_lr,
        policy_lr=s.finetune_policy_lr,
        optimizer=s.finetune_optimizer,
        temperature=s.finetune_temperature,
        n_frames=frames_for(s.finetune_duration_s),
    )


def dpo_config(s: FinetuneSettings) -> DPOConfig:
    return DPOConfig(
        **_common(s), beta=s.finetune_dpo_beta, learning_rate=s.finetune_policy_lr, optimizer=s.finetune_optimizer
    )


def trainer_config(s: FinetuneSettings, frames_for: Callable[[float], int] | None = None) -> dict[str, Any]:
    """The job's trainer configuration as plain JSON (``TrainJob.config``); ``frames_for`` as in
    ``reinforce_config``."""
    return asdict(reinforce_config(s, frames_for) if s.finetune_trainer == "reinforce" else dpo_config(s))


def gate_config(s: FinetuneSettings) -> GateConfig:
    return GateConfig(s.finetune_gate_min_reward_gain, s.finetune_gate_max_kl, s.finetune_gate_max_other_drop)
