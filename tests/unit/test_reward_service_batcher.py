"""The micro-batcher: batching across concurrent submissions, limits, snapshot pinning, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from reward_service.services.batcher import BatcherStopped, BatchStats, MicroBatcher, QueueFull

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, snapshot, payloads):
        self.gate.wait(10)
        self.batches.append(list(payloads))
        time.sleep(self.delay_s)
        return [(snapshot, p * 10) for p in payloads]


def make(process, snapshot=lambda: "v1", **kw):
    params = dict(max_batch_size=8, max_wait_s=0.05, max_queued=64) | kw
    stats: list[BatchStats] = []
    batcher = MicroBatcher(process, snapshot, on_batch=stats.append, **params)
    batcher.start()
    return batcher, stats


def test_concurrent_requests_share_batches_and_get_their_own_results():
    process = Recorder(delay_s=0.01)
    batcher, stats = make(process)

    async def main():
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(12)))

    try:
        outcomes = asyncio.run(main())
    finally:
        batcher.stop()
    for i, (results, snapshot) in enumerate(outcomes):
        assert snapshot == "v1"
        assert [value for _, value in results] == [i * 10, (i + 100) * 10]
    sizes = [s.size for s in stats]
    assert sum(sizes) == 24
    assert max(sizes) == 8  # 24 clips arriving together fill batches up to the limit
    assert len(process.batches) < 24


def test_a_lone_request_waits_at_most_max_wait():
    batcher, stats = make(Recorder(), max_wait_s=0.02)
    try:
        started = time.monotonic()
        batcher.submit_nowait([1]).result(timeout=5)
        assert time.monotonic() - started < 2.0
        assert stats[0].size == 1
    finally:
        batcher.stop()


def test_full_queue_refuses_new_requests():
    process = Recorder()
    process.gate.clear()  # the worker blocks on its first batch
    batcher, _ = make(process, max_batch_size=2, max_queued=4, max_wait_s=0)
    try:
        first = batcher.submit_nowait([1, 2])
        deadline = time.monotonic() + 5
        while batcher.depth and time.monotonic() < deadline:  # the worker took the first batch
            time.sleep(0.005)
        second = batcher.submit_nowait([3, 4, 5, 6])
        with pytest.raises(QueueFull):
            batcher.submit_nowait([7])
        process.gate.set()
        assert [v for _, v in first.result(5)[0]] == [10, 20]
        assert [v for _, v in second.result(5)[0]] == [30, 40, 50, 60]
    finally:
        process.gate.set()
        batcher.stop()


def test_a_request_split_over_batches_keeps_the_snapshot_it_started_with():
    versions = iter(["v1", "v2", "v3", "v4"])
    process = Recorder()
    batcher, _ = make(process, snapshot=lambda: next(versions), max_batch_size=2, max_wait_s=0)
    try:
        results, snapshot = batcher.submit_nowait([1, 2, 3, 4, 5]).result(5)
    finally:
        batcher.stop()
    assert len(process.batches) == 3
    assert snapshot == "v1"
    assert {s for s, _ in results} == {"v1"}


def test_a_failing_batch_fails_only_its_requests():
    def process(snapshot, payloads):
        if any(p < 0 for p in payloads):
            raise ValueError("model exploded")
        return [p for p in payloads]

    batcher, _ = make(process, max_batch_size=1, max_wait_s=0)
    try:
        bad = batcher.submit_nowait([-1])
        good = batcher.submit_nowait([5])
        with pytest.raises(ValueError, match="exploded"):
            bad.result(5)
        assert good.result(5)[0] == [5]
    finally:
        batcher.stop()


def test_stop_finishes_the_running_batch_and_fails_queued_requests():
    process = Recorder()
    process.gate.clear()
    batcher, _ = make(process, max_batch_size=1, max_wait_s=0)
    running = batcher.submit_nowait([1])
    deadline = time.monotonic() + 5
    while batcher.depth and time.monotonic() < deadline:
        time.sleep(0.005)
    queued = batcher.submit_nowait([2])
    threading.Timer(0.1, process.gate.set).start()
    batcher.stop()
    assert [v for _, v in running.result(1)[0]] == [10]
    with pytest.raises(BatcherStopped):
        queued.result(1)
    with pytest.raises(BatcherStopped):
        batcher.submit_nowait([3])
