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
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from musicrl.audio import codec, formats
from musicrl.corpus.dataset import make_corpus
from musicrl.stack.processes import free_port, serve_process
from reward_service.settings import RewardSettings

console = Console(stderr=True)


@dataclass
class BenchConfig:
    clients: list[int] = field(default_factory=lambda: [1, 8, 32])
    seconds: float = 8.0
    rounds: int = 3
    warmup_s: float = 1.5
    clip_s: float = 10.0
    n_clips: int = 64
    max_batch_size: int = 32
    max_wait_ms: float = RewardSettings.model_fields["reward_max_wait_ms"].default
    source: str = "tokens"
    out: Path = Path("results/rewards.json")
    private_store: bool = False
    checkpoints: Path = Path("checkpoints")


@dataclass
class Point:
    mode: str
    clients: int
    round: int
    clips: int
    errors: int
    seconds: float
    clips_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    mean_batch_size: float
    model_ms_per_clip: float  # time in the batch thread (features + models) per clip
    input_ms_per_clip: float  # time fetching and decoding inputs per clip
    server_cpu_ms_per_clip: float  # CPU seconds of the whole service process (every thread) per clip


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
        return _store_like_the_gateway(records, settings)
    raise ValueError(f"unknown source {config.source!r}: tokens, audio_b64 or clip_id")


def _store_like_the_gateway(records, settings: RewardSettings) -> list[dict]:
    """Each clip as the gateway stores it: the WAV stamped with its generation, and the record with its tokens."""
    import uuid

    from musicrl.schemas.generation import (
        CLIP_GENERATION_ID_METADATA,
        GenerationRecord,
        clip_audio_key,
        generation_key,
    )
    from musicrl.storage import ObjectStore

    store = ObjectStore(settings)
    items = []
    for record in records:
        generation_id, clip_id = uuid.uuid4().hex, uuid.uuid4().hex
        wav = formats.encode_audio(record.render(), 16000)
        store.put_bytes(
            settings.bucket_clips,
            clip_audio_key(clip_id),
            wav,
            "audio/wav",
            metadata={CLIP_GENERATION_ID_METADATA: generation_id},
        )
        duration_s = len(record.tokens) / codec.FRAME_RATE
        generation = GenerationRecord(
            generation_id=generation_id,
            prompt=record.caption,
            params={"duration_s": duration_s, "temperature": 0.99},
            clips=[
                {
                    "clip_id": clip_id,
                    "index": 0,
                    "seed": record.seed,
                    "policy_version": "1",
                    "tokens": record.tokens.tolist(),
                    "logprobs": [0.0] * len(record.tokens),
                    "duration_s": duration_s,
                    "sample_rate": 16000,
                    "audio_key": clip_audio_key(clip_id),
                }
            ],
        )
        store.put_json(settings.bucket_generations, generation_key(generation_id), generation.to_json())
        items.append({"prompt": record.caption, "clip_id": clip_id})
    return items


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
    url = f"http://127.0.0.1:{port}"
    with serve_process(
        [sys.executable, "-m", "musicrl.cli", "reward", "serve"],
        f"{url}/readyz",
        name="reward service",
        env=env,
        timeout_s=180,
        stop_timeout_s=20,
    ):
        yield url


_COUNTERS = (
    "musicrl_reward_batch_size_sum",  # clips scored
    "musicrl_reward_batch_size_count",  # batches
    "musicrl_reward_batch_seconds_sum",  # time in the models
    "musicrl_reward_input_seconds_sum",  # time fetching and decoding inputs
    "process_cpu_seconds_total",  # CPU of the service process, all threads
)


def _counters(url: str) -> dict[str, float]:
    """The service's cumulative counters that the benchmark turns into per-clip costs."""
    values = dict.fromkeys(_COUNTERS, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        name = name.split("{", 1)[0]
        if name in values:
            values[name] += float(value)
    return values


async def _load(
    url: str, items: list[dict], clients: int, warmup_s: float, seconds: float
) -> tuple[int, int, list[float], float]:
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


def _measure(url: str, mode: str, items: list[dict], clients: int, round_: int, config: BenchConfig) -> Point:
    before = _counters(url)
    done, errors, latencies, elapsed = asyncio.run(_load(url, items, clients, config.warmup_s, config.seconds))
    after = _counters(url)
    delta = {name: after[name] - before[name] for name in _COUNTERS}
    scored = delta["musicrl_reward_batch_size_sum"]
    latencies_ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    return Point(
        mode=mode,
        clients=clients,
        round=round_,
        clips=done,
        errors=errors,
        seconds=round(elapsed, 3),
        clips_per_s=round(done / elapsed, 2),
        latency_p50_ms=round(statistics.median(latencies_ms), 1),
        latency_p95_ms=round(latencies_ms[int(0.95 * (len(latencies_ms) - 1))], 1),
        mean_batch_size=round(scored / delta["musicrl_reward_batch_size_count"], 2) if scored else 0.0,
        model_ms_per_clip=round(1000 * delta["musicrl_reward_batch_seconds_sum"] / scored, 2) if scored else 0.0,
        input_ms_per_clip=round(1000 * delta["musicrl_reward_input_seconds_sum"] / scored, 2) if scored else 0.0,
        server_cpu_ms_per_clip=round(1000 * delta["process_cpu_seconds_total"] / scored, 2) if scored else 0.0,
    )


def publish_checkpoints(registry, checkpoints: Path) -> dict[str, str]:
    """Publish ``checkpoints/{text_adherence,quality,preference}`` and make them current."""
    versions = {}
    for component in ("text_adherence", "quality", "preference"):
        directory = checkpoints / component
        if not directory.is_dir():
            if component == "preference":
                continue
            raise FileNotFoundError(f"no {component} checkpoint in {checkpoints}: train the default suite first")
        kind = f"reward/{component}"
        versions[component] = registry.publish(kind, directory, lineage={"source": str(directory)})
        registry.set_current(kind, versions[component])
    return versions


@contextmanager
def _private_store(checkpoints: Path) -> Iterator[RewardSettings]:
    """A throw-away SeaweedFS holding the default reward models."""
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
            console.print(f"published {publish_checkpoints(Registry(store), checkpoints)} into a private object store")
            yield settings
        finally:
            stack.down()


def _model_stage(
    settings: RewardSettings, items: list[dict], batch_sizes: list[int], seconds: float
) -> tuple[dict, dict]:
    """Clips/s of the batch thread's work alone (features + models, no HTTP), by batch size.

    This isolates what micro-batching can change: everything outside the models
    costs the same per clip whatever the batch size.
    """
    from musicrl.schemas.scores import COMPONENTS, ScoreItem
    from reward_service.services.runtime import default_dependencies
    from reward_service.services.scorer import Task

    deps = default_dependencies(settings)
    deps.holder.reload()
    snapshot = deps.holder.snapshot()
    components = tuple(c for c in COMPONENTS if c in snapshot.versions)
    tasks = [
        Task(deps.resolver.resolve(ScoreItem(**item), i, "preference" in components), components)
        for i, item in enumerate(items)
    ]
    deps.score_batch(snapshot, tasks)  # warm: prompt cache, first session runs
    rates = {}
    for size in batch_sizes:
        # One untimed pass at this batch size first: the first runs of a new shape are slow.
        for start in range(0, len(tasks), size):
            deps.score_batch(snapshot, tasks[start : start + size])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            start = done % len(tasks)
            batch = (tasks[start:] + tasks[:start])[:size]
            deps.score_batch(snapshot, batch)
            done += size
        rates[str(size)] = round(done / (time.perf_counter() - started), 2)
        console.print(f"  model stage, batch {size:>3}: {rates[str(size)]:8.2f} clips/s")
    return rates, _stage_breakdown(snapshot.models, settings.reward_text_encoder, items, batch_sizes)


def _stage_breakdown(
    models, text_encoder: str, items: list[dict], batch_sizes: list[int]
) -> dict[str, dict[str, float]]:
    """Milliseconds per clip of each step of scoring, one thread, at each batch size.

    Says which work batching can shrink (per-call overheads) and which it cannot (the
    models' arithmetic per clip, input decoding, which is per item).
    """
    import numpy as np

    from musicrl.audio.features import log_mel
    from musicrl.text import load_text_encoder

    items = [item for item in items if "tokens" in item]
    if not items:
        return {}
    tokens = [np.asarray(item["tokens"], dtype=np.int64) for item in items]
    prompts = [item["prompt"] for item in items]
    encoder = load_text_encoder(text_encoder)

    def per_clip(run, n: int, repeats: int = 2) -> float:
        run()  # warm
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        return round(1000 * (time.perf_counter() - started) / (repeats * n), 3)

    codec.SEGMENT_CACHE.clear()
    started = time.perf_counter()
    waves = [codec.decode(t) for t in tokens]
    cold_decode = round(1000 * (time.perf_counter() - started) / len(tokens), 3)
    mels = [log_mel(w) for w in waves]
    cond = encoder.embed(prompts)
    per_item = {  # the same at every batch size: done per item
        "decode_cold_cache": cold_decode,
        "decode": per_clip(lambda: [codec.decode(t) for t in tokens], len(tokens)),
        "log_mel": per_clip(lambda: [log_mel(w) for w in waves], len(tokens)),
    }
    stages: dict[str, dict[str, float]] = {}
    for size in batch_sizes:
        chunks = [range(start, min(start + size, len(tokens))) for start in range(0, len(tokens), size)]
        row = per_item | {
            "text_embedding_uncached": per_clip(
                lambda chunks=chunks: [encoder.embed([prompts[i] for i in c]) for c in chunks], len(prompts), 1
            ),
            "text_adherence": per_clip(
                lambda chunks=chunks: [
                    models["text_adherence"].embed_audio(np.stack([mels[i] for i in c])) for c in chunks
                ],
                len(mels),
            ),
            "quality": per_clip(
                lambda chunks=chunks: [models["quality"].mos(np.stack([mels[i] for i in c])) for c in chunks], len(mels)
            ),
        }
        if "preference" in models:
            row["preference"] = per_clip(
                lambda chunks=chunks: [
                    models["preference"].score(cond[list(c)], [tokens[i] for i in c]) for c in chunks
                ],
                len(tokens),
            )
        stages[str(size)] = row
        console.print(f"  stages, batch {size:>3}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()) + " ms/clip")
    return stages


def run_bench(config: BenchConfig) -> dict:
    load_start = round(os.getloadavg()[0], 2)
    with _private_store(config.checkpoints) if config.private_store else nullcontext(RewardSettings()) as settings:
        items = _items(config, settings)
        modes = {"one_by_one": 1, "batched": config.max_batch_size}
        console.print("[bold]model stage alone[/] (in this process)")
        model_stage, stages = _model_stage(settings, items, sorted({1, 8, config.max_batch_size}), config.seconds / 2)
        points: list[Point] = []
        with ExitStack() as servers:
            # Both services run side by side and the modes alternate at each client count, so a
            # change in the machine's other load during the run hits both modes alike.
            urls = {}
            for mode, size in modes.items():
                console.print(f"[bold]{mode}[/] (max batch size {size}): starting the service")
                urls[mode] = servers.enter_context(_server(settings, size, config.max_wait_ms))
                # Every prompt embedded and every session run once before anything is timed.
                for start in range(0, len(items), 16):
                    httpx.post(
                        f"{urls[mode]}/v1/scores", json={"items": items[start : start + 16]}, timeout=300
                    ).raise_for_status()
            model_versions = httpx.get(f"{urls['batched']}/readyz", timeout=10).json()["model_versions"]
            runs = [(c, r, mode) for c in config.clients for r in range(config.rounds) for mode in urls]
            for clients, round_, mode in tqdm(runs, desc="measurements", file=sys.stderr):
                point = _measure(urls[mode], mode, items, clients, round_, config)
                points.append(point)
                console.print(
                    f"  {mode:>10} {clients:>3} clients, round {round_}: {point.clips_per_s:8.2f} clips/s, "
                    f"p50 {point.latency_p50_ms} ms, mean batch {point.mean_batch_size}, "
                    f"models {point.model_ms_per_clip} ms/clip, inputs {point.input_ms_per_clip} ms/clip, "
                    f"errors {point.errors}"
                )
    summary = _summarise(points)
    by = {(row["mode"], row["clients"]): row for row in summary}
    speedup = {
        str(c): round(by["batched", c]["clips_per_s"] / by["one_by_one", c]["clips_per_s"], 2)
        for c in config.clients
        if by["one_by_one", c]["clips_per_s"] > 0
    }
    # CPU per clip tells the modes' efficiency apart even when other work on the machine decides
    # how much CPU the service gets (and so its clips/s).
    cpu_ratio = {
        str(c): round(by["one_by_one", c]["server_cpu_ms_per_clip"] / by["batched", c]["server_cpu_ms_per_clip"], 2)
        for c in config.clients
        if by["batched", c]["server_cpu_ms_per_clip"] > 0
    }
    result = {
        "benchmark": "reward_service_micro_batching",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            # Other work on the machine shifts absolute numbers; both modes share the same conditions.
            "load_average_1m_start_end": [load_start, round(os.getloadavg()[0], 2)],
        },
        "model_versions": model_versions,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "summary_medians_over_rounds": summary,
        "points": [asdict(p) for p in points],
        "speedup_batched_over_one_by_one": speedup,
        "server_cpu_per_clip_one_by_one_over_batched": cpu_ratio,
        "model_stage_clips_per_s_by_batch_size": model_stage,
        "stage_ms_per_clip_by_batch_size": stages,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    _table(summary, speedup)
    _plot(summary, config.out.with_suffix(".png"))
    console.print(f"wrote {config.out} and {config.out.with_suffix('.png')}")
    return result


def _summarise(points: list[Point]) -> list[dict]:
    """Median over rounds of each (mode, clients) measurement, with the per-round throughputs."""
    rows = []
    for mode, clients in dict.fromkeys((p.mode, p.clients) for p in points):
        runs = [p for p in points if p.mode == mode and p.clients == clients]

        def median(name: str, runs: list[Point] = runs) -> float:
            return round(statistics.median(getattr(p, name) for p in runs), 2)

        rows.append(
            {
                "mode": mode,
                "clients": clients,
                "clips_per_s": median("clips_per_s"),
                "clips_per_s_rounds": [p.clips_per_s for p in runs],
                "errors": sum(p.errors for p in runs),
                "mean_batch_size": median("mean_batch_size"),
                "model_ms_per_clip": median("model_ms_per_clip"),
                "input_ms_per_clip": median("input_ms_per_clip"),
                "server_cpu_ms_per_clip": median("server_cpu_ms_per_clip"),
                "latency_p50_ms": median("latency_p50_ms"),
                "latency_p95_ms": median("latency_p95_ms"),
            }
        )
    return rows


def _table(summary: list[dict], speedup: dict[str, float]) -> None:
    table = Table(title="reward service: clips/s (median over rounds)")
    for column in (
        "clients",
        "one-by-one",
        "batched",
        "speedup",
        "mean batch",
        "server CPU ms/clip (1 / batched)",
        "p50 ms (1 / batched)",
    ):
        table.add_column(column, justify="right")
    by = {(row["mode"], row["clients"]): row for row in summary}
    for clients in sorted({row["clients"] for row in summary}):
        one, batched = by["one_by_one", clients], by["batched", clients]
        table.add_row(
            str(clients),
            f"{one['clips_per_s']:.1f}",
            f"{batched['clips_per_s']:.1f}",
            f"{speedup.get(str(clients), 0):.2f}x",
            f"{batched['mean_batch_size']:.1f}",
            f"{one['server_cpu_ms_per_clip']:.1f} / {batched['server_cpu_ms_per_clip']:.1f}",
            f"{one['latency_p50_ms']:.0f} / {batched['latency_p50_ms']:.0f}",
        )
    Console().print(table)


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, label in (("one_by_one", "one-by-one"), ("batched", "micro-batched")):
        rows = [row for row in summary if row["mode"] == mode]
        xs = [row["clients"] for row in rows]
        ys = [row["clips_per_s"] for row in rows]
        low = [y - min(row["clips_per_s_rounds"]) for y, row in zip(ys, rows)]
        high = [max(row["clips_per_s_rounds"]) - y for y, row in zip(ys, rows)]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("clips / s (median, range over rounds)")
    ax.set_title("Reward service throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
