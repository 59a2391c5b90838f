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
    """Zeroed gaps of 20 to 120 ms covering up to 35 percent of the clip."""
    out = wave.copy()
    target = int(0.35 * strength * len(wave))
    covered = 0
    while covered < target:
        length = int(rng.uniform(0.02, 0.12) * SAMPLE_RATE)
        start = int(rng.integers(0, max(1, len(wave) - length)))
        out[start : start + length] = 0.0
        covered += length
    return out


def band_limit(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Low-pass from 7.5 kHz down to 400 Hz (log scale), like a bad telephone line."""
    cutoff = 7500.0 * (400.0 / 7500.0) ** strength
    sos = butter(6, cutoff, btype="low", fs=SAMPLE_RATE, output="sos")
    return sosfilt(sos, wave)


def detune(wave: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Wow and flutter: pitch wobbles by up to 1.2 semitones at 0.5 to 6 Hz."""
    rate = rng.uniform(0.5, 6.0)
    depth = (2 ** (1.2 * strength / 12) - 1) / (2 * np.pi * rate)  # max relative speed deviation / omega
    t = np.arange(len(wave)) / SAMPLE_RATE
    warped = (t + depth * np.sin(2 * np.pi * rate * t)) * SAMPLE_RATE
    return np.interp(np.clip(warped, 0, len(wave) - 1), np.arange(len(wave)), wave)


WAVE_DEGRADATIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "noise": add_noise, "clipping": clip, "dropouts": dropouts, "band_limit": band_limit, "detune": detune,
}
DEGRADATIONS = (*WAVE_DEGRADATIONS, "glitches")
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
