"""`codec.decode` renders each (token, length) event once and copies it afterwards: the cache
must never change a single sample."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from musicrl.audio import codec, synth
from musicrl.corpus.dataset import make_corpus

pytestmark = pytest.mark.unit


def reference_decode(tokens: np.ndarray) -> np.ndarray:
    """decode as it was written before the cache: the whole wave in float64, clipped once at the end."""
    tokens = codec._validate(tokens)
    wave = np.zeros(len(tokens) * codec.SAMPLES_PER_FRAME, dtype=np.float64)
    release = synth._fade(codec.RELEASE_SAMPLES)[::-1]
    glitches = dict(zip(codec.GLITCH_TOKENS, synth.glitch_waves(codec.SAMPLES_PER_FRAME), strict=True))
    for start, length, token in codec._notes(tokens):
        begin, n = start * codec.SAMPLES_PER_FRAME, length * codec.SAMPLES_PER_FRAME
        if token in glitches:
            wave[begin : begin + n] = glitches[token]
            continue
        note = codec.token_note(token)
        segment = synth.render_note(note.family, note.pitch, note.velocity == 0, 0, n)
        segment[-codec.RELEASE_SAMPLES :] *= release
        wave[begin : begin + n] = segment
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def token_sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    corpus = [record.tokens for record in make_corpus(8, seed=3, split="test", duration_s=6.0)]
    uniform = [rng.integers(0, codec.VOCAB_SIZE, 60) for _ in range(4)]
    # Mostly HOLD: long notes, and HOLDs after glitches and rests (which must stay silent).
    held = [np.where(rng.random(80) < 0.7, codec.HOLD, rng.integers(0, codec.VOCAB_SIZE, 80)) for _ in range(4)]
    loud = [np.full(40, codec.note_token("brass", 60, 1)), np.array([codec.NOISE, codec.HOLD, codec.CLICK, codec.REST])]
    return corpus + uniform + held + loud


def test_decode_is_bit_identical_to_the_uncached_render_cold_and_warm():
    codec.SEGMENT_CACHE.clear()
    for tokens in token_sequences():
        expected = reference_decode(tokens)
        cold, warm = codec.decode(tokens), codec.decode(tokens)
        assert cold.dtype == np.float32 and cold.shape == expected.shape
        assert np.array_equal(cold, expected) and np.array_equal(warm, expected)
    assert codec.SEGMENT_CACHE.bytes > 0


def test_decoded_waves_are_private_copies_and_cached_segments_are_read_only():
    tokens = np.array([codec.note_token("piano", 60, 1), codec.HOLD, codec.note_token("piano", 60, 1)])
    first = codec.decode(tokens)
    first[:] = 0.5  # the caller owns its wave
    assert np.array_equal(codec.decode(tokens), reference_decode(tokens))
    segment = codec.SEGMENT_CACHE.get(int(tokens[0]), codec.SAMPLES_PER_FRAME)
    with pytest.raises(ValueError):
        segment[0] = 1.0


def test_the_cache_stays_within_its_byte_budget_and_evicts_least_recently_used():
    frame_bytes = codec.SAMPLES_PER_FRAME * 4
    cache = codec._SegmentCache(max_bytes=3 * frame_bytes)
    notes = [codec.note_token("flute", pitch, 0) for pitch in (60, 62, 64, 65)]
    for token in notes[:3]:
        cache.get(token, codec.SAMPLES_PER_FRAME)
    cache.get(notes[0], codec.SAMPLES_PER_FRAME)  # now the most recently used
    cache.get(notes[3], codec.SAMPLES_PER_FRAME)  # evicts notes[1]
    assert cache.bytes <= cache.max_bytes
    assert set(cache._segments) == {(notes[0], 2000), (notes[2], 2000), (notes[3], 2000)}
    # A segment larger than the whole budget is rendered but not kept.
    long = cache.get(notes[1], 8 * codec.SAMPLES_PER_FRAME)
    assert cache.bytes <= cache.max_bytes and (notes[1], 8 * codec.SAMPLES_PER_FRAME) not in cache._segments
    assert np.array_equal(long, codec._render_event(notes[1], 8 * codec.SAMPLES_PER_FRAME))


def test_concurrent_decodes_agree_with_the_reference():
    sequences = token_sequences()
    codec.SEGMENT_CACHE.clear()
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(codec.decode, sequences * 3))
    for tokens, wave in zip(sequences * 3, decoded, strict=True):
        assert np.array_equal(wave, reference_decode(tokens))
