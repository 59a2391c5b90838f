"""``musicrl consumer bench``: how fast preferences flow, against a bare kafka-python consumer.

Starts a private SeaweedFS + Tansu in a temporary directory, then measures

1. the feedback consumer (validate, de-duplicate, join, Parquet, ledger,
   dead letters, commits) and a bare ``kafka-python`` consumer (poll and
   count, nothing else) reading the same topic in the same run: events/s of
   each from the first record fetched to the last one handled, and the ratio;
2. end to end: a real gateway process (`musicrl gateway serve`) receives
   ``POST /v1/feedback`` from concurrent clients while the consumer runs;
   events/s from the first POST until the last event is durable in the buffer,
   plus the POST latency percentiles.

Results are merged into ``results/feedback.json`` under ``"benchmark"``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from kafka import KafkaConsumer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from feedback_consumer.consumer import FeedbackConsumer
from feedback_consumer.settings import ConsumerSettings
from feedback_consumer.workload import make_records, make_workload, produce, store_records
from musicrl.kafka import ensure_topics
from musicrl.logging import configure_logging
from musicrl.stack import COMPONENTS, Stack, free_port_settings
from musicrl.stack.processes import free_port, serve_process
from musicrl.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[1]


def update_results(path: Path, keys: list[str], value) -> None:
    """Set ``results[keys[0]][keys[1]]... = value`` in a JSON file, keeping everything else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    node = results
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def _settings(info, tag: str) -> ConsumerSettings:
    return info.settings_for(
        ConsumerSettings,
        topic_preferences=f"bench-{tag}",
        topic_dead_letter=f"bench-{tag}.dlq",
        bucket_buffer=f"bench-{tag}",
        consumer_group_id=f"bench-{tag}",
        consumer_session_timeout_ms=4000,
        consumer_heartbeat_interval_ms=1000,
        consumer_segment_max_age_s=1.0,
        consumer_metrics_port=-1,
        log_level="WARNING",
        log_json=False,
    )


def bare_consumer_rate(settings: ConsumerSettings, n_messages: int) -> dict:
    """Poll the topic in a fresh group and count: the floor any consumer built on kafka-python pays."""
    consumer = KafkaConsumer(
        settings.topic_preferences,
        **settings.kafka_client_options(),
        group_id=f"{settings.consumer_group_id}-bare",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
        max_poll_records=settings.consumer_max_poll_records,
        fetch_max_bytes=settings.consumer_fetch_max_bytes,
        max_partition_fetch_bytes=settings.consumer_max_partition_fetch_bytes,
    )
    seen, first = 0, None
    try:
        with tqdm(total=n_messages, desc="bare kafka-python consumer", unit="ev") as bar:
            while seen < n_messages:
                for records in consumer.poll(timeout_ms=500).values():
                    first = first or time.perf_counter()
                    seen += len(records)
                    bar.update(len(records))
        elapsed = time.perf_counter() - first
        consumer.commit()
    finally:
        consumer.close()
    return {"events": seen, "seconds": round(elapsed, 3), "events_per_s": round(seen / elapsed, 1)}


def _wait_for_total(
    consumer: FeedbackConsumer, thread: threading.Thread, total: str, n: int, desc: str, poll_s: float
) -> None:
    """Show progress until ``consumer.totals[total]`` reaches ``n``; fail at once if the consumer thread died."""
    with tqdm(total=n, desc=desc, unit="ev") as bar:
        while consumer.totals[total] < n:
            if not thread.is_alive():
                raise RuntimeError("the feedback consumer stopped")
            bar.update(consumer.totals[total] - bar.n)
            time.sleep(poll_s)
        bar.update(consumer.totals[total] - bar.n)


def feedback_consumer_rate(settings: ConsumerSettings, store: ObjectStore, n_messages: int) -> dict:
    consumer = FeedbackConsumer(settings, store)
    thread = threading.Thread(target=consumer.run, name="feedback-consumer")
    thread.start()
    try:
        _wait_for_total(consumer, thread, "events", n_messages, "feedback consumer", poll_s=0.05)
        elapsed = time.perf_counter() - consumer.first_record_at
    finally:
        consumer.stop()
        thread.join()
    return {
        "events": consumer.totals["events"],
        "seconds": round(elapsed, 3),
        "events_per_s": round(consumer.totals["events"] / elapsed, 1),
        "accepted": consumer.totals["accepted"],
        "duplicates": consumer.totals["duplicates"],
        "dead_letters": consumer.totals["dead_letters"],
    }


@contextmanager
def running_gateway(
    stack_env: dict[str, str], settings: ConsumerSettings, log_path: Path, vote_token_key: str
) -> Iterator[str]:
    """``musicrl gateway serve`` on a free port for the length of the block; yields its URL."""
    port = free_port()
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("MUSICRL_")}
        | stack_env
        | {
            "MUSICRL_GATEWAY_VOTE_TOKEN_KEY": vote_token_key,  # the bench issues the votes' tokens with it
            "MUSICRL_TOPIC_PREFERENCES": settings.topic_preferences,
            "MUSICRL_TOPIC_DEAD_LETTER": settings.topic_dead_letter,
            "MUSICRL_GATEWAY_PORT": str(port),
            "MUSICRL_GATEWAY_TEXT_ENCODER": "hashing",  # the feedback route embeds nothing; skip loading MiniLM
            "MUSICRL_LOG_LEVEL": "WARNING",
        }
    )
    url = f"http://127.0.0.1:{port}"
    with serve_process(
        [sys.executable, "-m", "musicrl.cli", "gateway", "serve"],
        f"{url}/healthz",
        name="gateway",
        env=env,
        cwd=ROOT,
        log_path=log_path,
    ):
        yield url


async def post_feedback(url: str, bodies: list[dict], concurrency: int, headers: dict[str, str]) -> list[float]:
    latencies: list[float] = []
    queue = list(reversed(bodies))
    bar = tqdm(total=len(bodies), desc="POST /v1/feedback", unit="req")

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            for _ in range(5):
                started = time.perf_counter()
                response = await client.post("/v1/feedback", json=body)
                if response.status_code == 202:
                    latencies.append(time.perf_counter() - started)
                    break
                if response.status_code != 503:
                    raise RuntimeError(f"feedback rejected: {response.status_code} {response.text}")
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            bar.update(1)

    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    bar.close()
    return latencies


def end_to_end_rate(stack_env, settings, store, n_events: int, concurrency: int, workdir: Path) -> dict:
    from musicrl.stack.stack import STACK_KEY_NAME
    from serving.client import API_KEY_ENV, api_key_headers
    from serving.services.vote_tokens import VoteTokens

    rng = random.Random(7)
    records = make_records(max(n_events // 4, 1), rng)
    store_records(store, records)
    # The records did not come through POST /v1/generations, so the bench issues their vote tokens
    # itself, as the gateway would have for the stack's key; each user votes once per generation.
    vote_token_key = uuid.uuid4().hex
    tokens = VoteTokens(vote_token_key.encode(), ttl_s=24 * 3600)
    bodies = []
    for i in range(n_events):
        record = rng.choice(records)
        user_id = f"user-{i}"
        clips = [(clip.clip_id, clip.duration_s) for clip in record.clips]
        bodies.append(
            {
                "event_id": uuid.uuid4().hex,
                "generation_id": record.generation_id,
                "clip_a_id": record.clips[0].clip_id,
                "clip_b_id": record.clips[1].clip_id,
                "choice": rng.choice(["a", "b", "tie"]),
                "listen_a_s": 10.0,
                "listen_b_s": 9.0,
                "user_id": user_id,
                "vote_token": tokens.issue(record.generation_id, clips, STACK_KEY_NAME, user_id)[0],
            }
        )
    with running_gateway(stack_env, settings, workdir / "gateway.log", vote_token_key) as url:
        consumer = FeedbackConsumer(settings, store)
        thread = threading.Thread(target=consumer.run, name="feedback-consumer")
        thread.start()
        try:
            while not consumer.partitions:  # group joined: the clock starts with the first POST
                time.sleep(0.05)
            started = time.perf_counter()
            latencies = asyncio.run(post_feedback(url, bodies, concurrency, api_key_headers(stack_env[API_KEY_ENV])))
            posted = time.perf_counter() - started
            _wait_for_total(consumer, thread, "accepted", n_events, "durable in the buffer", poll_s=0.02)
            elapsed = time.perf_counter() - started
        finally:
            consumer.stop()
            thread.join()
    ms = np.array(latencies) * 1000
    return {
        "events": n_events,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n_events / elapsed, 1),
        "gateway_accept_events_per_s": round(n_events / posted, 1),
        "post_latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p95": round(float(np.percentile(ms, 95)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
        },
    }


def plot_rates(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["bare kafka-python\nconsumer (baseline)", "feedback consumer", "gateway -> buffer\n(end to end)"]
    rates = [
        results["bare_kafka_python_consumer"]["events_per_s"],
        results["feedback_consumer"]["events_per_s"],
        results["end_to_end_gateway_to_buffer"]["events_per_s"],
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, rates, color=["#999999", "#1f77b4", "#2ca02c"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("events / s")
    load = results["machine"]["load_average_1m"]
    ax.set_title(f"feedback stream throughput (same run, {results['machine']['cpus']} CPUs, load {load})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_benchmark(events: int, gateway_events: int, concurrency: int, output: Path) -> dict:
    console = Console()
    # SIGTERM (e.g. from `timeout`) must still run the `finally` that stops the private stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="musicrl-feedback-bench-") as tmp:
        workdir = Path(tmp)
        local = Stack(
            free_port_settings(workdir / "stack"), [c for c in COMPONENTS if c.name in ("seaweedfs", "tansu")]
        )
        console.print("starting a private SeaweedFS + Tansu ...")
        local.up()
        try:
            stack_env = local.info.env()
            settings = _settings(local.info, uuid.uuid4().hex[:8])
            configure_logging(settings, service="feedback-bench")
            store = ObjectStore(settings)
            store.ensure_buckets()
            ensure_topics(settings)
            rng = random.Random(0)
            records = make_records(300, rng)
            store_records(store, records)
            workload = make_workload(events, records, seed=0)
            produce(settings, settings.topic_preferences, workload.messages)

            bare = bare_consumer_rate(settings, len(workload.messages))
            ours = feedback_consumer_rate(settings, store, len(workload.messages))
            e2e_settings = _settings(local.info, uuid.uuid4().hex[:8])
            ensure_topics(e2e_settings)
            end_to_end = end_to_end_rate(
                stack_env, e2e_settings, ObjectStore(e2e_settings), gateway_events, concurrency, workdir
            )
        finally:
            local.down()

    results = {
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "workload": workload.counts(),
        "bare_kafka_python_consumer": bare,
        "feedback_consumer": ours,
        "consumer_vs_bare_ratio": round(ours["events_per_s"] / bare["events_per_s"], 3),
        "end_to_end_gateway_to_buffer": end_to_end,
    }
    update_results(output, ["benchmark"], results)
    plot = plot_rates(results, output.with_suffix(".png"))

    table = Table(title="feedback stream")
    table.add_column("measure")
    table.add_column("events/s", justify="right")
    table.add_row("bare kafka-python consumer (baseline)", f"{bare['events_per_s']:.0f}")
    table.add_row("feedback consumer", f"{ours['events_per_s']:.0f}")
    table.add_row("  ratio to baseline", f"{results['consumer_vs_bare_ratio']:.3f}")
    table.add_row(f"gateway -> buffer, {concurrency} clients", f"{end_to_end['events_per_s']:.0f}")
    table.add_row("  gateway 202s only", f"{end_to_end['gateway_accept_events_per_s']:.0f}")
    console.print(table)
    console.print(f"POST latency ms: {end_to_end['post_latency_ms']}  -> {output}, {plot}")
    return results
