"""Hand-made WAV and FLAC headers that claim whatever a test needs, with little or no audio after them.

libsndfile reads their sample rate, channel count and length like a real file's,
but decoding them fails or yields a few samples: a limit that is checked on the
header answers differently from one that is only met after decoding.
"""

from __future__ import annotations

import struct


def wav_header(sample_rate: int, channels: int, seconds: float = 10.0, data: bytes = b"") -> bytes:
    """A 16-bit PCM WAV header claiming ``seconds`` of audio, followed only by ``data``.

    libsndfile counts a WAV's frames from the bytes actually present, so this
    file holds ``len(data) // (2 * channels)`` frames whatever it claims.
    """
    block = 2 * channels
    size = int(sample_rate * seconds) * block
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block, block, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", size)
        + data
    )


def flac_header(sample_rate: int, channels: int, seconds: float = 10.0) -> bytes:
    """A FLAC stream of only its STREAMINFO block, claiming ``seconds`` of 16-bit audio (42 bytes).

    FLAC takes its length from STREAMINFO: libsndfile reports all the claimed
    frames, and reading them fails (there are none).
    """
    total = int(sample_rate * seconds)
    packed = (sample_rate << 44) | ((channels - 1) << 41) | (15 << 36) | total
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info
