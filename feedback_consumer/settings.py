"""Configuration of the feedback consumer (``MUSICRL_CONSUMER_*`` plus the shared mixins).

Every field is documented in ``docs/feedback.md``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from musicrl.config import KafkaConfig, ObjectStoreConfig, PreferenceRulesConfig


class ConsumerSettings(ObjectStoreConfig, KafkaConfig, PreferenceRulesConfig):
    consumer_group_id: str = "musicrl-feedback-consumer"
    """Kafka consumer group."""
    consumer_client_id: str = "musicrl-feedback-consumer"
    """Kafka client id."""
    # Tansu completes a group join after about half the session timeout; Kafka
    # itself is fine with anything between 6 s and 45 s.
    consumer_session_timeout_ms: int = Field(10_000, ge=1_000)
    """Group session timeout, in milliseconds (Tansu joins after about half of it)."""
    consumer_heartbeat_interval_ms: int = Field(2_000, ge=100)
    """Group heartbeat interval, in milliseconds; at most a third of the session timeout."""
    consumer_max_poll_interval_ms: int = Field(300_000, ge=10_000)
    """Longest pause between polls before the group evicts the consumer, in milliseconds."""
    consumer_poll_timeout_ms: int = Field(500, ge=1)
    """Longest wait of one poll, in milliseconds."""
    consumer_max_poll_records: int = Field(5_000, ge=1)
    """Most records returned by one poll."""
    consumer_fetch_max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    """Most bytes per fetch request."""
    consumer_max_partition_fetch_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Most bytes per partition per fetch request."""

    # A segment (one Parquet file per policy version) is cut when a partition
    # has this many pending events or its oldest pending event is this old.
    consumer_segment_max_events: int = Field(5_000, ge=1)
    """A chunk (and its buffer segments) is cut at this many pending messages of a partition."""
    consumer_segment_max_age_s: float = Field(10.0, gt=0)
    """... or when its oldest pending message is this old, in seconds."""

    # Event ids of the last this-many offsets of a partition are kept for de-duplication.
    consumer_dedup_window_offsets: int = Field(50_000_000, ge=1)
    """Event ids of this many last offsets per partition are remembered for de-duplication."""

    consumer_generation_cache_size: int = Field(4_096, ge=0)
    """Generation records kept in an in-memory LRU cache (0: none)."""
    consumer_store_workers: int = Field(8, ge=1)
    """Parallel object-store reads (ledger and generation records)."""
    # Object-store and broker calls are retried with backoff this long before
    # the consumer gives up and exits non-zero (its supervisor restarts it;
    # nothing was committed, so nothing is lost).
    consumer_retry_deadline_s: float = Field(300.0, gt=0)
    """How long object-store and broker calls are retried, in seconds, before exiting non-zero."""
    consumer_dead_letter_timeout_s: float = Field(30.0, gt=0)
    """Wait for dead-letter acks and dead-letter tail reads, in seconds."""

    # /healthz and /metrics; port 0 picks a free port, -1 disables the endpoint.
    consumer_metrics_host: str = "127.0.0.1"
    """Address of the `/healthz` and `/metrics` endpoint."""
    consumer_metrics_port: int = Field(9102, ge=-1)
    """Port of `/healthz` and `/metrics` (0: a free port, -1: off)."""

    @model_validator(mode="after")
    def _heartbeat_below_session(self):
        if self.consumer_heartbeat_interval_ms * 3 > self.consumer_session_timeout_ms:
            raise ValueError("consumer_heartbeat_interval_ms must be at most a third of consumer_session_timeout_ms")
        return self
