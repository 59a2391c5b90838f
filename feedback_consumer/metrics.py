"""Prometheus metrics and the /healthz + /metrics endpoint of the feedback consumer."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "musicrl_consumer_events",
            "Events read, by outcome (accepted, duplicate, dead_letter, filtered_*).",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "musicrl_consumer_dead_letters", "Records produced to the dead-letter topic.", registry=r
        )
        self.duplicates = Counter(
            "musicrl_consumer_duplicates_dropped", "Events dropped because their event id was seen.", registry=r
        )
        self.segments = Counter(
            "musicrl_consumer_segments_written", "Parquet segments written to the buffer.", registry=r
        )
        self.segment_write_seconds = Histogram(
            "musicrl_consumer_segment_write_seconds",
            "Time to make one chunk durable (ledger + segments).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.lag = Gauge(
            "musicrl_consumer_lag",
            "High-water mark minus the next offset to write, per partition.",
            ["partition"],
            registry=r,
        )
        self.events_per_second = Gauge(
            "musicrl_consumer_events_per_second", "Events made durable per second over the last 30 s.", registry=r
        )
        self.retries = Counter(
            "musicrl_consumer_retries", "Retried object-store or broker operations.", ["operation"], registry=r
        )
        self.commit_failures = Counter(
            "musicrl_consumer_commit_failures", "Offset commits that failed (the ledger keeps progress).", registry=r
        )
        self._durable: deque[tuple[float, int]] = deque()

    def record_durable(self, n_events: int, window_s: float = 30.0) -> None:
        now = time.monotonic()
        self._durable.append((now, n_events))
        while self._durable and self._durable[0][0] < now - window_s:
            self._durable.popleft()
        span = max(now - self._durable[0][0], 1.0)
        self.events_per_second.set(sum(n for _, n in self._durable) / span)


def serve_metrics(metrics: ConsumerMetrics, health: Callable[[], dict], host: str, port: int) -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus text) and /healthz (JSON, 503 when unhealthy) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                report = health()
                body, status, ctype = json.dumps(report).encode(), 200 if report["healthy"] else 503, "application/json"
            else:
                body, status, ctype = b"not found", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # access logs would drown the structured logs
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="consumer-metrics", daemon=True).start()
    return server
