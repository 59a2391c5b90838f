"""The feedback consumer: Kafka preferences -> validated, de-duplicated, joined -> on-policy buffer.

Exactly once, without Kafka transactions (Tansu has none): every chunk of a
partition goes through the same four durable steps, in this order,

1. ledger entry ``dedup/partition=p/{first}-{last}.json`` (the chunk's intent
   and its event ids, see :mod:`feedback_consumer.ledger`);
2. dead letters, skipping those already in the dead-letter topic;
3. one Parquet segment per policy version, key fixed by (policy, p, first, last);
4. offset commit (``last + 1``).

A crash between any two steps leaves a ledger entry that the committed offset
does not cover; on (re)assignment the consumer re-processes exactly that
offset range with the de-duplication state from the entries before it, which
re-creates the same segments under the same keys (overwriting, never adding)
and only the missing dead letters. Committed offsets older than the newest
entry are therefore harmless, which is why a failed commit is only counted.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError
from tenacity import Retrying, stop_after_delay, stop_when_event_set, wait_exponential

from feedback_consumer.dead_letters import DeadLetterWriter
from feedback_consumer.ledger import Ledger, LedgerEntry
from feedback_consumer.metrics import ConsumerMetrics
from feedback_consumer.processing import GenerationLookupError, Message, process_chunk
from feedback_consumer.settings import ConsumerSettings
from musicrl.buffer import rows_to_parquet, segment_key
from musicrl.kafka import ensure_topics
from musicrl.logging import get_logger
from musicrl.schemas.generation import GenerationRecord, generation_key
from musicrl.storage import ObjectNotFound, ObjectStore

log = get_logger("feedback_consumer")
T = TypeVar("T")


class GenerationLookup:
    """Generation records by id, read concurrently and kept in an LRU cache (records never change)."""

    def __init__(self, store: ObjectStore, bucket: str, cache_size: int, workers: int):
        self.store, self.bucket, self.cache_size = store, bucket, cache_size
        self._cache: OrderedDict[str, GenerationRecord] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generation-lookup")

    def __call__(self, generation_ids: set[str]) -> dict[str, GenerationRecord | None]:
        found: dict[str, GenerationRecord | None] = {}
        missing = []
        for gid in generation_ids:
            if gid in self._cache:
                self._cache.move_to_end(gid)
                found[gid] = self._cache[gid]
            else:
                missing.append(gid)
        for gid, record in zip(missing, self._pool.map(self._fetch, missing)):
            found[gid] = record
            if record is not None and self.cache_size:
                self._cache[gid] = record
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return found

    def _fetch(self, generation_id: str) -> GenerationRecord | None:
        try:
            data = self.store.get_bytes(self.bucket, generation_key(generation_id))
        except ObjectNotFound:
            return None
        except Exception as err:  # network, 5xx: the store is not answering, not a verdict on the event
            raise GenerationLookupError(f"reading generation {generation_id}: {err}") from err
        try:
            return GenerationRecord.model_validate_json(data)
        except ValidationError as err:
            log.warning("generation_record_invalid", generation_id=generation_id, error=str(err)[:300])
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False)


@dataclass
class PartitionState:
    partition: int
    next_offset: int | None  # next offset to make durable; None: from the beginning
    seen_event_ids: set[str]
    redo: LedgerEntry | None = None  # a chunk to re-process with exactly these boundaries
    pending: list[Message] = field(default_factory=list)
    pending_since: float | None = None

    def expects(self, offset: int) -> bool:
        if self.pending:
            return offset > self.pending[-1].offset
        return self.next_offset is None or offset >= self.next_offset


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, consumer: FeedbackConsumer):
        self.consumer = consumer

    def on_partitions_revoked(self, revoked):
        self.consumer._on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.consumer._on_assigned(assigned)


class FeedbackConsumer:
    def __init__(
        self, settings: ConsumerSettings, store: ObjectStore | None = None, metrics: ConsumerMetrics | None = None
    ):
        self.settings = settings
        self.store = store or ObjectStore(settings)
        self.metrics = metrics or ConsumerMetrics()
        self.ledger = Ledger(self.store, settings.bucket_buffer, read_workers=settings.consumer_store_workers)
        self.lookup = GenerationLookup(
            self.store,
            settings.bucket_generations,
            settings.consumer_generation_cache_size,
            settings.consumer_store_workers,
        )
        self.partitions: dict[int, PartitionState] = {}
        self._to_restore: set[TopicPartition] = set()
        self._to_commit: dict[int, int] = {}
        self._commit_failing = False
        self._last_commit_attempt = 0.0
        self.totals: Counter[str] = Counter()
        self._stop = threading.Event()
        self._kafka: KafkaConsumer | None = None
        self._dead_letters: DeadLetterWriter | None = None
        self._last_poll = time.monotonic()
        self._running = False
        self.first_record_at: float | None = None  # perf_counter() of the first record fetched (benchmarks)

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to make pending chunks durable, commit and leave the group (SIGTERM)."""
        self._stop.set()

    def run(self) -> None:
        s = self.settings
        self._retry("ensure_topics", lambda: ensure_topics(s))
        self._retry("ensure_buckets", lambda: self.store.ensure_bucket(s.bucket_buffer))
        self._dead_letters = DeadLetterWriter(s)
        self._kafka = KafkaConsumer(
            **s.kafka_client_options(),
            client_id=s.consumer_client_id,
            group_id=s.consumer_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.consumer_session_timeout_ms,
            heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
            max_poll_interval_ms=s.consumer_max_poll_interval_ms,
            max_poll_records=s.consumer_max_poll_records,
            fetch_max_bytes=s.consumer_fetch_max_bytes,
            max_partition_fetch_bytes=s.consumer_max_partition_fetch_bytes,
        )
        self._check_dead_letter_partitions()
        self._kafka.subscribe([s.topic_preferences], listener=_Rebalance(self))
        self._running = True
        log.info("consumer_started", topic=s.topic_preferences, group=s.consumer_group_id)
        try:
            while not self._stop.is_set():
                batch = self._kafka.poll(timeout_ms=s.consumer_poll_timeout_ms)
                self._last_poll = time.monotonic()
                self._accept(batch)  # before restoring: a new partition's records predate its seek
                self._restore_assigned()
                self._flush_ready(force=False)
                self._commit_pending()
                self._update_lag()
            self._flush_ready(force=True)
            self._commit_failing = False
            self._commit_pending()
            log.info("consumer_stopping", totals=dict(self.totals))
        finally:
            self._running = False
            self._kafka.close(autocommit=False)
            self._dead_letters.close()
            self.lookup.close()

    def health(self) -> dict:
        since_poll = time.monotonic() - self._last_poll
        healthy = self._running and since_poll < max(30.0, self.settings.consumer_max_poll_interval_ms / 1000)
        return {
            "healthy": healthy,
            "running": self._running,
            "seconds_since_poll": round(since_poll, 3),
            "partitions": sorted(self.partitions),
            "lag": self.lag(),
            "totals": dict(self.totals),
        }

    def lag(self) -> int | None:
        """Events on the assigned partitions not yet durable (None before the first fetch)."""
        if self._kafka is None or not self.partitions:
            return None
        total = 0
        for p, state in self.partitions.items():
            highwater = self._kafka.highwater(TopicPartition(self.settings.topic_preferences, p))
            if highwater is None:
                return None
            total += max(highwater - (state.next_offset or 0), 0)
        return total

    # -- partition assignment --------------------------------------------------------------------

    def _on_revoked(self, revoked) -> None:
        # Pending events are not durable yet and not committed: the next owner reads them again.
        for tp in revoked:
            self._to_restore.discard(tp)
            self._to_commit.pop(tp.partition, None)
            self.partitions.pop(tp.partition, None)
            try:
                self.metrics.lag.remove(str(tp.partition))
            except KeyError:
                pass
            if self._dead_letters is not None:
                self._dead_letters.forget(tp.partition)
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    def _on_assigned(self, assigned) -> None:
        # kafka-python forbids blocking calls in the listener: pause the partitions
        # here and restore them (ledger, committed offset, seek) right after poll().
        self._to_restore.update(assigned)
        self._kafka.pause(*assigned)

    def _restore_assigned(self) -> None:
        while self._to_restore:
            tp = self._to_restore.pop()
            state = self._restore_partition(tp)
            self.partitions[tp.partition] = state
            if state.next_offset is None:
                self._kafka.seek_to_beginning(tp)
            else:
                self._kafka.seek(tp, state.next_offset)
            self._kafka.resume(tp)
            log.info(
                "partition_assigned",
                partition=tp.partition,
                position=state.next_offset,
                redo=None if state.redo is None else [state.redo.first_offset, state.redo.last_offset],
                known_event_ids=len(state.seen_event_ids),
            )

    def _restore_partition(self, tp: TopicPartition) -> PartitionState:
        entries = self._retry(
            "ledger_read", lambda: self.ledger.load_partition(tp.partition, self.settings.consumer_dedup_window_offsets)
        )
        committed = self._retry("committed_read", lambda: self._kafka.committed(tp))
        newest = max(entries, key=lambda e: e.last_offset) if entries else None
        if newest is not None and (committed is None or committed <= newest.last_offset):
            seen = {i for e in entries if e is not newest for i in e.event_ids}
            return PartitionState(tp.partition, newest.first_offset, seen, redo=newest)
        seen = {i for e in entries for i in e.event_ids}
        if committed is not None:
            return PartitionState(tp.partition, committed, seen)
        return PartitionState(tp.partition, None if newest is None else newest.last_offset + 1, seen)

    def _check_dead_letter_partitions(self) -> None:
        s = self.settings
        source = self._retry("metadata", lambda: self._require_partitions(s.topic_preferences))
        dead = self._retry("metadata", lambda: self._require_partitions(s.topic_dead_letter))
        if len(dead) < len(source):
            raise RuntimeError(
                f"{s.topic_dead_letter} has {len(dead)} partitions, fewer than {s.topic_preferences} ({len(source)})"
            )

    def _require_partitions(self, topic: str) -> set[int]:
        partitions = self._kafka.partitions_for_topic(topic)
        if not partitions:
            raise RuntimeError(f"topic {topic} has no partitions yet")
        return partitions

    # -- the chunk pipeline ----------------------------------------------------------------------

    def _accept(self, batch) -> None:
        now = time.monotonic()
        if batch and self.first_record_at is None:
            self.first_record_at = time.perf_counter()
        for tp, records in batch.items():
            state = self.partitions.get(tp.partition)
            if state is None:
                continue
            for record in records:
                if state.expects(record.offset):
                    state.pending.append(Message(tp.partition, record.offset, record.key, record.value))
            if state.pending and state.pending_since is None:
                state.pending_since = now

    def _flush_ready(self, force: bool) -> None:
        s = self.settings
        for state in list(self.partitions.values()):
            while state.pending:
                if state.redo is not None:
                    if state.pending[-1].offset < state.redo.last_offset:
                        break  # the redo range is not fully fetched yet
                    chunk = [m for m in state.pending if m.offset <= state.redo.last_offset]
                    first, last = state.redo.first_offset, state.redo.last_offset
                else:
                    aged = time.monotonic() - (state.pending_since or time.monotonic()) >= s.consumer_segment_max_age_s
                    if not (force or aged or len(state.pending) >= s.consumer_segment_max_events):
                        break
                    chunk = state.pending[: s.consumer_segment_max_events]
                    first, last = chunk[0].offset, chunk[-1].offset
                self._write_chunk(state, chunk, first, last)
                state.pending = state.pending[len(chunk) :]
                state.pending_since = time.monotonic() if state.pending else None

    def _write_chunk(self, state: PartitionState, chunk: list[Message], first: int, last: int) -> None:
        s, p = self.settings, state.partition
        outcome = self._retry(
            "generation_lookup",
            lambda: process_chunk(chunk, state.seen_event_ids, self.lookup, s.min_listen_fraction),
        )
        groups = outcome.rows_by_policy()
        keys = {policy: segment_key(policy, p, first, last) for policy in groups}
        entry = LedgerEntry(
            partition=p,
            first_offset=first,
            last_offset=last,
            event_ids=outcome.new_event_ids,
            segments=sorted(keys.values()),
            dead_letter_offsets=[d.offset for d in outcome.dead_letters],
            duplicates=outcome.duplicates,
            filtered=outcome.filtered,
        )
        started = time.perf_counter()
        self._retry("ledger_write", lambda: self.ledger.write(entry))
        sent = self._retry(
            "dead_letter", lambda: self._dead_letters.write(p, outcome.dead_letters, s.topic_preferences)
        )
        for policy, rows in groups.items():
            data = rows_to_parquet(rows)
            self._retry(
                "segment_write", lambda key=keys[policy], data=data: self.store.put_bytes(s.bucket_buffer, key, data)
            )
        if state.redo is not None:
            # A first attempt may have joined differently (e.g. a record unreadable then): drop its extra segments.
            for stale in set(state.redo.segments) - set(keys.values()):
                self._retry("segment_delete", lambda stale=stale: self.store.delete(s.bucket_buffer, stale))
        self.metrics.segment_write_seconds.observe(time.perf_counter() - started)

        state.seen_event_ids.update(outcome.new_event_ids)
        state.next_offset = last + 1
        state.redo = None
        self._commit(p, last + 1)

        self.metrics.segments.inc(len(groups))
        self.metrics.events.labels("accepted").inc(len(outcome.rows))
        self.metrics.events.labels("duplicate").inc(outcome.duplicates)
        self.metrics.events.labels("dead_letter").inc(len(outcome.dead_letters))
        for reason, n in outcome.filtered.items():
            self.metrics.events.labels(f"filtered_{reason}").inc(n)
        self.metrics.duplicates.inc(outcome.duplicates)
        self.metrics.dead_letters.inc(sent)
        self.metrics.record_durable(len(chunk))
        self.totals.update(
            {
                "events": len(chunk),
                "accepted": len(outcome.rows),
                "duplicates": outcome.duplicates,
                "dead_letters": len(outcome.dead_letters),
                "segments": len(groups),
                "chunks": 1,
                **{f"filtered_{k}": v for k, v in outcome.filtered.items()},
            }
        )
        log.info(
            "chunk_durable",
            partition=p,
            first_offset=first,
            last_offset=last,
            events=len(chunk),
            accepted=len(outcome.rows),
            duplicates=outcome.duplicates,
            dead_letters=len(outcome.dead_letters),
            dead_letters_sent=sent,
            filtered=outcome.filtered,
            segments=len(groups),
        )

    def _commit(self, partition: int, offset: int) -> None:
        self._to_commit[partition] = offset
        self._commit_pending()

    def _commit_pending(self) -> None:
        """Commit the offsets of durable chunks; a failure (broker away, rebalance) is retried on a later loop."""
        if not self._to_commit or (self._commit_failing and time.monotonic() - self._last_commit_attempt < 1.0):
            return
        topic = self.settings.topic_preferences
        offsets = {
            TopicPartition(topic, p): OffsetAndMetadata(o, "", -1)
            for p, o in self._to_commit.items()
            if p in self.partitions
        }
        self._last_commit_attempt = time.monotonic()
        try:
            if offsets:
                self._kafka.commit(offsets)
            self._to_commit.clear()
            self._commit_failing = False
        except Exception as err:  # the ledger already holds the progress: nothing is lost meanwhile
            self._commit_failing = True
            self.metrics.commit_failures.inc()
            log.warning("commit_failed", offsets={p: o for p, o in self._to_commit.items()}, error=repr(err)[:300])

    def _update_lag(self) -> None:
        for p, state in self.partitions.items():
            highwater = self._kafka.highwater(TopicPartition(self.settings.topic_preferences, p))
            if highwater is not None:
                self.metrics.lag.labels(str(p)).set(max(highwater - (state.next_offset or 0), 0))

    def _retry(self, operation: str, fn: Callable[[], T]) -> T:
        def before_sleep(retry_state):
            self.metrics.retries.labels(operation).inc()
            log.warning(
                "retrying",
                operation=operation,
                attempt=retry_state.attempt_number,
                error=repr(retry_state.outcome.exception())[:300],
            )

        retrying = Retrying(
            stop=stop_after_delay(self.settings.consumer_retry_deadline_s) | stop_when_event_set(self._stop),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
