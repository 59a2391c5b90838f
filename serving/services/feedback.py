"""Feedback: check a vote's token, validate it against its generation, pseudonymise the user, produce it to Kafka.

A vote must bring the ``vote_token`` of its generation (``serving.services.vote_tokens``):
no token, a forged or expired one, one for another generation, key, user or clip
set, a listening time longer than the clip, a user voting too often or a second
vote on the same generation are refused before anything is read or produced.

The answer is 202 only once the broker acknowledged the event (acks=all, idempotent
producer), so an accepted vote is durable. A broker that cannot be reached or
does not acknowledge in ``gateway_kafka_timeout_s`` gives 503: the client
retries with the same ``event_id`` and the feedback consumer keeps one copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time

from kafka import KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import REGISTRY, Counter, Histogram

from musicrl.kafka import idempotent_producer
from musicrl.logging import get_logger
from musicrl.schemas.preference import FeedbackAccepted, FeedbackRequest, PreferenceEvent, utc_now
from serving.errors import RateLimited, RequestRejected, UpstreamUnavailable
from serving.services.generations import GenerationService
from serving.services.vote_tokens import VotePolicy
from serving.settings import GatewaySettings

log = get_logger("serving.feedback")


def pseudonymise(user_id: str, key: bytes) -> str:
    """HMAC-SHA256 of the user id: stable per user, not reversible without the key."""
    return hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()


class FeedbackMetrics:
    def __init__(self, registry):
        self.events = Counter(
            "musicrl_gateway_feedback",
            "Feedback requests by outcome (accepted, rejected, throttled, unavailable).",
            ["outcome"],
            registry=registry,
        )
        self.produce_seconds = Histogram(
            "musicrl_gateway_feedback_produce_seconds",
            "Time from send to the broker's acknowledgement.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )


# Module-level like every gateway metric: one set per process, exposed on /metrics by musicrl.metrics.
FEEDBACK_METRICS = FeedbackMetrics(REGISTRY)


class FeedbackProducer:
    """An idempotent acks=all producer created on first use; after a failed connection it
    answers "unavailable" at once for ``retry_after_s`` instead of blocking every request."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._failed_at: float | None = None

    def _get(self) -> KafkaProducer:
        with self._lock:
            if self._producer is not None:
                return self._producer
            if self._failed_at is not None and time.monotonic() - self._failed_at < self.settings.gateway_retry_after_s:
                raise UpstreamUnavailable("kafka", "the last connection attempt failed moments ago")
            timeout_ms = int(self.settings.gateway_kafka_timeout_s * 1000)
            try:
                self._producer = idempotent_producer(
                    self.settings,
                    bootstrap_timeout_ms=timeout_ms,
                    max_block_ms=timeout_ms,
                    request_timeout_ms=timeout_ms,
                    delivery_timeout_ms=max(2 * timeout_ms, 10_000),
                    client_id="musicrl-gateway-feedback",
                )
            except KafkaError as err:
                self._failed_at = time.monotonic()
                raise UpstreamUnavailable("kafka", f"cannot connect: {err}") from err
            self._failed_at = None
            return self._producer

    def send(self, topic: str, key: bytes, value: bytes) -> tuple[int, int]:
        """Produce and wait for the acknowledgement; returns (partition, offset)."""
        producer = self._get()
        try:
            metadata = producer.send(topic, key=key, value=value).get(timeout=self.settings.gateway_kafka_timeout_s)
        except KafkaError as err:
            raise UpstreamUnavailable("kafka", f"no acknowledgement: {type(err).__name__}: {err}") from err
        return metadata.partition, metadata.offset

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None


class FeedbackService:
    def __init__(
        self,
        settings: GatewaySettings,
        generations: GenerationService,
        producer: FeedbackProducer,
        metrics: FeedbackMetrics,
        votes: VotePolicy,
    ):
        self.settings = settings
        self.generations = generations
        self.producer = producer
        self.metrics = metrics
        self.votes = votes
        self._key = settings.gateway_user_hash_key.get_secret_value().encode()

    async def submit(self, request: FeedbackRequest, key_name: str) -> FeedbackAccepted:
        """Produce the vote of ``request``, posted with the API key (or page token) ``key_name``."""
        pseudonym = pseudonymise(request.user_id, self._key)
        try:
            claims = self.votes.admit(request, key_name, pseudonym)  # 403, 422, 429: no I/O spent on a forged vote
            if request.clip_a_id == request.clip_b_id:
                # After the token: whoever cannot vote learns 403, not which bodies would pass (docs/reliability.md).
                raise RequestRejected("clip_b_id", "clip_a_id and clip_b_id must be two different clips")
            record = await self.generations.get(request.generation_id)  # NotFound -> 404
            for field, clip_id in (("clip_a_id", request.clip_a_id), ("clip_b_id", request.clip_b_id)):
                if record.clip(clip_id) is None:
                    raise RequestRejected(field, f"clip {clip_id} is not a clip of generation {request.generation_id}")
            self.votes.claim(claims, request.event_id)  # 409 for a second vote; a retry (same event id) passes
        except UpstreamUnavailable:
            self.metrics.events.labels("unavailable").inc()
            raise
        except RateLimited:
            self.metrics.events.labels("throttled").inc()
            raise
        except Exception:
            self.metrics.events.labels("rejected").inc()
            raise
        event = PreferenceEvent(
            **request.model_dump(exclude={"user_id", "vote_token"}),
            user_pseudonym=pseudonym,
            received_at=utc_now(),
        )
        started = time.perf_counter()
        try:
            partition, offset = await asyncio.to_thread(
                self.producer.send, self.settings.topic_preferences, event.generation_id.encode(), event.to_bytes()
            )
        except UpstreamUnavailable:
            self.metrics.events.labels("unavailable").inc()
            raise
        self.metrics.produce_seconds.observe(time.perf_counter() - started)
        self.metrics.events.labels("accepted").inc()
        log.info(
            "feedback.accepted",
            event_id=event.event_id,
            generation_id=event.generation_id,
            choice=event.choice,
            key=key_name,
            partition=partition,
            offset=offset,
        )
        return FeedbackAccepted(event_id=event.event_id, partition=partition, offset=offset)
