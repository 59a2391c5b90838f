"""``musicrl gateway bench``: batched serving through the gateway against unbatched in-process generation.

One run measures, on the same machine and checkpoint:

- the baseline: each request's prompt embedded and each clip sampled (batch of
  one) and decoded in this process, one request at a time, one thread; half of
  its requests run before the gateway levels and half after;
- the gateway (a separate ``musicrl gateway serve`` process) in front of Triton
  (one single-threaded instance per core, dynamic batching) on a private stack
  of real servers, at each concurrency level, storing every clip.

Throughput is in requests per second, the real-time factor is seconds of audio
produced per wall-clock second; ``ratio`` is gateway throughput over baseline
throughput. Triton's batch sizes come from its statistics (per level, as deltas).
The machine's 1-minute load average is recorded with each measurement: on a
shared machine it says how much of the two cores the run actually had.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from musicrl.logging import get_logger

log = get_logger(__name__)


@dataclass
class BenchConfig:
    checkpoint: Path
    concurrency: list[int]
    requests_per_level: int
    duration_s: float
    candidates: int
    output: Path


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    from musicrl.corpus.attributes import sample_attributes
    from musicrl.corpus.captions import caption

    rng = random.Random(seed)
    return [caption(sample_attributes(rng), rng) for _ in range(n)]


def latency_summary(latencies_s: list[float], wall_s: float, audio_s: float, requests: int) -> dict:
    ms = np.asarray(latencies_s) * 1e3
    return {
        "requests": requests,
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(requests / wall_s, 3),
        "real_time_factor": round(audio_s / wall_s, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
    }


class UnbatchedBaseline:
    """The same generations in this process, one request and one clip at a time, on one thread."""

    def __init__(self, checkpoint: Path, duration_s: float, candidates: int):
        import torch

        from musicrl.audio import codec
        from musicrl.models.generator import load_generator
        from musicrl.text import load_text_encoder

        torch.set_num_threads(1)
        self.model, _ = load_generator(checkpoint)
        self.encoder = load_text_encoder(self.model.config.text_encoder)
        self.n_frames = codec.frames_for(duration_s)
        self.candidates = candidates
        self.encoder.embed(["warm-up"])
        self.model.sample(torch.zeros(1, self.model.config.text_dim), self.n_frames, seeds=[0])

    def run(self, prompts: list[str], first_seed: int) -> tuple[list[float], float]:
        import torch

        from musicrl.audio import codec
        from serving.services.generations import candidate_seeds

        latencies = []
        start = time.perf_counter()
        for i, prompt in enumerate(tqdm(prompts, desc="baseline (in-process, unbatched)")):
            t0 = time.perf_counter()
            cond = torch.from_numpy(self.encoder.embed([prompt]))
            for seed in candidate_seeds(first_seed + i, self.candidates):
                tokens, _ = self.model.sample(cond, self.n_frames, temperature=0.99, seeds=[seed])
                codec.decode(tokens[0].numpy())
            latencies.append(time.perf_counter() - t0)
        return latencies, time.perf_counter() - start


async def _load_level(
    url: str, prompts: list[str], concurrency: int, duration_s: float, candidates: int, api_key: str | None = None
) -> tuple[list[float], float, dict[str, float]]:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    latencies: list[float] = []
    timings: list[dict[str, float]] = []
    progress = tqdm(total=len(prompts), desc=f"gateway, {concurrency} clients")

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, prompt = queue.get_nowait()
            t0 = time.perf_counter()
            body = {"prompt": prompt, "n": candidates, "duration_s": duration_s, "seed": i}
            response = await http.post("/v1/generations", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            timings.append(response.json()["timings"])
            progress.update()

    limits = httpx.Limits(max_connections=concurrency)
    from serving.client import api_key_headers

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=api_key_headers(api_key)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    progress.close()
    breakdown = {f"mean_{name}": round(float(np.mean([t[name] for t in timings])), 1) for name in timings[0]}
    return latencies, wall, breakdown


def triton_batch_counts(triton_http_url: str, model_name: str) -> dict[int, int]:
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(triton_http_url)
    try:
        stats = client.get_inference_statistics(model_name)["model_stats"]
    finally:
        client.close()
    counts: dict[int, int] = {}
    for version in stats:
        for batch in version.get("batch_stats", []):
            size = int(batch["batch_size"])
            counts[size] = counts.get(size, 0) + int(batch["compute_infer"]["count"])
    return counts


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[str, int]:
    return {str(size): after[size] - before.get(size, 0) for size in sorted(after) if after[size] - before.get(size, 0)}


def run_bench(config: BenchConfig) -> dict:
    from musicrl.stack import COMPONENTS, Stack, free_port_settings
    from musicrl.stack.processes import free_port, serve_process
    from serving.model_repository import BatchingConfig, install_version, load
    from serving.settings import GatewaySettings

    settings = GatewaySettings()
    prompts = bench_prompts(config.requests_per_level)
    audio_s = len(prompts) * config.candidates * config.duration_s
    # Half the baseline runs before the gateway levels and half after, so that a change in
    # the machine's load during the run (it is shared) biases neither side.
    baseline_runner = UnbatchedBaseline(config.checkpoint, config.duration_s, config.candidates)
    half = len(prompts) // 2
    baseline_before = baseline_runner.run(prompts[:half], 0)

    with tempfile.TemporaryDirectory(prefix="musicrl-bench-") as tmp:
        data_dir = Path(tmp)
        stack = Stack(free_port_settings(data_dir), components=[c for c in COMPONENTS if c.name != "tansu"])
        info = stack.up()
        try:
            batching = BatchingConfig.from_settings(settings)
            install_version(info.triton_repo, 1, config.checkpoint, settings.triton_model_name, batching)
            load(info.triton_http_url, settings.triton_model_name)
            port = free_port("127.0.0.1")
            url = f"http://127.0.0.1:{port}"
            with serve_process(
                [sys.executable, "-m", "musicrl.cli", "gateway", "serve", "--port", str(port)],
                f"{url}/readyz",
                name="gateway",
                env={**os.environ, **info.env(), "MUSICRL_LOG_LEVEL": "WARNING"},
                log_path=data_dir / "gateway.log",
            ):
                warmup = bench_prompts(4, seed=1)
                asyncio.run(_load_level(url, warmup, 4, config.duration_s, config.candidates, info.api_key))

                levels = []
                for concurrency in config.concurrency:
                    before = triton_batch_counts(info.triton_http_url, settings.triton_model_name)
                    latencies, wall, breakdown = asyncio.run(
                        _load_level(url, prompts, concurrency, config.duration_s, config.candidates, info.api_key)
                    )
                    after = triton_batch_counts(info.triton_http_url, settings.triton_model_name)
                    level = {"concurrency": concurrency} | latency_summary(latencies, wall, audio_s, len(prompts))
                    level["triton_batch_sizes"] = _delta(after, before)
                    level["gateway_timings_ms"] = breakdown
                    level["load_average_1m"] = round(os.getloadavg()[0], 2)
                    levels.append(level)
                    log.info("bench.level", **level)
        finally:
            stack.down()

    baseline_after = baseline_runner.run(prompts[half:], half)
    baseline = latency_summary(
        baseline_before[0] + baseline_after[0], baseline_before[1] + baseline_after[1], audio_s, len(prompts)
    )
    baseline["throughput_rps_before_and_after"] = [
        round(len(latencies) / wall, 3) for latencies, wall in (baseline_before, baseline_after)
    ]
    baseline["load_average_1m"] = round(os.getloadavg()[0], 2)
    log.info("bench.baseline", **baseline)
    for level in levels:
        level["ratio_vs_baseline"] = round(level["throughput_rps"] / baseline["throughput_rps"], 2)

    results = {
        "benchmark": "serving",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "checkpoint": str(config.checkpoint),
        "duration_s": config.duration_s,
        "candidates_per_request": config.candidates,
        "requests_per_level": config.requests_per_level,
        "triton": {
            "instances": batching.instance_count,
            "max_batch_size": batching.max_batch_size,
            "preferred_batch_sizes": batching.preferred_batch_sizes,
            "max_queue_delay_us": batching.max_queue_delay_us,
        },
        "baseline_unbatched_in_process": baseline,
        "gateway": levels,
        "ratio_at_max_concurrency": levels[-1]["ratio_vs_baseline"],
    }
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, config.output.with_suffix(".png"))
    _print_table(results)
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["gateway"]
    x = [level["concurrency"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [level["real_time_factor"] for level in levels], "o-", label="gateway + Triton (batched)")
    left.axhline(
        results["baseline_unbatched_in_process"]["real_time_factor"],
        color="gray",
        ls="--",
        label="in-process, unbatched",
    )
    left.set(
        xscale="log",
        xticks=x,
        xticklabels=[str(c) for c in x],
        xlabel="concurrent clients",
        ylabel="seconds of audio per second",
        title="Real-time factor",
    )
    left.legend()
    right.plot(x, [level["p50_ms"] for level in levels], "o-", label="p50")
    right.plot(x, [level["p95_ms"] for level in levels], "s-", label="p95")
    right.axhline(results["baseline_unbatched_in_process"]["p50_ms"], color="gray", ls="--", label="baseline p50")
    right.set(
        xscale="log",
        xticks=x,
        xticklabels=[str(c) for c in x],
        xlabel="concurrent clients",
        ylabel="ms per request",
        title="Request latency",
    )
    right.legend()
    for ax in (left, right):
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"serving benchmark ({results['duration_s']} s clips, {results['candidates_per_request']} per request)"
    )
    for column in ("clients", "req/s", "RTF", "p50 ms", "p95 ms", "ratio", "Triton batch sizes"):
        table.add_column(column)
    base = results["baseline_unbatched_in_process"]
    table.add_row(
        "baseline",
        str(base["throughput_rps"]),
        str(base["real_time_factor"]),
        str(base["p50_ms"]),
        str(base["p95_ms"]),
        "1.0",
        "-",
    )
    for level in results["gateway"]:
        table.add_row(
            str(level["concurrency"]),
            str(level["throughput_rps"]),
            str(level["real_time_factor"]),
            str(level["p50_ms"]),
            str(level["p95_ms"]),
            str(level["ratio_vs_baseline"]),
            json.dumps(level["triton_batch_sizes"]),
        )
    Console().print(table)
