"""Which parts of a clip each reward model scores.

Text adherence: consecutive 10 s segments, averaged (a remainder of at least
half a segment is scored as the last full 10 s of the clip, so every segment
has the same length and they batch). Quality and preference: the first and the
last 20 s, averaged (MusicRL's protocol). A clip shorter than a window is
scored whole.
"""

from __future__ import annotations

from musicrl.audio.features import MEL_FRAME_RATE

TEXT_SEGMENT_S = 10.0
EDGE_WINDOW_S = 20.0


def segments(n_frames: int, segment_frames: int) -> list[tuple[int, int]]:
    """(start, end) frame ranges of consecutive equal-length segments covering the clip."""
    if segment_frames <= 0:
        raise ValueError("segment_frames must be positive")
    if n_frames <= segment_frames:
        return [(0, n_frames)]
    full = n_frames // segment_frames
    ranges = [(i * segment_frames, (i + 1) * segment_frames) for i in range(full)]
    if n_frames - full * segment_frames >= segment_frames / 2:
        ranges.append((n_frames - segment_frames, n_frames))
    return ranges


def edge_windows(n_frames: int, window_frames: int) -> list[tuple[int, int]]:
    """The first and the last `window_frames` (one range when the clip is no longer than a window)."""
    if window_frames <= 0:
        raise ValueError("window_frames must be positive")
    if n_frames <= window_frames:
        return [(0, n_frames)]
    return [(0, window_frames), (n_frames - window_frames, n_frames)]


def mel_frames(seconds: float) -> int:
    return int(round(seconds * MEL_FRAME_RATE))
