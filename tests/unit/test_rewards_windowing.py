import pytest

from musicrl.rewards.windowing import edge_windows, mel_frames, segments

pytestmark = pytest.mark.unit


def test_segments_cover_the_clip_with_equal_lengths():
    assert segments(300, 500) == [(0, 300)]
    assert segments(500, 500) == [(0, 500)]
    assert segments(1000, 500) == [(0, 500), (500, 1000)]
    # a remainder of at least half a segment is scored as the last full segment
    assert segments(1300, 500) == [(0, 500), (500, 1000), (800, 1300)]
    # a shorter remainder is dropped
    assert segments(1200, 500) == [(0, 500), (500, 1000)]


def test_edge_windows_are_first_and_last():
    assert edge_windows(600, 1000) == [(0, 600)]
    assert edge_windows(1000, 1000) == [(0, 1000)]
    assert edge_windows(1500, 1000) == [(0, 1000), (500, 1500)]
    assert edge_windows(3000, 1000) == [(0, 1000), (2000, 3000)]


def test_window_arguments_are_validated_and_seconds_convert_to_mel_frames():
    assert mel_frames(10.0) == 500
    with pytest.raises(ValueError):
        segments(10, 0)
    with pytest.raises(ValueError):
        edge_windows(10, -1)
