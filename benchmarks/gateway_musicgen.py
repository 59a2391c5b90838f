"""``musicrl gateway bench-musicgen``: a MusicGen policy through Triton, batched against unbatched, in one run.

The sibling of ``musicrl gateway bench`` (benchmarks/gateway.py) for the MusicGen implementation
(issue 15). One run, on the same machine and checkpoint (by default a tiny random MusicGen,
``musicrl.models.tiny_pretrained.tiny_musicgen``, with musicgen-small's 32 kHz / 50 frames/s /
4-codebook geometry):

- ``in_process``: the policy loaded in this process, one clip at a time (batch of one, one
  thread): condition, sample, decode; the same-run baseline every ratio is taken against;
- ``triton_unbatched``: the checkpoint installed in a private Triton as a model with
  ``max_batch_size`` 1 (no dynamic batching), one single-threaded instance;
- ``triton_batched``: the same checkpoint as a second model with dynamic batching
  (``max_batch_size`` 16), one single-threaded instance;

both Triton models driven through the gateway's own client (``TritonGeneratorClient``: the
prompt text as ``PROMPT``, N_FRAMES from what the model says its frame rate is) at each
concurrency level. Throughput is clips per second; the real-time factor is seconds of audio
per wall-clock second; ``tokens_per_s`` counts K codebooks x T frames per clip; Triton's batch
sizes come from its statistics. Half of the in-process baseline runs before the Triton levels
and half after, so a change of the shared machine's load biases neither side.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.gateway import _delta, bench_prompts, triton_batch_counts
from musicrl.logging import get_logger

log = get_logger(__name__)

BATCHED, UNBATCHED = "musicgen_batched", "musicgen_unbatched"


@dataclass
class MusicgenBenchConfig:
    checkpoint: Path | None  # None: a tiny random MusicGen built for the run
    concurrency: list[int]
    clips_per_level: int
    duration_s: float
    output: Path


def summary(latencies_s: list[float], wall_s: float, duration_s: float, tokens_per_clip: int) -> dict:
    ms = np.asarray(latencies_s) * 1e3
    clips = len(latencies_s)
    return {
        "clips": clips,
        "wall_s": round(wall_s, 3),
        "clips_per_s": round(clips / wall_s, 3),
        "real_time_factor": round(clips * duration_s / wall_s, 3),
        "tokens_per_s": round(clips * tokens_per_clip / wall_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


class InProcess:
    """The policy in this process, one clip at a time, one thread."""

    def __init__(self, checkpoint: Path):
        import torch

        from musicrl.models.policy import load_policy

        torch.set_num_threads(1)
        self.policy = load_policy(checkpoint)
        self.run(["warm-up"], 1.0)

    def run(self, prompts: list[str], duration_s: float) -> tuple[list[float], float]:
        n_frames = self.policy.frames_for(duration_s)
        latencies = []
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            tokens, _ = self.policy.sample(self.policy.condition([prompt]), n_frames, temperature=0.99, seeds=[i])
            self.policy.decode(tokens)
            latencies.append(time.perf_counter() - t0)
        return latencies, time.perf_counter() - start


async def _triton_level(url: str, model: str, prompts: list[str], concurrency: int, duration_s: float, batch_counts):
    """``len(prompts)`` clips from ``model`` by ``concurrency`` concurrent clients; (latencies, wall, batch sizes)."""
    from serving.services.triton import TritonGeneratorClient

    client = TritonGeneratorClient(url, timeout_s=600)
    try:
        spec = await client.model_spec(model)  # the probe: outside the timed part and the batch counts
        before = batch_counts()
        n_frames = spec.frames_for(duration_s)
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(prompts):
            queue.put_nowait(item)
        latencies: list[float] = []

        async def worker() -> None:
            while not queue.empty():
                i, prompt = queue.get_nowait()
                t0 = time.perf_counter()
                candidate = await client.generate(model, prompt, i, n_frames, 0.99, 0)
                assert candidate.tokens.shape == (spec.num_codebooks, n_frames), candidate.tokens.shape
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        return latencies, wall, _delta(batch_counts(), before)
    finally:
        await client.close()


def run_musicgen_bench(config: MusicgenBenchConfig) -> dict:
    from musicrl.stack import COMPONENTS, Stack, free_port_settings
    from serving.model_repository import BatchingConfig, install_version, load

    with tempfile.TemporaryDirectory(prefix="musicrl-bench-musicgen-") as tmp:
        data_dir = Path(tmp)
        checkpoint = config.checkpoint
        if checkpoint is None:
            from musicrl.models.tiny_pretrained import tiny_musicgen

            checkpoint = tiny_musicgen(data_dir / "tiny-musicgen", guidance_scale=3.0)
        prompts = bench_prompts(config.clips_per_level)
        half = len(prompts) // 2
        in_process = InProcess(checkpoint)
        tokens_per_clip = in_process.policy.num_codebooks * in_process.policy.frames_for(config.duration_s)
        baseline_before = in_process.run(prompts[:half], config.duration_s)

        batching = {
            BATCHED: BatchingConfig(
                max_batch_size=16, preferred_batch_sizes=[4, 8, 16], max_queue_delay_us=5_000, instance_count=1
            ),
            UNBATCHED: BatchingConfig(
                max_batch_size=1, preferred_batch_sizes=[1], max_queue_delay_us=0, instance_count=1
            ),
        }
        stack = Stack(free_port_settings(data_dir / "stack"), components=[c for c in COMPONENTS if c.name != "tansu"])
        info = stack.up()
        levels = []
        try:
            for model, model_batching in batching.items():
                install_version(info.triton_repo, 1, checkpoint, model, model_batching)
                load(info.triton_http_url, model)
            for concurrency in config.concurrency:
                level: dict = {"concurrency": concurrency}
                for model in (UNBATCHED, BATCHED):
                    latencies, wall, batch_sizes = asyncio.run(
                        _triton_level(
                            info.triton_grpc_url,
                            model,
                            prompts,
                            concurrency,
                            config.duration_s,
                            lambda model=model: triton_batch_counts(info.triton_http_url, model),
                        )
                    )
                    key = "triton_batched" if model == BATCHED else "triton_unbatched"
                    level[key] = summary(latencies, wall, config.duration_s, tokens_per_clip) | {
                        "triton_batch_sizes": batch_sizes,
                        "load_average_1m": round(os.getloadavg()[0], 2),
                    }
                    log.info("bench_musicgen.level", model=model, concurrency=concurrency, **level[key])
                level["batched_vs_unbatched"] = round(
                    level["triton_batched"]["clips_per_s"] / level["triton_unbatched"]["clips_per_s"], 2
                )
                levels.append(level)
        finally:
            stack.down()
        baseline_after = in_process.run(prompts[half:], config.duration_s)

    baseline = summary(
        baseline_before[0] + baseline_after[0],
        baseline_before[1] + baseline_after[1],
        config.duration_s,
        tokens_per_clip,
    )
    baseline["clips_per_s_before_and_after"] = [
        round(len(lat) / wall, 3) for lat, wall in (baseline_before, baseline_after)
    ]
    baseline["load_average_1m"] = round(os.getloadavg()[0], 2)
    for level in levels:
        for key in ("triton_batched", "triton_unbatched"):
            level[key]["ratio_vs_in_process"] = round(level[key]["clips_per_s"] / baseline["clips_per_s"], 2)

    policy = in_process.policy
    results = {
        "benchmark": "serving_musicgen",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "checkpoint": str(config.checkpoint)
        if config.checkpoint
        else "tiny random MusicGen (musicrl.models.tiny_pretrained)",
        "policy": {
            "kind": policy.kind,
            "sample_rate": policy.sample_rate,
            "frame_rate": policy.frame_rate,
            "num_codebooks": policy.num_codebooks,
            "guidance_scale": getattr(policy, "guidance_scale", None),
            "parameters": sum(p.numel() for p in policy.parameters()),
        },
        "duration_s": config.duration_s,
        "frames_per_clip": policy.frames_for(config.duration_s),
        "tokens_per_clip": tokens_per_clip,
        "clips_per_level": config.clips_per_level,
        "triton": {
            name: {
                "max_batch_size": b.max_batch_size,
                "preferred_batch_sizes": b.preferred_batch_sizes,
                "max_queue_delay_us": b.max_queue_delay_us,
                "instances": b.instance_count,
            }
            for name, b in batching.items()
        },
        "in_process_unbatched": baseline,
        "levels": levels,
        "batched_vs_unbatched_at_max_concurrency": levels[-1]["batched_vs_unbatched"],
    }
    config.output.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(config.output.read_text()) if config.output.is_file() else {}
    # The RL step's numbers (benchmarks/rl_step_musicgen.py, under "rl_step") stay in the file.
    config.output.write_text(
        json.dumps({k: v for k, v in existing.items() if k == "rl_step"} | results, indent=2) + "\n"
    )
    return results
