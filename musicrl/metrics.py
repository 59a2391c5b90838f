"""Prometheus metrics helpers shared by the services.

- HTTP services (FastAPI): ``instrument_app(app, service="gateway")`` mounts
  ``/metrics`` and records request counts and latencies per route template.
- Workers without an HTTP server (feedback consumer, finetune worker):
  ``start_metrics_server(port)`` serves ``/metrics`` from a background thread.

Metric names start with ``musicrl_``; each service defines its own metrics
next to the code that updates them, with ``prometheus_client`` directly.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

HTTP_REQUESTS = Counter(
    "musicrl_http_requests",
    "HTTP requests handled, by service, method, route template and status code.",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "musicrl_http_request_duration_seconds",
    "Time from request received to response finished, by service, method and route template.",
    ["service", "method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def mount_metrics(app: FastAPI, path: str = "/metrics", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve the Prometheus exposition of ``registry`` at ``path``.

    A plain route rather than a mounted sub-app: a mount answers ``/metrics``
    with a 307 redirect to ``/metrics/``.
    """
    from fastapi import Response

    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(path, metrics, methods=["GET"], include_in_schema=False)


def _route_template(scope: dict[str, Any]) -> str:
    # The matched route's template ("/v1/generations/{generation_id}") keeps label
    # cardinality bounded; unmatched paths (404s) share one label.
    route = scope.get("route")
    return getattr(route, "path", None) or "<unmatched>"


class _HTTPMetricsMiddleware:
    def __init__(self, app: Any, service: str, skip_paths: tuple[str, ...]):
        self.app = app
        self.service = service
        self.skip_paths = skip_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.skip_paths):
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_recording_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            route = _route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
            HTTP_LATENCY.labels(self.service, method, route).observe(time.perf_counter() - start)


def instrument_app(app: FastAPI, service: str, path: str = "/metrics") -> None:
    """Mount ``/metrics`` and count and time every other request of ``app``."""
    mount_metrics(app, path)
    app.add_middleware(_HTTPMetricsMiddleware, service=service, skip_paths=(path,))


def start_metrics_server(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> int:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; ``port=0`` picks a free port. Returns the port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
