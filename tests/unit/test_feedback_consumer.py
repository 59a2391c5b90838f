"""The consumer's recovery decisions: where to resume, what to redo, where chunks end."""

from __future__ import annotations

import time

import pytest
from feedback_helpers import InMemoryStore
from kafka import TopicPartition

from feedback_consumer.consumer import FeedbackConsumer, PartitionState
from feedback_consumer.ledger import Ledger, LedgerEntry
from feedback_consumer.metrics import ConsumerMetrics
from feedback_consumer.processing import Message
from feedback_consumer.settings import ConsumerSettings

pytestmark = pytest.mark.unit

TOPIC = "preferences.v1"


class CommittedOnly:
    def __init__(self, committed):
        self._committed = committed

    def committed(self, tp):
        return self._committed


def consumer_with(entries, committed, **settings) -> FeedbackConsumer:
    store = InMemoryStore()
    consumer = FeedbackConsumer(ConsumerSettings(consumer_retry_deadline_s=1, **settings), store, ConsumerMetrics())
    ledger = Ledger(store, consumer.settings.bucket_buffer)
    for entry in entries:
        ledger.write(entry)
    consumer._kafka = CommittedOnly(committed)
    return consumer


def entry(first, last, ids):
    return LedgerEntry(partition=0, first_offset=first, last_offset=last, event_ids=ids)


def restore(consumer) -> PartitionState:
    return consumer._restore_partition(TopicPartition(TOPIC, 0))


def test_fresh_partition_starts_at_the_beginning():
    state = restore(consumer_with([], None))
    assert state.next_offset is None and state.redo is None and state.seen_event_ids == set()


def test_committed_chunks_resume_after_the_commit_with_every_id_known():
    state = restore(consumer_with([entry(0, 99, ["a"]), entry(100, 199, ["b"])], 200))
    assert state.next_offset == 200 and state.redo is None and state.seen_event_ids == {"a", "b"}


@pytest.mark.parametrize("committed", [None, 100, 150, 199])
def test_uncommitted_newest_chunk_is_redone_with_its_exact_boundaries(committed):
    newest = entry(100, 199, ["b"])
    state = restore(consumer_with([entry(0, 99, ["a"]), newest], committed))
    assert state.redo == newest and state.next_offset == 100
    assert state.seen_event_ids == {"a"}  # its own ids must not count as duplicates when redone


def test_commit_ahead_of_the_ledger_wins():
    state = restore(consumer_with([entry(0, 99, ["a"])], 500))
    assert state.next_offset == 500 and state.redo is None


def test_dedup_window_limits_the_ids_loaded():
    entries = [entry(0, 99, ["old"]), entry(100, 199, ["mid"]), entry(200, 299, ["new"])]
    state = restore(consumer_with(entries, 300, consumer_dedup_window_offsets=150))
    assert state.seen_event_ids == {"mid", "new"}


def messages(first, last):
    return [Message(0, o, None, b"{}") for o in range(first, last + 1)]


def flushed_ranges(consumer, state, force=False):
    written = []

    def write_chunk(s, chunk, first, last):
        written.append((first, last, len(chunk)))
        s.next_offset, s.redo = last + 1, None

    consumer._write_chunk = write_chunk
    consumer.partitions = {0: state}
    consumer._flush_ready(force=force)
    return written


def test_redo_waits_for_its_whole_range_then_cuts_exactly_there():
    consumer = consumer_with([], None, consumer_segment_max_events=1000)
    state = PartitionState(0, 100, set(), redo=entry(100, 199, []))
    state.pending = messages(100, 150)
    assert flushed_ranges(consumer, state, force=True) == []
    state.pending = messages(100, 260)
    state.pending_since = 0.0
    assert flushed_ranges(consumer, state, force=True) == [(100, 199, 100), (200, 260, 61)]


def test_chunks_are_cut_by_size_then_by_age():
    consumer = consumer_with([], None, consumer_segment_max_events=40, consumer_segment_max_age_s=3600)
    state = PartitionState(0, 0, set())
    state.pending = messages(0, 99)
    state.pending_since = time.monotonic()  # young
    assert flushed_ranges(consumer, state) == [(0, 39, 40), (40, 79, 40)]
    assert [m.offset for m in state.pending] == list(range(80, 100))
    assert flushed_ranges(consumer, state, force=True) == [(80, 99, 20)]


def test_settings_refuse_a_heartbeat_too_close_to_the_session_timeout():
    with pytest.raises(ValueError, match="heartbeat"):
        ConsumerSettings(consumer_session_timeout_ms=3000, consumer_heartbeat_interval_ms=2000)


def test_health_and_metrics_endpoint():
    import httpx

    from feedback_consumer.metrics import serve_metrics

    metrics = ConsumerMetrics()
    metrics.events.labels("accepted").inc(3)
    metrics.record_durable(3)
    health = {"healthy": False, "running": False}
    server = serve_metrics(metrics, lambda: health, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert 'musicrl_consumer_events_total{outcome="accepted"} 3.0' in httpx.get(f"{base}/metrics").text
        assert httpx.get(f"{base}/healthz").status_code == 503
        health["healthy"] = True
        assert httpx.get(f"{base}/healthz").json()["healthy"] is True
        assert httpx.get(f"{base}/nothing").status_code == 404
    finally:
        server.shutdown()


class FlakyCommits:
    def __init__(self, failures: int):
        self.failures = failures
        self.commits = []

    def commit(self, offsets):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker away")
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})


def test_failed_commit_is_retried_later_with_the_newest_offsets():
    consumer = consumer_with([], None)
    consumer._kafka = kafka = FlakyCommits(failures=1)
    consumer.partitions = {0: PartitionState(0, 0, set()), 1: PartitionState(1, 0, set())}
    consumer._commit(0, 100)
    assert kafka.commits == [] and consumer.metrics.commit_failures._value.get() == 1
    consumer._commit(1, 50)  # within a second of the failure: queued, not attempted
    assert kafka.commits == []
    consumer._last_commit_attempt -= 2
    consumer._commit_pending()
    assert kafka.commits == [{0: 100, 1: 50}]
