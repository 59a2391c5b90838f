"""A procedural composer: token sequences whose sound follows the attributes.

tempo -> onset rate (note lengths in frames come from beats at the BPM), mode ->
scale and tonic-triad emphasis on strong beats, instruments -> families
alternating by phrase, register -> pitch range, dynamics -> velocity,
texture -> articulation and rests, genre -> rhythm patterns.
"""

from __future__ import annotations

import random

from musicrl.audio import codec
from musicrl.corpus.attributes import PITCH_CLASSES, Attributes

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
TRIAD_DEGREES = (0, 2, 4)  # scale degrees of the tonic triad: the third tells major from minor
REGISTER_RANGES = {"low": (36, 59), "middle": (48, 71), "high": (60, 83)}

# One-bar rhythms in beats.
STRAIGHT = ((1, 1, 1, 1), (2, 1, 1), (1, 1, 2), (0.5, 0.5, 1, 1, 1), (1.5, 0.5, 2), (2, 2))
RHYTHMS = {
    "classical": STRAIGHT,
    "jazz": ((2 / 3, 1 / 3) * 2 + (1, 1), (2 / 3, 1 / 3) * 4, (1.5, 0.5, 1, 1)),
    "folk": STRAIGHT[:4] + ((1, 0.5, 0.5, 2),),
    "ambient": ((4,), (2, 2), (3, 1)),
    "electronic": ((0.5,) * 8, (0.5, 0.5, 1) * 2, (0.25,) * 4 + (0.5, 0.5, 1, 1)),
    "pop": STRAIGHT + ((0.5, 1, 0.5, 2),),
    "cinematic": ((2, 2), (3, 1), (1, 1, 2), (4,)),
    "lullaby": ((2, 1, 1), (3, 1), (2, 2)),
}
STEPS = (-2, -1, -1, 0, 1, 1, 2, -3, 3, 4, -4)
GLITCH_CLIP_RATE = 0.1  # share of corpus clips with one or two glitch frames


def scale_pitches(attributes: Attributes) -> list[int]:
    tonic = PITCH_CLASSES.index(attributes.tonic)
    low, high = REGISTER_RANGES[attributes.register]
    scale = {(tonic + d) % 12 for d in SCALES[attributes.mode]}
    return [p for p in range(low, high + 1) if p % 12 in scale]


def _velocity(attributes: Attributes, phrase: int, strong: bool) -> int:
    if attributes.dynamics == "soft":
        return 0
    if attributes.dynamics == "loud":
        return 1
    return (phrase + int(strong)) % 2 if phrase % 2 else phrase % 2


def compose(attributes: Attributes, n_frames: int, rng: random.Random) -> tuple[list[int], int]:
    """Tokens for `n_frames` frames and the number of glitch frames inserted."""
    pitches = scale_pitches(attributes)
    tonic_pc = PITCH_CLASSES.index(attributes.tonic)
    scale = SCALES[attributes.mode]
    triad_pcs = {(tonic_pc + scale[d]) % 12 for d in TRIAD_DEGREES}
    frames_per_beat = codec.FRAME_RATE * 60.0 / attributes.bpm
    rhythms = RHYTHMS[attributes.genre]
    tonics = [i for i, p in enumerate(pitches) if p % 12 == tonic_pc]
    position = tonics[len(tonics) // 2] if tonics else len(pitches) // 2

    tokens: list[int] = []
    phrase = 0
    while len(tokens) < n_frames:
        family = attributes.instruments[phrase % len(attributes.instruments)]
        for bar in range(2):
            beats = rng.choice(rhythms)
            for k, length in enumerate(beats):
                strong = k == 0
                position = min(max(position + rng.choice(STEPS), 0), len(pitches) - 1)
                if strong or rng.random() < 0.3:  # land on the tonic triad: the mode is audible
                    nearby = [
                        i
                        for i in range(max(0, position - 2), min(len(pitches), position + 3))
                        if pitches[i] % 12 in triad_pcs
                    ]
                    position = rng.choice(nearby) if nearby else position
                if bar == 1 and k == len(beats) - 1 and tonics:  # phrases end home
                    position = min(tonics, key=lambda i: abs(i - position))
                frames = max(1, round(length * frames_per_beat))
                sounding = frames
                if attributes.texture == "staccato":
                    sounding = max(1, frames // 2)
                elif attributes.texture == "sparse" and rng.random() < 0.35:
                    sounding = 0
                velocity = _velocity(attributes, phrase, strong)
                if sounding:
                    tokens.append(codec.note_token(family, pitches[position], velocity))
                    tokens += [codec.HOLD] * (sounding - 1)
                tokens += [codec.REST] * (frames - sounding)
        rest_beats = rng.choice((1, 2, 3)) if attributes.texture == "sparse" else rng.choice((0, 0, 1))
        tokens += [codec.REST] * round(rest_beats * frames_per_beat)
        phrase += 1
    tokens = tokens[:n_frames]
    glitches = 0
    if n_frames and rng.random() < GLITCH_CLIP_RATE:
        glitches = rng.choice((1, 1, 2))
        for frame in rng.sample(range(n_frames), min(glitches, n_frames)):
            tokens[frame] = rng.choice(codec.GLITCH_TOKENS)
    return tokens, glitches
