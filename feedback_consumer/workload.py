"""Synthetic preference streams with known answers, for the fault tests and the benchmark.

A workload is a list of Kafka messages built from real generation records
(stored in the object store first) with a controlled share of duplicates
(client retries of earlier events), malformed messages of every kind the
consumer must dead-letter, and filtered votes (no choice, not listened). It
knows exactly which event ids must end up in the buffer and which payloads in
the dead-letter topic.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from kafka import KafkaConsumer, TopicPartition

from musicrl.config import KafkaConfig
from musicrl.kafka import idempotent_producer
from musicrl.schemas.generation import GenerationRecord, generation_key
from musicrl.schemas.preference import PreferenceEvent
from musicrl.storage import ObjectStore


@dataclass
class Workload:
    records: list[GenerationRecord]
    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    expected_buffer_ids: set[str] = field(default_factory=set)
    malformed_payloads: list[bytes] = field(default_factory=list)
    duplicates: int = 0
    filtered: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "messages": len(self.messages),
            "valid_unique_kept": len(self.expected_buffer_ids),
            "duplicates": self.duplicates,
            "malformed": len(self.malformed_payloads),
            "filtered": self.filtered,
        }


def make_records(
    n: int, rng: random.Random, n_tokens: int = 100, policy_versions: tuple[str, ...] = ("1", "2")
) -> list[GenerationRecord]:
    records = []
    for _ in range(n):
        policy = rng.choice(policy_versions)
        clips = [
            {
                "clip_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
                "index": i,
                "seed": rng.getrandbits(31),
                "policy_version": policy,
                "tokens": [rng.randrange(1024) for _ in range(n_tokens)],
                "logprobs": [round(-rng.random() * 5, 4) for _ in range(n_tokens)],
                "duration_s": 10.0,
                "sample_rate": 16000,
                "audio_key": "clips/unused.wav",
            }
            for i in range(2)
        ]
        records.append(
            GenerationRecord.model_validate(
                {
                    "generation_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
                    "prompt": "synthetic workload",
                    "params": {"duration_s": 10.0, "temperature": 0.99},
                    "clips": clips,
                }
            )
        )
    return records


def _malformed(rng: random.Random, record: GenerationRecord, valid: dict) -> tuple[bytes | None, bytes]:
    tag = uuid.UUID(int=rng.getrandbits(128), version=4).hex  # makes every malformed payload unique
    kind = rng.randrange(5)
    key = record.generation_id.encode()
    if kind == 0:
        return key, f"not json {tag}".encode()
    if kind == 1:
        return key, json.dumps({**valid, "event_id": tag, "choice": "maybe"}).encode()
    if kind == 2:
        return key, json.dumps({**valid, "event_id": tag, "schema": "preference.v0"}).encode()
    if kind == 3:  # a generation that does not exist
        return tag.encode(), json.dumps({**valid, "event_id": tag, "generation_id": tag}).encode()
    return key, json.dumps({**valid, "event_id": tag, "clip_b_id": tag}).encode()  # a clip of another generation


def make_workload(
    n_messages: int,
    records: list[GenerationRecord],
    seed: int = 0,
    duplicate_rate: float = 0.05,
    malformed_rate: float = 0.02,
    filtered_rate: float = 0.02,
    min_listen_fraction: float = 0.5,
) -> Workload:
    rng = random.Random(seed)
    workload = Workload(records=records)
    sent_valid: list[tuple[bytes, bytes]] = []
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(n_messages):
        draw = rng.random()
        record = rng.choice(records)
        if draw < duplicate_rate and sent_valid:
            workload.messages.append(rng.choice(sent_valid))
            workload.duplicates += 1
            continue
        event = PreferenceEvent(
            event_id=uuid.UUID(int=rng.getrandbits(128), version=4).hex,
            generation_id=record.generation_id,
            clip_a_id=record.clips[0].clip_id,
            clip_b_id=record.clips[1].clip_id,
            choice=rng.choice(["a", "b", "a", "b", "tie"]),
            listen_a_s=10.0,
            listen_b_s=round(rng.uniform(5.0, 10.0), 2),
            user_pseudonym=f"{rng.getrandbits(256):064x}",
            client_ts=start + timedelta(seconds=i),
            received_at=start + timedelta(seconds=i, milliseconds=150),
        )
        if draw < duplicate_rate + malformed_rate:
            message = _malformed(rng, record, json.loads(event.to_bytes()))
            workload.malformed_payloads.append(message[1])
        elif draw < duplicate_rate + malformed_rate + filtered_rate:
            event = event.model_copy(
                update={"choice": "none"} if rng.random() < 0.5 else {"listen_b_s": 10.0 * min_listen_fraction / 2}
            )
            message = (record.generation_id.encode(), event.to_bytes())
            sent_valid.append(message)
            workload.filtered += 1
        else:
            message = (record.generation_id.encode(), event.to_bytes())
            sent_valid.append(message)
            workload.expected_buffer_ids.add(event.event_id)
        workload.messages.append(message)
    return workload


def store_records(store: ObjectStore, records: list[GenerationRecord], workers: int = 8) -> None:
    bucket = store.config.bucket_generations

    def put(record: GenerationRecord) -> None:
        store.put_json(bucket, generation_key(record.generation_id), record.to_json())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(put, records))


def produce(config: KafkaConfig, topic: str, messages: list[tuple[bytes | None, bytes]]) -> dict[int, int]:
    """Produce in batches with the idempotent producer; returns the end offset (last + 1) per partition."""
    producer = idempotent_producer(config, linger_ms=20, batch_size=256 * 1024)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush(timeout=120)
        ends: dict[int, int] = {}
        for future in futures:
            metadata = future.get(timeout=60)
            ends[metadata.partition] = max(ends.get(metadata.partition, 0), metadata.offset + 1)
        return ends
    finally:
        producer.close(timeout=10)


def read_topic(config: KafkaConfig, topic: str, partitions: int, timeout_s: float = 30.0) -> list:
    """Every record of a topic, read to each partition's high-water mark (no consumer group)."""
    consumer = KafkaConsumer(
        **config.kafka_client_options(),
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=10_000,
        fetch_max_bytes=50 << 20,
    )
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records, done = [], set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < len(tps) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
            for tp in tps:
                highwater = consumer.highwater(tp)
                if highwater is not None and consumer.position(tp) >= highwater:
                    done.add(tp)
        if len(done) < len(tps):
            raise TimeoutError(f"could not read {topic} to its end in {timeout_s} s")
        return records
    finally:
        consumer.close()
