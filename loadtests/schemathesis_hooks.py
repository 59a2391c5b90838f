"""Schemathesis extension hooks (``SCHEMATHESIS_HOOKS=loadtests.schemathesis_hooks``).

The reward service's ``audio_b64`` has the OpenAPI format ``audio-base64``
(``musicrl.schemas.scores.AUDIO_FORMAT``): base64 of a WAV or FLAC file. No JSON Schema
can say what a decodable file is, so schemathesis gets a generator of real ones: a tone
of 0.5 to 3 s at a sample rate and channel count inside the service's default limits,
as WAV (PCM or float) or FLAC. Its positive tests then reach the scoring code instead of
the decoder's 422, and its negative tests still send arbitrary strings.
"""

from __future__ import annotations

import base64

import numpy as np
import schemathesis
from hypothesis import strategies as st

from musicrl.audio.formats import encode_audio
from musicrl.schemas.scores import AUDIO_FORMAT

SAMPLE_RATES = (8_000, 16_000, 22_050, 32_000, 44_100, 48_000)  # reward_min/max_sample_rate defaults: 8 to 48 kHz


@st.composite
def audio_files(draw) -> str:
    sample_rate = draw(st.sampled_from(SAMPLE_RATES))
    seconds = draw(st.floats(0.5, 3.0))
    frequency = draw(st.floats(55.0, 2_000.0))
    fmt = draw(st.sampled_from(("wav", "flac")))
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return base64.b64encode(encode_audio(wave, sample_rate, fmt)).decode()


schemathesis.openapi.format(AUDIO_FORMAT, audio_files())
