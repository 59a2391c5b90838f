"""Audio degradations with a strength in [0, 1], and the MOS label they imply.

The quality model is trained on clean renders (MOS 5) and degraded ones; the
label is a fixed function of the strengths: MOS = 1 + 4 * prod(1 - strength).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.signal import butter, sosfilt

from musicrl.audio import codec

SAMPLE_RATE = codec.SAMPLE_RATE


def add_noise(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """White noise from 45 dB SNR (strength 0) down to 0 dB (strength 1)."""
    snr_db = 45.0 * (1.0 - strength)
    power = max(float(np.mean(wave**2)), 1e-6)
    return wave + rng.standard_normal(len(wave)) * np.sqrt(power / 10 ** (snr_db / 10))


def clip(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Overdrive into a hard clip at the original peak: the drive rises from 0 dB to 30 dB."""
    peak = max(float(np.abs(wave).max()), 1e-6)
    return np.clip(wave * 10 ** (1.5 * strength), -peak, peak)


def dropouts(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Zeroed gaps of 20 to 120 ms covering up to 35 percent of the sounding part of the clip.

    Gaps start where the music sounds: a gap in a rest would be inaudible and make the label a lie.
    """
    out = wave.copy()
    sounding = np.flatnonzero(np.abs(wave) > 0.05 * max(float(np.abs(wave).max()), 1e-6))
    if len(sounding) == 0:
        return out
    target = int(0.35 * strength * len(sounding))
    covered = 0
    while covered < target:
        length = int(rng.uniform(0.02, 0.12) * SAMPLE_RATE)
        start = int(rng.choice(sounding))
        out[start : start + length] = 0.0
        covered += length
    return out


def _rolloff_hz(wave: np.ndarray, share: float = 0.99) -> float:
    power = np.abs(np.fft.rfft(wave)) ** 2
    cumulative = np.cumsum(power)
    index = int(np.searchsorted(cumulative, share * cumulative[-1])) if cumulative[-1] > 0 else len(power) - 1
    return index * SAMPLE_RATE / (2 * (len(power) - 1))


def band_limit(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Low-pass from the clip's own 99 % spectral roll-off down to 6 percent of it (log scale).

    Relative to the content, so that the same strength removes as much of a bass line as of a flute.
    """
    cutoff = float(np.clip(_rolloff_hz(wave) * 0.06**strength, 60.0, 7900.0))
    sos = butter(6, cutoff, btype="low", fs=SAMPLE_RATE, output="sos")
    return sosfilt(sos, wave)


def detune(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Wow and flutter: pitch wobbles by up to 2 semitones at 2 to 8 Hz."""
    rate = rng.uniform(2.0, 8.0)
    depth = (2 ** (2.0 * strength / 12) - 1) / (2 * np.pi * rate)  # max relative speed deviation / omega
    t = np.arange(len(wave)) / SAMPLE_RATE
    warped = (t + depth * np.sin(2 * np.pi * rate * t)) * SAMPLE_RATE
    return np.interp(np.clip(warped, 0, len(wave) - 1), np.arange(len(wave)), wave)


WAVE_DEGRADATIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "noise": add_noise,
    "clipping": clip,
    "dropouts": dropouts,
    "band_limit": band_limit,
    "detune": detune,
}
DEGRADATIONS = (*WAVE_DEGRADATIONS, "glitches")
DEGRADATIONS_VERSION = 2  # bump when a degradation changes: training caches are keyed by it
MAX_EXTRA_GLITCHES = 8


def add_glitch_tokens(tokens: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Replace up to MAX_EXTRA_GLITCHES frames by glitch tokens (the artefact the generator can emit)."""
    tokens = np.array(tokens, dtype=np.int64)
    count = min(len(tokens), int(round(strength * MAX_EXTRA_GLITCHES)))
    frames = rng.choice(len(tokens), size=count, replace=False)
    tokens[frames] = rng.choice(codec.GLITCH_TOKENS, size=count)
    return tokens


def mos_of(strengths: dict[str, float]) -> float:
    """The MOS label of a render degraded with these strengths (5 clean, 1 worst)."""
    return 1.0 + 4.0 * float(np.prod([1.0 - s for s in strengths.values()])) if strengths else 5.0


def render_degraded(tokens: np.ndarray, strengths: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Decode `tokens` with the named degradations applied; float32 in [-1, 1]."""
    unknown = set(strengths) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradations {sorted(unknown)}; choose from {DEGRADATIONS}")
    if "glitches" in strengths:
        tokens = add_glitch_tokens(tokens, strengths["glitches"], rng)
    wave = codec.decode(tokens).astype(np.float64)
    for name, strength in strengths.items():
        if name != "glitches":
            wave = WAVE_DEGRADATIONS[name](wave, float(strength), rng)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
