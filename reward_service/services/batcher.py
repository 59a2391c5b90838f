"""Micro-batching of clips from concurrent requests.

Requests put their clips in one bounded queue; a single worker thread takes up
to ``max_batch_size`` clips at a time, waiting at most ``max_wait_s`` after the
oldest clip arrived, and runs the models on the whole batch. Running every
model call in one thread keeps ONNX Runtime to its configured threads and lets
the event loop keep accepting and decoding requests meanwhile.

Each request is pinned to one model snapshot when its first clip is taken, so
all its clips are scored by the same model versions even if a reload lands
while the request is being processed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")  # what is scored (one clip)
R = TypeVar("R")  # its result
S = TypeVar("S")  # a model snapshot

ProcessFn = Callable[[S, Sequence[P]], Sequence[R]]


class QueueFull(Exception):
    """The queue cannot take the request's clips now; the client should retry later."""


class BatcherStopped(RuntimeError):
    """The batcher stopped before the request was scored."""


@dataclass(eq=False)
class _Job(Generic[P, R, S]):
    payloads: Sequence[P]
    future: Future = field(default_factory=Future)
    snapshot: S | None = None
    results: list[R | None] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.payloads)
        self.remaining = len(self.payloads)


@dataclass(eq=False)
class _Slot:
    job: _Job
    index: int
    enqueued_at: float


@dataclass(frozen=True)
class BatchStats:
    size: int
    seconds: float
    queue_wait_s: list[float]


class MicroBatcher(Generic[P, R, S]):
    def __init__(
        self,
        process: ProcessFn,
        snapshot: Callable[[], S],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queued: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queued < 1:
            raise ValueError("max_batch_size and max_queued must be at least 1")
        self._process = process
        self._snapshot = snapshot
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self._on_batch = on_batch or (lambda stats: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._queue: deque[_Slot] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        for slot in leftover:
            if not slot.job.future.done():
                slot.job.future.set_exception(BatcherStopped("the reward service is shutting down"))

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- producers ---------------------------------------------------------
    def submit_nowait(self, payloads: Sequence[P]) -> Future:
        """Queue the clips of one request; the future resolves to ``(results, snapshot)``."""
        if not payloads:
            raise ValueError("nothing to score")
        job: _Job = _Job(payloads)
        now = time.monotonic()
        with self._cond:
            if self._stopping or self._thread is None:
                raise BatcherStopped("the reward service is not running")
            if len(self._queue) + len(payloads) > self.max_queued:
                raise QueueFull(f"{len(self._queue)} clips queued, limit {self.max_queued}")
            self._queue.extend(_Slot(job, i, now) for i in range(len(payloads)))
            depth = len(self._queue)
            self._cond.notify()
        self._on_queue_depth(depth)
        return job.future

    async def submit(self, payloads: Sequence[P]) -> tuple[list[R], S]:
        return await asyncio.wrap_future(self.submit_nowait(payloads))

    # -- the worker ----------------------------------------------------------
    def _take_batch(self) -> list[_Slot] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = self._queue[0].enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            depth = len(self._queue)
        self._on_queue_depth(depth)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._score(batch)

    def _score(self, batch: list[_Slot]) -> None:
        started = time.monotonic()
        by_snapshot: dict[int, tuple[Any, list[_Slot]]] = {}
        for slot in batch:
            if slot.job.snapshot is None:
                slot.job.snapshot = self._snapshot()
            by_snapshot.setdefault(id(slot.job.snapshot), (slot.job.snapshot, []))[1].append(slot)
        for snapshot, slots in by_snapshot.values():
            live = [s for s in slots if not s.job.future.done()]  # a job that already failed is skipped
            if not live:
                continue
            try:
                results = self._process(snapshot, [s.job.payloads[s.index] for s in live])
                if len(results) != len(live):
                    raise RuntimeError(f"scorer returned {len(results)} results for {len(live)} clips")
            except BaseException as err:  # noqa: BLE001 - handed to the waiting requests
                for slot in live:
                    if not slot.job.future.done():
                        slot.job.future.set_exception(err)
                continue
            for slot, result in zip(live, results):
                job = slot.job
                job.results[slot.index] = result
                job.remaining -= 1
                if job.remaining == 0 and not job.future.done():
                    job.future.set_result((job.results, job.snapshot))
        self._on_batch(BatchStats(len(batch), time.monotonic() - started, [started - s.enqueued_at for s in batch]))
