"""Kafka helpers shared by the producers (gateway) and consumers (feedback consumer).

Only the pieces every client configures the same way live here: topic creation
and the idempotent, acks=all producer. Tansu (the local broker) and Apache
Kafka accept the same settings.
"""

from __future__ import annotations

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from musicrl.config import KafkaConfig


def ensure_topics(config: KafkaConfig, timeout_ms: int = 10_000) -> None:
    """Create the preferences topic and its dead-letter topic if missing.

    Both get ``topic_partitions`` partitions: the consumer writes the dead
    letters of source partition p to dead-letter partition p, which keeps them
    in source-offset order and lets a restarted consumer find where it stopped.
    """
    admin = KafkaAdminClient(**config.kafka_client_options(), request_timeout_ms=timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=config.topic_partitions, replication_factor=1)
            for name in (config.topic_preferences, config.topic_dead_letter)
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=timeout_ms)
            except TopicAlreadyExistsError:  # created concurrently by another service
                pass
    finally:
        admin.close()


def idempotent_producer(config: KafkaConfig, **overrides) -> KafkaProducer:
    """A producer that never duplicates or reorders on its own retries (acks=all, idempotence)."""
    options = dict(
        **config.kafka_client_options(),
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
    )
    options.update(overrides)
    return KafkaProducer(**options)
