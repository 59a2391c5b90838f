"""Audio file formats (wav, flac, ogg/vorbis, mp3) to and from bytes, through libsndfile.

``decode_audio`` reads the file's header first and refuses, before a single
sample is decoded, a file whose sample rate, channel count or length is outside
its ``AudioLimits``: a compressed file of a few KB can otherwise claim hours of
audio at a megahertz on dozens of channels, gigabytes of decode and resampling.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import soundfile as sf

# (libsndfile container, subtype) per format name.
FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}


class AudioFormatError(ValueError):
    """Audio bytes that cannot be decoded, or a format that is not supported."""


class AudioOutOfRange(AudioFormatError):
    """The header asks for a sample rate or a channel count outside the accepted range."""


class AudioTooLarge(AudioFormatError):
    """The header asks for more audio (seconds, or decoded samples) than the limit."""


@dataclass(frozen=True)
class AudioLimits:
    """What a header may ask for before anything is decoded.

    The sample-rate range covers telephone audio (8 kHz) up to CLAP's 48 kHz
    (the codec works at 16 kHz, MusicGen at 32 kHz); more than two channels is
    not music a listener hears. ``max_seconds`` None leaves the length unbounded.
    """

    max_seconds: float | None = 600.0
    min_sample_rate: int = 8_000
    max_sample_rate: int = 48_000
    max_channels: int = 2

    @property
    def max_samples(self) -> int | None:
        """Most decoded samples (frames x channels): the duration limit at the highest rate, on every channel."""
        if self.max_seconds is None:
            return None
        return int(self.max_seconds * self.max_sample_rate) * self.max_channels


DEFAULT_LIMITS = AudioLimits()


class AudioHeader(Protocol):
    samplerate: int
    channels: int
    frames: int


def read_header(data: bytes) -> AudioHeader:
    """The header of audio bytes (``soundfile.info``): sample rate, channels, frames. Decodes no sample."""
    if not data:
        raise AudioFormatError("empty audio payload")
    try:
        return sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise AudioFormatError(f"cannot decode audio: {error}") from error


def check_header(header: AudioHeader, limits: AudioLimits = DEFAULT_LIMITS) -> None:
    """Raise ``AudioOutOfRange`` or ``AudioTooLarge`` if the header asks for more than ``limits`` allow."""
    rate, channels, frames = int(header.samplerate), int(header.channels), int(header.frames)
    if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
        raise AudioOutOfRange(
            f"sample rate {rate} Hz is outside the accepted {limits.min_sample_rate}..{limits.max_sample_rate} Hz"
        )
    if not 1 <= channels <= limits.max_channels:
        raise AudioOutOfRange(f"{channels} channels, at most {limits.max_channels} accepted")
    if limits.max_seconds is not None and frames / rate > limits.max_seconds:
        raise AudioTooLarge(f"{frames / rate:.1f} s of audio, the limit is {limits.max_seconds:g} s")
    # Implied by the checks above; stated so the bound on decode memory does not depend on their order.
    max_samples = limits.max_samples
    if max_samples is not None and frames * channels > max_samples:
        raise AudioTooLarge(f"{frames * channels} samples to decode, the limit is {max_samples}")


def encode_audio(wave: np.ndarray, sample_rate: int, fmt: str = "wav") -> bytes:
    """Encode a mono float waveform in [-1, 1] (values outside are clipped) as `fmt` bytes."""
    if fmt not in FORMATS:
        raise AudioFormatError(f"unsupported audio format {fmt!r}; choose one of {sorted(FORMATS)}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise AudioFormatError(f"expected a mono 1-D waveform, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise AudioFormatError("waveform contains NaN or infinite samples")
    container, subtype = FORMATS[fmt]
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), int(sample_rate), format=container, subtype=subtype)
    return buffer.getvalue()


def decode_audio(data: bytes, limits: AudioLimits | None = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    """Decode audio bytes of any supported format to (mono float32 waveform, sample rate).

    The header is checked against ``limits`` first (``AudioOutOfRange``, ``AudioTooLarge``);
    ``limits=None`` skips the check, for bytes this process wrote itself.
    """
    if limits is not None:
        check_header(read_header(data), limits)
    elif not data:
        raise AudioFormatError("empty audio payload")
    try:
        wave, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioFormatError(f"cannot decode audio: {error}") from error
    return wave.mean(axis=1).astype(np.float32), int(sample_rate)
