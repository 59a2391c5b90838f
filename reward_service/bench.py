"""Benchmark: clips per second with micro-batching versus one-by-one scoring.

Both modes run the real service (``musicrl reward serve`` in a subprocess, the
models of the registry) in the same run and on the same clips; only
``MUSICRL_REWARD_MAX_BATCH_SIZE`` differs (1 for one-by-one). Each client
sends one clip per request, back to back, so batches can only form across
concurrent requests. Results go to ``results/rewards.json`` and a plot next
to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
from rich.console import Console
from rich.table import Table

from musicrl.audio import formats
from musicrl.corpus.dataset import make_corpus
from musicrl.stack.processes import free_port
from reward_service.settings import RewardSettings

console = Console(stderr=True)
MODES = {"one_by_one": 1}  # the batched mode's size comes from the config


@dataclass
class BenchConfig:
    clients: list[int] = field(default_factory=lambda: [1, 8, 32])
    seconds: float = 8.0
    warmup_s: float = 1.5
    clip_s: float = 10.0
    n_clips: int = 64
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    source: str = "tokens"
    out: Path = Path("results/rewards.json")
    private_store: bool = False


@dataclass
class Point:
    mode: str
    clients: int
    clips: int
    errors: int
    seconds: float
    clips_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    mean_batch_size: float


def _items(config: BenchConfig, settings: RewardSettings) -> list[dict]:
    records = make_corpus(config.n_clips, seed=7, split="test", duration_s=config.clip_s)
    if config.source == "tokens":
        return [{"prompt": r.caption, "tokens": r.tokens.tolist()} for r in records]
    if config.source == "audio_b64":
        return [
            {"prompt": r.caption, "audio_b64": base64.b64encode(formats.encode_audio(r.render(), 16000)).decode()}
            for r in records
        ]
    if config.source == "clip_id":
        from musicrl.storage import ObjectStore

        store = ObjectStore(settings)
        items = []
        for i, r in enumerate(records):
            clip_id = f"{i:032x}"
            store.put_bytes(settings.bucket_clips, f"clips/{clip_id}.wav", formats.encode_audio(r.render(), 16000), "audio/wav")
            items.append({"prompt": r.caption, "clip_id": clip_id})
        return items
    raise ValueError(f"unknown source {config.source!r}: tokens, audio_b64 or clip_id")


@contextmanager
def _server(settings: RewardSettings, max_batch_size: int, max_wait_ms: float) -> Iterator[str]:
    port = free_port("127.0.0.1")
    env = os.environ | {
        "MUSICRL_S3_ENDPOINT": settings.s3_endpoint,
        "MUSICRL_S3_ACCESS_KEY": settings.s3_access_key,
        "MUSICRL_S3_SECRET_KEY": settings.s3_secret_key,
        "MUSICRL_BUCKET_MODELS": settings.bucket_models,
        "MUSICRL_BUCKET_CLIPS": settings.bucket_clips,
        "MUSICRL_REWARD_PORT": str(port),
        "MUSICRL_REWARD_MAX_BATCH_SIZE": str(max_batch_size),
        "MUSICRL_REWARD_MAX_WAIT_MS": str(max_wait_ms),
        "MUSICRL_REWARD_QUEUE_MAX_ITEMS": "4096",
        "MUSICRL_REWARD_POLL_INTERVAL_S": "0",
        "MUSICRL_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([sys.executable, "-m", "musicrl.cli", "reward", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the reward service exited with code {process.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the reward service did not become ready in 180 s")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _batch_counts(url: str) -> tuple[float, float]:
    """(sum, count) of the service's batch size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("musicrl_reward_batch_size_sum", "musicrl_reward_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("musicrl_reward_batch_size_sum", 0.0), values.get("musicrl_reward_batch_size_count", 0.0)


async def _load(url: str, items: list[dict], clients: int, warmup_s: float, seconds: float) -> tuple[int, int, list[float], float]:
    latencies: list[float] = []
    done = errors = 0
    measuring = False
    stop_at = time.monotonic() + warmup_s + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal done, errors
        k = index
        while time.monotonic() < stop_at:
            item = items[k % len(items)]
            k += clients
            started = time.monotonic()
            response = await http.post("/v1/scores", json={"items": [item]})
            if measuring:
                if response.status_code == 200:
                    done += 1
                    latencies.append(time.monotonic() - started)
                else:
                    errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [asyncio.create_task(client(i, http)) for i in range(clients)]
        await asyncio.sleep(warmup_s)
        measuring = True
        started = time.monotonic()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    return done, errors, latencies, elapsed


def _measure(url: str, mode: str, items: list[dict], clients: int, config: BenchConfig) -> Point:
    before = _batch_counts(url)
    done, errors, latencies, elapsed = asyncio.run(_load(url, items, clients, config.warmup_s, config.seconds))
    after = _batch_counts(url)
    batches = after[1] - before[1]
    latencies_ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    return Point(
        mode=mode,
        clients=clients,
        clips=done,
        errors=errors,
        seconds=round(elapsed, 3),
        clips_per_s=round(done / elapsed, 2),
        latency_p50_ms=round(statistics.median(latencies_ms), 1),
        latency_p95_ms=round(latencies_ms[int(0.95 * (len(latencies_ms) - 1))], 1),
        mean_batch_size=round((after[0] - before[0]) / batches, 2) if batches else 0.0,
    )


@contextmanager
def _private_store() -> Iterator[RewardSettings]:
    """A throw-away SeaweedFS with the default reward models published into it."""
    from musicrl.models.defaults import publish_default_rewards
    from musicrl.registry import Registry
    from musicrl.stack import Stack, free_port_settings
    from musicrl.stack.stack import COMPONENTS
    from musicrl.storage import ObjectStore

    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        stack = Stack(free_port_settings(Path(tmp)), [c for c in COMPONENTS if c.name == "seaweedfs"])
        info = stack.up()
        try:
            settings = info.settings_for(RewardSettings)
            store = ObjectStore(settings)
            store.ensure_buckets()
            publish_default_rewards(Registry(store))
            yield settings
        finally:
            stack.down()


def run_bench(config: BenchConfig) -> dict:
    with _private_store() if config.private_store else _nullcontext(RewardSettings()) as settings:
        items = _items(config, settings)
        modes = {"one_by_one": 1, "batched": config.max_batch_size}
        points: list[Point] = []
        for mode, size in modes.items():
            console.print(f"[bold]{mode}[/] (max batch size {size}): starting the service")
            with _server(settings, size, config.max_wait_ms) as url:
                for clients in config.clients:
                    point = _measure(url, mode, items, clients, config)
                    points.append(point)
                    console.print(
                        f"  {clients:>3} clients: {point.clips_per_s:8.2f} clips/s, p50 {point.latency_p50_ms} ms, "
                        f"mean batch {point.mean_batch_size}, errors {point.errors}"
                    )
    by = {(p.mode, p.clients): p for p in points}
    speedup = {
        str(c): round(by["batched", c].clips_per_s / by["one_by_one", c].clips_per_s, 2)
        for c in config.clients
        if by["one_by_one", c].clips_per_s > 0
    }
    result = {
        "benchmark": "reward_service_micro_batching",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "points": [asdict(p) for p in points],
        "speedup_batched_over_one_by_one": speedup,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    _table(points, speedup)
    _plot(points, config.out.with_suffix(".png"))
    console.print(f"wrote {config.out} and {config.out.with_suffix('.png')}")
    return result


@contextmanager
def _nullcontext(value):
    yield value


def _table(points: list[Point], speedup: dict[str, float]) -> None:
    table = Table(title="reward service: clips/s")
    for column in ("clients", "one-by-one", "batched", "speedup", "mean batch", "p50 ms (batched)"):
        table.add_column(column, justify="right")
    by = {(p.mode, p.clients): p for p in points}
    for clients in sorted({p.clients for p in points}):
        one, batched = by["one_by_one", clients], by["batched", clients]
        table.add_row(
            str(clients), f"{one.clips_per_s:.1f}", f"{batched.clips_per_s:.1f}", f"{speedup.get(str(clients), 0):.2f}x",
            f"{batched.mean_batch_size:.1f}", f"{batched.latency_p50_ms:.0f}",
        )
    Console().print(table)


def _plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, label in (("one_by_one", "one-by-one"), ("batched", "micro-batched")):
        xs = [p.clients for p in points if p.mode == mode]
        ax.plot(xs, [p.clips_per_s for p in points if p.mode == mode], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("clips / s")
    ax.set_title("Reward service throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
