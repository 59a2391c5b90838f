"""One training job: a JSON spec in, a finished generator checkpoint out.

The cycle (``finetune_worker.cycle``) writes ``job.json`` and runs it in-process
(one process) or as ``torchrun --nproc_per_node=N -m finetune_worker.train job.json``
(data parallel; gloo on CPU, NCCL on GPU). Rank 0 writes the trained policy to
``output_dir`` through a temporary sibling and a rename, so ``output_dir`` exists
only when training finished: the publisher never sees a half-trained model.
Checkpoints in ``checkpoint_dir`` let a killed job resume where it stopped. A stop request
(SIGTERM/SIGINT, ``finetune_worker.shutdown``) ends training between two steps: the state
after the last finished step is checkpointed first, then ``ShutdownRequested`` is raised.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from finetune_worker import shutdown
from finetune_worker.prompts import PromptMixer
from finetune_worker.rewards import for_policy, load_object, make_reward_fn
from finetune_worker.trainers.base import DistributedContext
from finetune_worker.trainers.dpo import DPOConfig, OnlineDPOTrainer, pairs_from_buffer
from finetune_worker.trainers.reinforce import ReinforceConfig, ReinforceTrainer
from musicrl.buffer import parquet_to_table
from musicrl.logging import get_logger
from musicrl.models.policy import GeneratorPolicy, load_policy, save_policy_atomic

log = get_logger(__name__)

HISTORY_FILE = "train_history.json"
STOPPED_EXIT_CODE = 3  # `python -m finetune_worker.train` stopped by a signal between steps (checkpointed)


class TrainJob(BaseModel):
    """``policy_dir`` is the policy the cycle starts from: trained in place, and, frozen, its KL anchor."""

    trainer: Literal["reinforce", "dpo"] = "reinforce"
    policy_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    candidates_dir: Path
    config: dict[str, Any]  # finetune_worker.configs.trainer_config(settings)
    user_prompts: list[str] = Field(default_factory=list)
    captions: list[str] = Field(default_factory=list)
    user_fraction: float = 0.5
    pairs_file: Path | None = None  # DPO: the buffer rows it trains on, Parquet (FinetuneCycle.write_dpo_pairs)
    reward: str = "http://127.0.0.1:8090"  # reward service URL, or "python:module:attr" (a RewardFunction factory)
    text_encoder: str = (
        "minilm"  # musicrl.text name, or "python:module:attr" (the default generator's; MusicGen runs its T5)
    )
    # A policy with its own codec (MusicGen): its preference model (musicrl.models.preference_musicgen), scored in
    # this process (finetune_worker.rewards.PolicyRewardFunction); None: no preference component (stage R).
    preference_dir: Path | None = None
    preference_version: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)  # written to the checkpoint's meta.json

    def write(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2))
        return path


def make_embed(spec: str):
    if spec.startswith("python:"):
        obj = load_object(spec)
        return obj.embed if hasattr(obj, "embed") else obj
    from musicrl.text import load_text_encoder  # noqa: PLC0415 - loads sentence-transformers

    return load_text_encoder(spec).embed


def _check_replicas_in_sync(model: torch.nn.Module, dist_ctx: DistributedContext) -> None:
    """DDP keeps replicas identical by construction; verify it before rank 0 saves its copy."""
    if not dist_ctx.enabled:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()
    gathered = [torch.zeros_like(checksum) for _ in range(dist_ctx.world_size)]
    torch.distributed.all_gather(gathered, checksum)
    if any(not torch.allclose(g, checksum) for g in gathered):
        raise RuntimeError(f"data-parallel replicas diverged: parameter checksums {[float(g) for g in gathered]}")


def stop_between_steps(trainer, dist_ctx: DistributedContext) -> None:
    """Make ``trainer`` stop before its next step once a stop was requested (on any rank: every rank agrees).

    The check runs where ``OnlineTrainer.train`` calls ``step()``, i.e. after the previous step's history,
    snapshot and checkpoint bookkeeping: the state is whole. It is checkpointed (``save_checkpoint``, atomic)
    so the resumed job starts at exactly this step, then ``ShutdownRequested`` ends the job.
    """
    step = trainer.step

    def guarded_step() -> dict[str, float]:
        stop = shutdown.requested()
        if dist_ctx.enabled:  # one rank's signal stops all of them at the same step (the collectives stay matched)
            stop = dist_ctx.mean({"stop": float(stop)})["stop"] > 0
        if stop:
            if trainer.global_step > 0:
                trainer.save_checkpoint()
            log.info("trainer.stopped", step=trainer.global_step, reason=shutdown.reason())
            raise shutdown.ShutdownRequested(f"training stopped after step {trainer.global_step}")
        return step()

    trainer.step = guarded_step


def load_trainable(directory: Path):
    """The policy in ``directory`` as the trainers take it: the default kind as its ``Generator`` (checkpoints and
    DDP see the same module as always), any other kind as the ``Policy`` itself."""
    policy = load_policy(directory)
    return policy.generator if isinstance(policy, GeneratorPolicy) else policy


def run_job(job: TrainJob, dist_ctx: DistributedContext | None = None) -> list[dict]:
    """Train; returns the per-step metrics. Rank 0 writes ``output_dir`` at the end."""
    dist_ctx = dist_ctx or DistributedContext()
    policy = load_trainable(job.policy_dir)
    default_kind = not hasattr(
        policy, "kind"
    )  # a Generator: the default kind, conditioned on the text encoder's embeddings
    embed = make_embed(job.text_encoder) if default_kind else None
    if job.trainer == "reinforce":
        config = ReinforceConfig(**job.config)
        prompts = PromptMixer(job.user_prompts, job.captions, job.user_fraction, seed=config.seed)
        reward_fn = make_reward_fn(job.reward)
        if not default_kind:  # decoded audio to the reward service, preference from the policy's own model
            reward_fn = for_policy(reward_fn, policy, job.preference_dir, job.preference_version)
        trainer = ReinforceTrainer(
            config, policy, reward_fn, prompts, embed, job.checkpoint_dir, dist_ctx, job.candidates_dir
        )
    else:
        config = DPOConfig(**job.config)
        pairs = pairs_from_buffer(parquet_to_table(Path(job.pairs_file).read_bytes()))
        reference = load_trainable(job.policy_dir)  # the served policy that sampled the pairs
        trainer = OnlineDPOTrainer(
            config, policy, reference, pairs, embed, job.checkpoint_dir, dist_ctx, job.candidates_dir
        )
    stop_between_steps(trainer, dist_ctx)
    out = trainer.train()
    _check_replicas_in_sync(trainer.model, dist_ctx)
    job.meta["world_size"] = dist_ctx.world_size
    if dist_ctx.is_main:
        save_policy_atomic(
            trainer.model.cpu(),
            job.output_dir,
            {**job.meta, "trainer": job.trainer, "steps": len(out.history)},
            {HISTORY_FILE: json.dumps(out.history)},
        )
    dist_ctx.barrier()
    return out.history


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m finetune_worker.train JOB.json  (under torchrun for data parallel)")
    torch.set_num_threads(1)
    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    device = str(job.config.get("device", "cpu"))
    if device in ("cuda", "auto") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        job.config["device"] = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
    dist_ctx = DistributedContext.from_env(
        backend="nccl" if job.config.get("device", "cpu").startswith("cuda") else "gloo"
    )
    try:
        with shutdown.handle_signals():  # torchrun forwards the worker's SIGTERM to every rank
            run_job(job, dist_ctx)
    except shutdown.ShutdownRequested as exc:
        log.info("train.stopped", reason=str(exc))
        raise SystemExit(STOPPED_EXIT_CODE) from None
    finally:
        if dist_ctx.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
