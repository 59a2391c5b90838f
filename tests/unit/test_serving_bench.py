"""The benchmark's arithmetic: summaries, batch-size deltas, prompts."""

import pytest

from benchmarks.gateway import _delta, bench_prompts, latency_summary

pytestmark = pytest.mark.unit


def test_latency_summary_reports_throughput_real_time_factor_and_percentiles():
    summary = latency_summary([1.0, 2.0, 3.0, 4.0], wall_s=2.0, audio_s=80.0, requests=4)
    assert summary["throughput_rps"] == 2.0 and summary["real_time_factor"] == 40.0
    assert summary["p50_ms"] == 2500.0 and 3800.0 < summary["p95_ms"] < 4000.0


def test_batch_sizes_are_counted_per_level():
    assert _delta({1: 5, 2: 7, 16: 3}, {1: 5, 2: 4}) == {"2": 3, "16": 3}


def test_prompts_are_varied_and_reproducible():
    prompts = bench_prompts(20)
    assert prompts == bench_prompts(20) and len(set(prompts)) > 15
