"""Exactly once under faults, on the real broker (Tansu) and object store (SeaweedFS).

20,000 messages with 5 % duplicates, 2 % malformed and 2 % filtered votes go
through the consumer, run as a subprocess (`musicrl consumer run`), while
(1) it is SIGKILLed at 3 random points and restarted, (2) the broker is
restarted mid-stream, (3) the object store is unreachable for 10 s. Afterwards
the buffer holds exactly the valid unique event ids (no row twice) and the
dead-letter topic exactly the malformed payloads (no record twice). The counts
go to results/feedback.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from benchmarks.feedback import update_results
from feedback_consumer.settings import ConsumerSettings
from feedback_consumer.workload import make_records, make_workload, produce, read_topic, store_records
from musicrl.buffer import PreferenceBuffer
from musicrl.kafka import ensure_topics
from musicrl.stack import COMPONENTS, Stack, free_port_settings
from musicrl.storage import ObjectStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
N_MESSAGES = 20_000
N_GENERATIONS = 300


class ConsumerProcess:
    """`musicrl consumer run` in a subprocess, with its structured log lines counted as they come."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.events: Counter[str] = Counter()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "musicrl.cli", "consumer", "run"],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()

    def _read_log(self, proc: subprocess.Popen) -> None:
        with self.log_path.open("ab") as log:
            for line in proc.stderr:
                log.write(line)
                try:
                    self.events[json.loads(line)["event"]] += 1
                except (ValueError, KeyError):
                    pass

    def wait_for(self, event: str, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.events[event] < count:
            assert self.proc.poll() is None, f"consumer exited ({self.proc.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {event} #{count} within {timeout_s} s:\n{self.tail()}"
            time.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def consumer_env(stack_env: dict[str, str], settings: ConsumerSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICRL_")} | stack_env
    env |= {
        "MUSICRL_TOPIC_PREFERENCES": settings.topic_preferences,
        "MUSICRL_TOPIC_DEAD_LETTER": settings.topic_dead_letter,
        "MUSICRL_BUCKET_BUFFER": settings.bucket_buffer,
        "MUSICRL_CONSUMER_GROUP_ID": settings.consumer_group_id,
        "MUSICRL_CONSUMER_SESSION_TIMEOUT_MS": "4000",
        "MUSICRL_CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
        "MUSICRL_CONSUMER_SEGMENT_MAX_EVENTS": "500",
        "MUSICRL_CONSUMER_SEGMENT_MAX_AGE_S": "0.5",
        "MUSICRL_CONSUMER_METRICS_PORT": "0",
        "MUSICRL_LOG_JSON": "true",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def committed_everything(settings: ConsumerSettings, ends: dict[int, int]) -> bool:
    """The group's committed offsets reach the end of every partition (read without joining the group)."""
    probe = KafkaConsumer(
        **settings.kafka_client_options(),
        group_id=settings.consumer_group_id,
        enable_auto_commit=False,
        request_timeout_ms=5000,
    )
    try:
        committed = {p: probe.committed(TopicPartition(settings.topic_preferences, p)) for p in ends}
    except KafkaError:  # the broker is restarting
        return False
    finally:
        probe.close()
    return all(committed[p] is not None and committed[p] >= end for p, end in ends.items())


def run_scenario(name, stack_env, store_config, disrupt, tmp_path, seed, consumer_overrides=None):
    """Produce the workload, run the consumer through ``disrupt``, check buffer and dead letters exactly."""
    tag = uuid.uuid4().hex[:8]
    settings = ConsumerSettings(
        **store_config,
        topic_preferences=f"prefs-{tag}",
        topic_dead_letter=f"prefs-{tag}.dlq",
        bucket_buffer=f"buffer-{tag}",
        consumer_group_id=f"consumer-{tag}",
    )
    store = ObjectStore(settings)
    store.ensure_buckets()
    rng = random.Random(seed)
    records = make_records(N_GENERATIONS, rng)
    store_records(store, records)
    workload = make_workload(N_MESSAGES, records, seed=seed)
    ensure_topics(settings)
    ends = produce(settings, settings.topic_preferences, workload.messages)

    started = time.monotonic()
    env = consumer_env(stack_env, settings) | (consumer_overrides or {})
    consumer = ConsumerProcess(env, tmp_path / f"consumer-{name}.log")
    try:
        notes = disrupt(consumer, rng)
        deadline = time.monotonic() + 180
        while not committed_everything(settings, ends):
            assert consumer.proc.poll() is None, f"consumer exited:\n{consumer.tail()}"
            assert time.monotonic() < deadline, f"not done in time:\n{consumer.tail()}"
            time.sleep(0.5)
        assert consumer.terminate() == 0, f"graceful shutdown failed:\n{consumer.tail()}"
    finally:
        if consumer.proc is not None and consumer.proc.poll() is None:
            consumer.kill()
    elapsed = time.monotonic() - started

    buffer = PreferenceBuffer(store, settings.bucket_buffer)
    raw_ids = buffer.read(columns=["event_id"], deduplicate=False)["event_id"].to_pylist()
    dead = read_topic(settings, settings.topic_dead_letter, settings.topic_partitions)
    dead_sources = [(r.partition, json.loads(r.value)["offset"]) for r in dead]
    dead_payloads = sorted(json.loads(r.value)["payload"].encode() for r in dead)
    counts = {
        **workload.counts(),
        "buffer_rows": len(raw_ids),
        "buffer_unique_ids": len(set(raw_ids)),
        "dead_letter_records": len(dead),
        "consumer_starts": consumer.events["consumer_started"],
        "chunks_made_durable": consumer.events["chunk_durable"],
        "elapsed_s": round(elapsed, 1),
        "buffer_exact": len(raw_ids) == len(set(raw_ids)) and set(raw_ids) == workload.expected_buffer_ids,
        "dead_letters_exact": len(set(dead_sources)) == len(dead)
        and dead_payloads == sorted(workload.malformed_payloads),
        **notes,
    }
    update_results(ROOT / "results" / "feedback.json", ["fault_tests", name], counts)

    assert len(raw_ids) == len(set(raw_ids)), "an event landed twice in the buffer"
    assert set(raw_ids) == workload.expected_buffer_ids
    assert len(set(dead_sources)) == len(dead), "a message was dead-lettered twice"
    assert dead_payloads == sorted(workload.malformed_payloads)
    return counts


def store_fields(env: dict[str, str]) -> dict:
    names = ("s3_endpoint", "s3_access_key", "s3_secret_key", "s3_region", "kafka_bootstrap")
    return {n: env[f"MUSICRL_{n.upper()}"] for n in names}


def test_sigkill_at_three_random_points_loses_and_duplicates_nothing(stack, tmp_path):
    def kill_three_times(consumer: ConsumerProcess, rng: random.Random) -> dict:
        kills = []
        for _ in range(3):
            consumer.start()
            before = consumer.events["chunk_durable"]
            consumer.wait_for("chunk_durable", before + rng.randint(1, 4))
            time.sleep(rng.uniform(0.0, 0.6))
            kills.append(consumer.events["chunk_durable"])
            consumer.kill()
        consumer.start()
        return {"killed_after_chunks": kills}

    counts = run_scenario("sigkill_x3", stack.env(), store_fields(stack.env()), kill_three_times, tmp_path, seed=1)
    assert counts["consumer_starts"] == 4


def private_stack(tmp_path: Path, kafka_storage: str) -> Stack:
    settings = free_port_settings(tmp_path / "stack").model_copy(update={"stack_kafka_storage": kafka_storage})
    local = Stack(settings, [c for c in COMPONENTS if c.name in ("seaweedfs", "tansu")])
    local.up()
    return local


def restart(local: Stack, name: str, down_s: float) -> None:
    component = next(c for c in local.components if c.name == name)
    local.supervisor.stop(name)
    time.sleep(down_s)
    local.supervisor.start(component.build(local.settings), local.settings.stack_startup_timeout_s)


def test_broker_restart_mid_stream(tmp_path):
    local = private_stack(tmp_path, kafka_storage="s3")  # topics and offsets must survive the restart
    try:

        def restart_broker(consumer: ConsumerProcess, rng: random.Random) -> dict:
            consumer.start()
            consumer.wait_for("chunk_durable", rng.randint(2, 6))
            restart(local, "tansu", down_s=2.0)
            return {"broker_restarted_after_chunks": consumer.events["chunk_durable"]}

        # Small chunks and fetches keep the consumer busy for longer than the broker's stop and
        # start: with the defaults an idle machine's consumer finished the stream during the stop.
        slower = {
            "MUSICRL_CONSUMER_SEGMENT_MAX_EVENTS": "50",
            "MUSICRL_CONSUMER_MAX_POLL_RECORDS": "150",
            "MUSICRL_CONSUMER_MAX_PARTITION_FETCH_BYTES": "32768",
        }
        counts = run_scenario(
            "broker_restart",
            local.info.env(),
            store_fields(local.info.env()),
            restart_broker,
            tmp_path,
            seed=2,
            consumer_overrides=slower,
        )
        assert counts["broker_restarted_after_chunks"] < counts["chunks_made_durable"], (
            "the restart came after the stream"
        )
    finally:
        local.down()


def test_object_store_unreachable_for_ten_seconds(tmp_path):
    local = private_stack(tmp_path, kafka_storage="memory")  # the broker must not depend on the store here
    try:

        def store_outage(consumer: ConsumerProcess, rng: random.Random) -> dict:
            consumer.start()
            consumer.wait_for("chunk_durable", rng.randint(2, 6))
            before = consumer.events["retrying"]
            restart(local, "seaweedfs", down_s=10.0)
            return {"store_down_s": 10.0, "retries_logged": consumer.events["retrying"] - before}

        counts = run_scenario(
            "object_store_outage", local.info.env(), store_fields(local.info.env()), store_outage, tmp_path, seed=3
        )
        assert counts["retries_logged"] > 0, "the outage was not noticed: it did not test anything"
    finally:
        local.down()
