"""The MusicGen benchmark's arithmetic (the run itself: `musicrl gateway bench-musicgen`, results/musicgen.json)."""

import pytest

from benchmarks.gateway_musicgen import summary

pytestmark = pytest.mark.unit


def test_summary_counts_clips_audio_and_tokens_per_second():
    result = summary([0.5, 1.0, 1.5, 2.0], wall_s=2.0, duration_s=1.0, tokens_per_clip=200)
    assert result["clips_per_s"] == 2.0 and result["real_time_factor"] == 2.0 and result["tokens_per_s"] == 400.0
    assert result["p50_ms"] == 1250.0 and 1900.0 < result["p95_ms"] < 2000.0
