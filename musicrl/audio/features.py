"""Log-mel spectrogram shared by every reward model (computed once per clip)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
N_MELS = 64
N_FFT = 512  # 32 ms window
HOP = 320  # 20 ms hop
MEL_FRAME_RATE = SAMPLE_RATE // HOP  # 50 mel frames per second
F_MIN, F_MAX = 30.0, 8_000.0
LOG_FLOOR = 1e-5


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters, area-normalised (Slaney style)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), N_MELS + 2))
    bins = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (center - lower)
    falling = (upper - bins[None]) / (upper - center)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return (filters * (2.0 / (upper - lower))).astype(np.float32)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` (mono, at ``rate`` Hz) at ``target`` Hz, polyphase; the array itself when the rates agree."""
    if int(rate) == int(target):
        return wave
    from math import gcd  # noqa: PLC0415

    from scipy.signal import resample_poly  # noqa: PLC0415 - scipy is slow to import and rarely needed

    g = gcd(int(rate), int(target))
    return resample_poly(wave, int(target) // g, int(rate) // g).astype(np.float32)


def n_mel_frames(n_samples: int) -> int:
    return n_samples // HOP


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Natural-log mel power spectrogram (N_MELS, len(wave) // HOP) float32 of a 16 kHz mono wave."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"log_mel expects a mono 1-D waveform, got shape {wave.shape}")
    n_frames = n_mel_frames(len(wave))
    if n_frames == 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    padded = np.pad(wave, (0, N_FFT - HOP))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT).astype(np.float32), axis=-1)) ** 2
    mel = mel_filterbank() @ power.T.astype(np.float32)
    return np.log(mel + LOG_FLOOR).astype(np.float32)
