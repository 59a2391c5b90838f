"""The RL step's throughput on a MusicGen policy: tokens per second of one REINFORCE step.

``musicrl finetune bench-musicgen`` (or ``python -m benchmarks.rl_step_musicgen``) trains a MusicGen policy (by
default the tiny random one of ``musicrl.models.tiny_pretrained``; any MusicGen directory with ``--checkpoint``)
with the worker's own ``ReinforceTrainer`` and configuration (``finetune_worker.configs``, the shipped defaults
except the sizes) for a few steps and times each step in its phases: sampling the rollouts (KV-cached,
classifier-free guidance as configured), decoding them to audio (what the reward service is sent), and the
update (teacher-forced forward of the policy and of the frozen start policy, backward, optimizer). The reward is
a fake over the codes, so the figure is the policy's own cost, not the reward service's.

Tokens are codes: a step handles ``batch_size x K x T`` of them (K = 4 codebooks, T = 50 frames per second).
The numbers are merged into ``results/musicgen.json`` under ``rl_step``; the file's serving numbers are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

RESULTS = Path("results/musicgen.json")


class _CodesReward:
    """A cheap reward over codes [B, K, T] (share of codebook 0's frames equal to 3): times the policy, not a model."""

    versions = {"text_adherence": "codes", "quality": "codes"}

    def __call__(self, prompts, tokens):
        tokens = np.asarray(tokens)
        return {"text_adherence": (tokens[:, 0] == 3).mean(axis=1), "quality": np.zeros(len(tokens))}


@dataclass
class RLBenchConfig:
    checkpoint: Path | None = None  # a MusicGen directory; None: the tiny random one, built for the run
    batch_size: int = 16  # the worker's default rollouts per step
    group_size: int = 4
    duration_s: float = 1.0
    steps: int = 4  # timed steps (after one warm-up step)
    threads: int = 1
    device: str = "cpu"
    output: Path | None = RESULTS


def _timed(fn, log: list[float]):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append(time.perf_counter() - started)
        return out

    return wrapper


def run_rl_step_bench(config: RLBenchConfig) -> dict:
    from finetune_worker.configs import reinforce_config  # noqa: PLC0415
    from finetune_worker.settings import FinetuneSettings  # noqa: PLC0415
    from finetune_worker.trainers.reinforce import ReinforceTrainer  # noqa: PLC0415
    from musicrl.models.policy import load_policy  # noqa: PLC0415
    from musicrl.models.tiny_pretrained import WORDS, tiny_musicgen  # noqa: PLC0415

    torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = config.checkpoint or tiny_musicgen(Path(tmp) / "musicgen", guidance_scale=3.0)
        policy = load_policy(directory, config.device)
        n_params = sum(p.numel() for p in policy.model.decoder.parameters())
        settings = FinetuneSettings(
            finetune_steps=1 + config.steps,
            finetune_batch_size=config.batch_size,
            finetune_group_size=config.group_size,
            finetune_duration_s=config.duration_s,
            finetune_checkpoint_every=0,
            finetune_candidate_every=10_000,
            finetune_device=config.device,
            finetune_stage="R",
        )
        rl_config = reinforce_config(settings, policy.frames_for)
        rng = np.random.default_rng(0)

        def prompts(step: int, rank: int, n: int) -> list[str]:
            return [" ".join(rng.choice(WORDS, 4)) for _ in range(n)]

        trainer = ReinforceTrainer(rl_config, policy, _CodesReward(), prompts, None)
        sample_s, decode_s, step_s = [], [], []
        trainer.rollout = _timed(trainer.rollout, sample_s)
        trainer.step = _timed(trainer.step, step_s)
        history = trainer.train().history
        decode_batch = torch.randint(
            0, policy.vocab_size, (config.batch_size, policy.num_codebooks, rl_config.n_frames)
        )
        for _ in range(config.steps + 1):
            _timed(policy.decode, decode_s)(decode_batch)

    tokens = config.batch_size * policy.num_codebooks * rl_config.n_frames
    step, sample, decode = (float(np.median(v[1:])) for v in (step_s, sample_s, decode_s))  # the first is a warm-up
    results = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": config.threads,
            "device": config.device,
            "load_avg_1min": round(os.getloadavg()[0], 2),
        },
        "checkpoint": str(config.checkpoint)
        if config.checkpoint
        else "tiny random MusicGen (musicrl.models.tiny_pretrained)",
        "policy": {
            "decoder_parameters": int(n_params),
            "num_codebooks": policy.num_codebooks,
            "frame_rate": policy.frame_rate,
            "guidance_scale": policy.guidance_scale,
        },
        "trainer": "reinforce (finetune_worker.configs.reinforce_config: the shipped defaults, sizes as below)",
        "reward": "a fake over the codes (the policy's own cost; the reward service is not timed)",
        "batch_size": config.batch_size,
        "group_size": config.group_size,
        "duration_s": config.duration_s,
        "frames_per_clip": rl_config.n_frames,
        "tokens_per_step": tokens,
        "timed_steps": config.steps,
        "step_s_median": round(step, 4),
        "step_s_all": [round(v, 4) for v in step_s],
        "tokens_per_s": round(tokens / step, 1),
        "sample_s_median": round(sample, 4),
        "sample_tokens_per_s": round(tokens / sample, 1),
        "update_s_median": round(step - sample, 4),
        "update_tokens_per_s": round(tokens / max(step - sample, 1e-9), 1),
        "decode_audio_s_median": round(decode, 4),
        "kl_last": round(float(history[-1]["kl"]), 4),
    }
    if config.output is not None:
        config.output.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(config.output.read_text()) if config.output.is_file() else {}
        existing["rl_step"] = results  # merged: the serving benchmark's numbers stay
        config.output.write_text(json.dumps(existing, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = run_rl_step_bench(
        RLBenchConfig(
            args.checkpoint, args.batch_size, 4, args.duration_s, args.steps, args.threads, args.device, args.output
        )
    )
    print(
        f"RL step: {results['tokens_per_step']} tokens in {results['step_s_median']} s "
        f"= {results['tokens_per_s']} tokens/s "
        f"(sampling {results['sample_tokens_per_s']} tokens/s, update {results['update_tokens_per_s']} tokens/s, "
        f"decode {results['decode_audio_s_median']} s per batch); wrote {args.output}"
    )


if __name__ == "__main__":
    main()
