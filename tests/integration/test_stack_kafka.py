"""The broker of the test stack speaks real Kafka (Tansu), driven with kafka-python.

Consumers set ``session_timeout_ms`` low: Tansu's group join takes about half of it.
"""

import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

pytestmark = pytest.mark.integration

MESSAGES = 1000
PARTITIONS = 3
FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}


def make_topic(bootstrap: str) -> str:
    topic = f"stack-test-{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        admin.close()
    return topic


def consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )


def consume(c: KafkaConsumer, at_least: int, timeout_s: float) -> list[tuple[int, int, bytes]]:
    """Poll until ``at_least`` records arrived (or the time is up); every record returned is processed."""
    import time

    records: list[tuple[int, int, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < at_least and time.monotonic() < deadline:
        for tp, batch in c.poll(timeout_ms=200, max_records=100).items():
            records.extend((tp.partition, r.offset, r.value) for r in batch)
    return records


def test_consumer_group_resumes_from_committed_offsets(kafka_bootstrap):
    topic = make_topic(kafka_bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    for i in range(MESSAGES):
        producer.send(topic, key=f"k{i % 17}".encode(), value=f"m{i}".encode())
    producer.flush()
    producer.close()
    group = f"g-{uuid.uuid4().hex[:8]}"

    first = consumer(kafka_bootstrap, topic, group)
    first_records = consume(first, at_least=MESSAGES // 2, timeout_s=30)
    first.commit()
    first.close()
    assert MESSAGES // 2 <= len(first_records) < MESSAGES

    second = consumer(kafka_bootstrap, topic, group)
    second_records = consume(second, at_least=MESSAGES - len(first_records), timeout_s=30)
    second.commit()
    second.close()

    seen_first = {(p, o) for p, o, _ in first_records}
    seen_second = {(p, o) for p, o, _ in second_records}
    assert not seen_first & seen_second, "a restarted consumer received records already committed"
    assert sorted(v for _, _, v in first_records + second_records) == sorted(f"m{i}".encode() for i in range(MESSAGES))
    assert {p for p, _ in seen_first | seen_second} == set(range(PARTITIONS))

    third = consumer(kafka_bootstrap, topic, group)
    assert consume(third, at_least=1, timeout_s=4) == []
    third.close()


def test_stack_created_the_preference_topics(stack, kafka_bootstrap):
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        topics = {
            t["name"]: t
            for t in admin.describe_topics([stack.settings.topic_preferences, stack.settings.topic_dead_letter])
        }
    finally:
        admin.close()
    assert set(topics) == {stack.settings.topic_preferences, stack.settings.topic_dead_letter}
    assert all(len(t["partitions"]) == stack.settings.topic_partitions for t in topics.values())
