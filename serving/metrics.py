"""Prometheus metrics of the gateway (request latency per route comes from ``musicrl.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

TRITON_SECONDS = Histogram(
    "musicrl_gateway_triton_seconds",
    "Latency of one Triton inference call (one candidate), by model and outcome.",
    ["model", "outcome"],
    buckets=LATENCY_BUCKETS,
)
STORE_SECONDS = Histogram(
    "musicrl_gateway_store_seconds",
    "Latency of one object-store operation, by operation and outcome.",
    ["operation", "outcome"],
    buckets=LATENCY_BUCKETS,
)
CLIPS = Counter(
    "musicrl_gateway_clips",
    "Clips generated, by serving model and policy version.",
    ["model", "policy_version"],
)
UPSTREAM_ERRORS = Counter(
    "musicrl_gateway_upstream_errors",
    "Calls to Triton or the object store that failed.",
    ["upstream"],
)
CHALLENGER_FALLBACKS = Counter(
    "musicrl_gateway_challenger_fallbacks",
    "Experiment candidates served by the current model because the challenger was unavailable.",
)
