"""Audio file formats (wav, flac, ogg/vorbis, mp3) to and from bytes, through libsndfile."""

from __future__ import annotations

import io

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


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes of any supported format to (mono float32 waveform, sample rate)."""
    if not data:
        raise AudioFormatError("empty audio payload")
    try:
        wave, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioFormatError(f"cannot decode audio: {error}") from error
    return wave.mean(axis=1).astype(np.float32), int(sample_rate)
