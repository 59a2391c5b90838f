"""Frame-level audio tokens over a synthesizer vocabulary.

One token per 125 ms frame (`FRAME_RATE` = 8). A token is a special
(PAD, BOS, REST, HOLD), a glitch (NOISE burst, CLICK crackle: rare artefacts the
quality reward learns to penalise) or a note onset: instrument family x MIDI
pitch x velocity. HOLD sustains the sounding note by one more frame.
`decode` renders tokens with `musicrl.audio.synth`; `encode` analyses a waveform
back into tokens (spectral template shortlist, then analysis by synthesis).
See docs/audio_tokens.md for the trade-offs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from musicrl.audio import synth

SAMPLE_RATE = synth.SAMPLE_RATE
FRAME_RATE = 8
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAME_RATE

PAD, BOS, REST, HOLD, NOISE, CLICK = range(6)
SPECIAL_NAMES = ("PAD", "BOS", "REST", "HOLD", "NOISE", "CLICK")
GLITCH_TOKENS = (NOISE, CLICK)
NOTE_OFFSET = len(SPECIAL_NAMES)

FAMILIES = synth.FAMILIES
LOWEST_PITCH = 36  # C2
N_PITCHES = 48  # four octaves: C2..B5
N_VELOCITIES = 2  # 0 soft, 1 loud
N_NOTE_TOKENS = len(FAMILIES) * N_PITCHES * N_VELOCITIES
VOCAB_SIZE = NOTE_OFFSET + N_NOTE_TOKENS

# Every note fades out over its last 10 ms so that consecutive onsets never click.
RELEASE_SAMPLES = 160
SILENCE_RMS = 2e-3


@dataclass(frozen=True)
class Note:
    family: int
    pitch: int  # MIDI
    velocity: int  # 0 soft, 1 loud

    @property
    def family_name(self) -> str:
        return FAMILIES[self.family]


def frames_for(duration_s: float) -> int:
    """Number of token frames for a clip of `duration_s` seconds (rounded to the nearest frame)."""
    if duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    return int(round(duration_s * FRAME_RATE))


def note_token(family: int | str, pitch: int, velocity: int = 1) -> int:
    family_index = FAMILIES.index(family) if isinstance(family, str) else int(family)
    if not 0 <= family_index < len(FAMILIES):
        raise ValueError(f"unknown instrument family {family!r}")
    if not LOWEST_PITCH <= pitch < LOWEST_PITCH + N_PITCHES:
        raise ValueError(f"pitch {pitch} outside MIDI {LOWEST_PITCH}..{LOWEST_PITCH + N_PITCHES - 1}")
    if velocity not in (0, 1):
        raise ValueError(f"velocity must be 0 (soft) or 1 (loud), got {velocity}")
    return NOTE_OFFSET + ((family_index * N_PITCHES) + pitch - LOWEST_PITCH) * N_VELOCITIES + velocity


def is_note(token: int) -> bool:
    return NOTE_OFFSET <= token < VOCAB_SIZE


def token_note(token: int) -> Note:
    if not is_note(token):
        raise ValueError(f"token {token} is not a note token")
    index, velocity = divmod(token - NOTE_OFFSET, N_VELOCITIES)
    family, pitch = divmod(index, N_PITCHES)
    return Note(family, LOWEST_PITCH + pitch, velocity)


def token_name(token: int) -> str:
    if 0 <= token < NOTE_OFFSET:
        return SPECIAL_NAMES[token]
    note = token_note(token)
    return f"{note.family_name}:{note.pitch}:{'loud' if note.velocity else 'soft'}"


def _validate(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    tokens = tokens.astype(np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got min {tokens.min()} max {tokens.max()}")
    return tokens


def canonical(tokens: np.ndarray) -> np.ndarray:
    """The token sequence that sounds the same with every silent frame written as REST.

    PAD, BOS and a HOLD with no sounding note (after REST or a glitch) are silence.
    `encode(decode(t))` aims at `canonical(t)`.
    """
    tokens = _validate(tokens).copy()
    sounding = False
    for i, token in enumerate(tokens):
        if is_note(token):
            sounding = True
        elif token == HOLD and sounding:
            continue
        else:
            if token in (PAD, BOS, HOLD):
                tokens[i] = REST
            sounding = False
    return tokens


def _notes(tokens: np.ndarray) -> list[tuple[int, int, int]]:
    """(start frame, length in frames, token) of each note and glitch event."""
    events: list[tuple[int, int, int]] = []
    sounding = False
    for i, token in enumerate(tokens.tolist()):
        if token == HOLD and sounding:
            start, length, note = events[-1]
            events[-1] = (start, length + 1, note)
            continue
        sounding = is_note(token)
        if sounding or token in GLITCH_TOKENS:
            events.append((i, 1, token))
    return events


class _SegmentCache:
    """Rendered event waveforms keyed by (token, samples), least recently used first out, bounded in bytes.

    An event's samples depend only on its token and length (every note is rendered from its own
    onset), and token sequences repeat notes, so decoding mostly copies cached segments. Shared by
    the threads that decode, hence the lock.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._segments: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: int, n: int) -> np.ndarray:
        key = (token, n)
        with self._lock:
            segment = self._segments.get(key)
            if segment is not None:
                self._segments.move_to_end(key)
                return segment
        segment = _render_event(token, n)
        segment.setflags(write=False)
        with self._lock:
            if key not in self._segments and segment.nbytes <= self.max_bytes:
                self._segments[key] = segment
                self.bytes += segment.nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._segments.popitem(last=False)[1].nbytes
        return segment

    def clear(self) -> None:
        with self._lock:
            self._segments.clear()
            self.bytes = 0


def _render_event(token: int, n: int) -> np.ndarray:
    """The float32 samples, clipped to [-1, 1], of a note (with its release) or glitch lasting n samples."""
    if token in GLITCH_TOKENS:
        segment = synth.glitch_waves(SAMPLES_PER_FRAME)[GLITCH_TOKENS.index(token)][:n]
    else:
        note = token_note(token)
        segment = synth.render_note(note.family, note.pitch, note.velocity == 0, 0, n)
        segment[-RELEASE_SAMPLES:] *= synth._fade(RELEASE_SAMPLES)[::-1]
    return np.clip(segment, -1.0, 1.0).astype(np.float32)


# 32 MiB holds about a thousand typical notes (1 to 4 frames, 8 KiB a frame).
SEGMENT_CACHE = _SegmentCache(max_bytes=32 * 2**20)


def decode(tokens: np.ndarray) -> np.ndarray:
    """Render tokens to a mono float32 waveform in [-1, 1] of len(tokens) * SAMPLES_PER_FRAME samples."""
    tokens = _validate(tokens)
    wave = np.zeros(len(tokens) * SAMPLES_PER_FRAME, dtype=np.float32)
    # Events never overlap, so clipping each one before placing it equals clipping the whole wave.
    for start, length, token in _notes(tokens):
        begin, n = start * SAMPLES_PER_FRAME, length * SAMPLES_PER_FRAME
        wave[begin : begin + n] = SEGMENT_CACHE.get(token, n)
    return wave


# ---------------------------------------------------------------- analysis

_ANALYSIS = SAMPLES_PER_FRAME - RELEASE_SAMPLES  # the part of a frame that the next token cannot change
_SHORTLIST = 6


@lru_cache(maxsize=1)
def _templates() -> np.ndarray:
    """Normalised compressed magnitude spectra of every note token's onset frame, in token order."""
    return _spectrum(np.stack([_onset_wave(NOTE_OFFSET + i) for i in range(N_NOTE_TOKENS)]))


@lru_cache(maxsize=N_NOTE_TOKENS)
def _onset_wave(token: int) -> np.ndarray:
    note = token_note(token)
    return synth.render_note(note.family, note.pitch, note.velocity == 0, 0, _ANALYSIS)


def _spectrum(frames: np.ndarray) -> np.ndarray:
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(frames.shape[-1]), axis=-1)) ** 0.5
    return magnitude / (np.linalg.norm(magnitude, axis=-1, keepdims=True) + 1e-12)


def _resample(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return wave
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(sample_rate), SAMPLE_RATE)
    return resample_poly(wave, SAMPLE_RATE // g, int(sample_rate) // g)


def encode(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Analyse a mono waveform into one token per frame (int64).

    Per frame: silence -> REST; otherwise the shortlist of notes whose onset
    spectrum matches best, HOLD of the sounding note and the two glitches are
    re-synthesised and the hypothesis with the smallest squared error wins.
    """
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if wave.ndim != 1:
        raise ValueError(f"wave must be mono (1-D) or (samples, channels), got shape {wave.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    wave = _resample(wave, sample_rate)
    n_frames = int(round(len(wave) / SAMPLES_PER_FRAME))
    wave = np.pad(wave, (0, max(0, n_frames * SAMPLES_PER_FRAME - len(wave))))[: n_frames * SAMPLES_PER_FRAME]
    frames = wave.reshape(n_frames, SAMPLES_PER_FRAME)[:, :_ANALYSIS]
    if n_frames == 0:
        return np.zeros(0, dtype=np.int64)
    similarity = _spectrum(frames) @ _templates().T
    shortlist = np.argsort(-similarity, axis=1)[:, :_SHORTLIST]
    glitches = [
        (token, w[:_ANALYSIS]) for token, w in zip(GLITCH_TOKENS, synth.glitch_waves(SAMPLES_PER_FRAME), strict=True)
    ]
    tokens = np.full(n_frames, REST, dtype=np.int64)
    sounding: tuple[Note, int] | None = None  # note and its onset frame
    for i, x in enumerate(frames):
        if np.sqrt(np.mean(x**2)) < SILENCE_RMS:
            sounding = None
            continue
        hypotheses: list[tuple[int, np.ndarray]] = list(glitches)
        if sounding is not None:
            note, onset = sounding
            held = synth.render_note(
                note.family, note.pitch, note.velocity == 0, (i - onset) * SAMPLES_PER_FRAME, _ANALYSIS
            )
            hypotheses.append((HOLD, held))
        hypotheses += [(NOTE_OFFSET + int(index), _onset_wave(NOTE_OFFSET + int(index))) for index in shortlist[i]]
        errors = [np.sum((x - y) ** 2) for _, y in hypotheses]
        token = hypotheses[int(np.argmin(errors))][0]
        tokens[i] = token
        if is_note(token):
            sounding = (token_note(token), i)
        elif token != HOLD:
            sounding = None
    return tokens
