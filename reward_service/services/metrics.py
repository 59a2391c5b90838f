"""Prometheus metrics of the reward service, on a registry of its own so that
several apps (tests, the benchmark) can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from reward_service.services.batcher import BatchStats
from reward_service.services.models import ReloadResult

_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RewardMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total and memory: the benchmark turns CPU seconds into a cost per clip.
        ProcessCollector(registry=r)
        self.batch_size = Histogram(
            "musicrl_reward_batch_size", "Clips scored per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "musicrl_reward_batch_seconds", "Time to score one batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "musicrl_reward_queue_wait_seconds",
            "Time a clip waited before its batch started",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.input_seconds = Histogram(
            "musicrl_reward_input_seconds",
            "Time to turn one item into a scorable clip (fetch, decode, tokens)",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("musicrl_reward_queue_depth", "Clips waiting to be scored", registry=r)
        self.request_seconds = Histogram(
            "musicrl_reward_request_seconds",
            "Latency of HTTP requests",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.clips_scored = Counter("musicrl_reward_clips_scored_total", "Clips scored", ["source"], registry=r)
        self.rejected = Counter("musicrl_reward_requests_rejected_total", "Requests refused", ["reason"], registry=r)
        self.reloads = Counter(
            "musicrl_reward_model_reloads_total", "Model reload attempts", ["trigger", "result"], registry=r
        )
        self.model_version = Gauge(
            "musicrl_reward_model_version", "1 for the model version in use", ["component", "version"], registry=r
        )

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_seconds.observe(stats.seconds)
        for wait in stats.queue_wait_s:
            self.queue_wait_seconds.observe(wait)

    def observe_reload(self, trigger: str, outcome: ReloadResult | Exception) -> None:
        if isinstance(outcome, Exception):
            self.reloads.labels(trigger, "error").inc()
            return
        self.reloads.labels(trigger, "changed" if outcome.changed else "unchanged").inc()
        for component, (old, new) in outcome.changed.items():
            if old is not None:
                self.model_version.remove(component, old)
            self.model_version.labels(component, new).set(1)
