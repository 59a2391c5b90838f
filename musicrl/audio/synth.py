"""Additive synthesizer behind the token codec: eight instrument families.

Every note is rendered from its own onset (phase 0 at the onset sample), so a
note's waveform depends only on (instrument, pitch, velocity, samples since
onset). That makes decoding deterministic and lets the analyser (`codec.encode`)
re-synthesise hypotheses exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

SAMPLE_RATE = 16_000
# Partials above this are dropped so that high notes do not alias.
MAX_PARTIAL_HZ = 7_500.0


@dataclass(frozen=True)
class Instrument:
    name: str
    ratios: tuple[float, ...]  # partial frequencies as multiples of f0
    amplitudes: tuple[float, ...]  # relative partial amplitudes (loud velocity)
    attack_s: float
    decay_s: float  # time constant of the decay towards `sustain`
    sustain: float  # level the envelope settles at, relative to the peak
    partial_damping: float = 0.0  # extra decay rate (1/s) per partial index: bright onset, mellow tail
    vibrato_hz: float = 0.0
    vibrato_depth: float = 0.0  # relative frequency deviation
    soft_brightness: float = 0.6  # soft notes scale partial k by this ** k: darker as well as quieter


def _harmonics(n: int, power: float, odd_only: bool = False) -> tuple[tuple[float, ...], tuple[float, ...]]:
    ks = [k for k in range(1, 2 * n + 1) if not odd_only or k % 2 == 1][:n]
    return tuple(float(k) for k in ks), tuple(1.0 / k**power for k in ks)


INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("piano", *_harmonics(8, 1.6), attack_s=0.004, decay_s=0.6, sustain=0.25, partial_damping=0.5),
    Instrument(
        "strings", *_harmonics(8, 1.0), attack_s=0.06, decay_s=1.0, sustain=0.85, vibrato_hz=5.5, vibrato_depth=0.004
    ),
    Instrument(
        "brass",
        (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
        (0.55, 1.0, 0.8, 0.6, 0.4, 0.25, 0.15, 0.08),
        attack_s=0.03,
        decay_s=0.5,
        sustain=0.8,
    ),
    Instrument(
        "flute",
        (1.0, 2.0, 3.0),
        (1.0, 0.18, 0.06),
        attack_s=0.04,
        decay_s=1.0,
        sustain=0.9,
        vibrato_hz=4.5,
        vibrato_depth=0.003,
    ),
    Instrument("guitar", *_harmonics(8, 1.1), attack_s=0.002, decay_s=0.35, sustain=0.15, partial_damping=1.0),
    Instrument(
        "organ",
        (1.0, 2.0, 3.0, 4.0, 6.0, 8.0),
        (1.0, 0.8, 0.5, 0.45, 0.3, 0.25),
        attack_s=0.01,
        decay_s=1.0,
        sustain=1.0,
        soft_brightness=0.8,
    ),
    Instrument("synth", *_harmonics(7, 1.0, odd_only=True), attack_s=0.005, decay_s=0.3, sustain=0.7),
    Instrument(
        "bells",
        (1.0, 2.756, 5.404, 8.933),
        (1.0, 0.6, 0.35, 0.2),
        attack_s=0.002,
        decay_s=0.45,
        sustain=0.2,
        partial_damping=1.5,
    ),
)
FAMILIES: tuple[str, ...] = tuple(i.name for i in INSTRUMENTS)

VELOCITY_GAINS = (0.3, 0.75)  # soft, loud


def midi_to_hz(pitch: float) -> float:
    return 440.0 * 2.0 ** ((pitch - 69) / 12.0)


@cache
def _partials(family: int, pitch: int, soft: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inst = INSTRUMENTS[family]
    f0 = midi_to_hz(pitch)
    ratios = np.asarray(inst.ratios)
    amps = np.asarray(inst.amplitudes, dtype=np.float64)
    keep = ratios * f0 * (1 + inst.vibrato_depth) < MAX_PARTIAL_HZ
    ratios, amps = ratios[keep], amps[keep]
    index = np.arange(len(ratios))
    if soft:
        amps = amps * inst.soft_brightness**index
    amps = amps / amps.sum()  # the sum of partials never exceeds 1
    return ratios, amps, index.astype(np.float64)


def render_note(family: int, pitch: int, soft: bool, start: int, n: int) -> np.ndarray:
    """Samples [start, start + n) of a note counted from its onset, float64, without release."""
    inst = INSTRUMENTS[family]
    ratios, amps, index = _partials(family, pitch, soft)
    t = (start + np.arange(n)) / SAMPLE_RATE
    f0 = midi_to_hz(pitch)
    phase = 2 * np.pi * f0 * t
    if inst.vibrato_hz:
        # Closed-form integral of f0 * (1 + depth * sin(2 pi v t)): independent of where rendering starts.
        phase += f0 * inst.vibrato_depth / inst.vibrato_hz * (1 - np.cos(2 * np.pi * inst.vibrato_hz * t))
    envelope = np.minimum(1.0, t / inst.attack_s) * (inst.sustain + (1 - inst.sustain) * np.exp(-t / inst.decay_s))
    partial_env = amps[:, None] * np.exp(-inst.partial_damping * index[:, None] * t[None, :])
    wave = (partial_env * np.sin(ratios[:, None] * phase[None, :])).sum(axis=0)
    return wave * envelope * VELOCITY_GAINS[int(not soft)]


def _fade(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))


@cache
def glitch_waves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (position-independent) waveforms of the two glitch tokens: a noise burst and crackle."""
    rng = np.random.default_rng(20261121)
    edge = _fade(32)
    noise = 0.35 * rng.standard_normal(n)
    noise[:32] *= edge
    noise[-32:] *= edge[::-1]
    crackle = np.zeros(n)
    clicks = rng.choice(n - 64, size=max(1, n // 120), replace=False)
    ring = np.exp(-np.arange(48) / 6.0) * np.cos(np.arange(48) * 2.4)
    for position, sign in zip(clicks, rng.choice([-0.9, 0.9], size=len(clicks)), strict=True):
        crackle[position : position + 48] += sign * ring
    return np.clip(noise, -1, 1), np.clip(crackle, -1, 1)
