"""Dead-letter producer: invalid events go to ``topic_dead_letter`` with their reason, exactly once.

Dead letters of source partition p go to dead-letter partition p, in source
offset order, from the one consumer that owns p. So the last record of
dead-letter partition p tells how far that partition's dead letters got, and
a consumer re-processing a chunk after a crash skips those already written.
"""

from __future__ import annotations

import json
import time

from kafka import KafkaConsumer, TopicPartition

from feedback_consumer.processing import DeadLetter
from feedback_consumer.settings import ConsumerSettings
from musicrl.kafka import idempotent_producer


class DeadLetterWriter:
    def __init__(self, settings: ConsumerSettings):
        self.settings = settings
        self.topic = settings.topic_dead_letter
        # One request in flight keeps records in order even if a retry happens. The
        # delivery timeout is shorter than our wait, so a failed send is final before
        # the tail is re-read: nothing still queued can land after the re-read.
        timeout_ms = int(settings.consumer_dead_letter_timeout_s * 1000)
        self._producer = idempotent_producer(
            settings,
            max_in_flight_requests_per_connection=1,
            max_block_ms=timeout_ms,
            request_timeout_ms=timeout_ms // 2,
            delivery_timeout_ms=timeout_ms,
        )
        self._reader: KafkaConsumer | None = None
        self._written_up_to: dict[int, int] = {}

    def forget(self, partition: int) -> None:
        """Drop what is known about a partition (it was revoked, or a send failed)."""
        self._written_up_to.pop(partition, None)

    def written_up_to(self, partition: int) -> int:
        """Highest source offset of ``partition`` already in the dead-letter topic (-1: none)."""
        if partition not in self._written_up_to:
            self._written_up_to[partition] = self._read_tail(partition)
        return self._written_up_to[partition]

    def _read_tail(self, partition: int) -> int:
        if self._reader is None:
            self._reader = KafkaConsumer(
                **self.settings.kafka_client_options(), group_id=None, enable_auto_commit=False
            )
        tp = TopicPartition(self.topic, partition)
        self._reader.assign([tp])
        start, end = self._reader.beginning_offsets([tp])[tp], self._reader.end_offsets([tp])[tp]
        if end <= start:
            return -1
        # Tansu reports the start of the last batch as the end offset, so read from
        # there until the fetch high-water mark rather than taking one record.
        self._reader.seek(tp, end - 1)
        highest = -1
        deadline = time.monotonic() + self.settings.consumer_dead_letter_timeout_s
        while time.monotonic() < deadline:
            for record in self._reader.poll(timeout_ms=500).get(tp, []):
                highest = max(highest, int(json.loads(record.value)["offset"]))
            highwater = self._reader.highwater(tp)
            if highwater is not None and self._reader.position(tp) >= highwater:
                return highest
        raise TimeoutError(f"could not read the tail of {self.topic}[{partition}]")

    def write(self, partition: int, letters: list[DeadLetter], source_topic: str) -> int:
        """Produce the letters not yet in the topic and wait for the broker's acks; returns how many were sent."""
        floor = self.written_up_to(partition)
        pending = [letter for letter in letters if letter.offset > floor]
        if not pending:
            return 0
        try:
            futures = [
                self._producer.send(
                    self.topic,
                    partition=partition,
                    key=f"{source_topic}/{partition}/{letter.offset}".encode(),
                    value=json.dumps(letter.to_json(source_topic)).encode(),
                )
                for letter in pending
            ]
            self._producer.flush()
            for future in futures:
                future.get(timeout=self.settings.consumer_dead_letter_timeout_s + 5)
        except Exception:
            self.forget(partition)  # some may have landed: re-read the tail before retrying
            raise
        self._written_up_to[partition] = pending[-1].offset
        return len(pending)

    def close(self) -> None:
        self._producer.close(timeout=5)
        if self._reader is not None:
            self._reader.close()
