import numpy as np
import pytest
from audio_headers import flac_header, wav_header

from musicrl.audio import codec
from musicrl.audio.features import HOP, N_MELS, log_mel
from musicrl.audio.formats import (
    AudioFormatError,
    AudioLimits,
    AudioOutOfRange,
    AudioTooLarge,
    check_header,
    decode_audio,
    encode_audio,
    read_header,
)

pytestmark = pytest.mark.unit


def random_tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    tokens: list[int] = []
    while len(tokens) < n:
        r = rng.random()
        if r < 0.1:
            tokens.append(codec.REST)
        elif r < 0.13:
            tokens.append(int(rng.choice(codec.GLITCH_TOKENS)))
        else:
            tokens.append(int(rng.integers(codec.NOTE_OFFSET, codec.VOCAB_SIZE)))
            tokens += [codec.HOLD] * int(rng.integers(0, 6))
    return np.array(tokens[:n])


def test_decode_is_deterministic_bounded_and_has_the_contract_length():
    tokens = random_tokens(np.random.default_rng(0), 37)
    first, second = codec.decode(tokens), codec.decode(tokens.copy())
    assert first.dtype == np.float32
    assert len(first) == 37 * codec.SAMPLE_RATE // codec.FRAME_RATE
    assert np.array_equal(first, second)
    assert np.abs(first).max() <= 1.0
    assert np.abs(first).max() > 0.05


def test_frames_for_and_vocabulary_layout():
    assert codec.frames_for(10.0) == 80
    assert codec.VOCAB_SIZE == codec.NOTE_OFFSET + 8 * 48 * 2
    token = codec.note_token("piano", 60, 0)
    assert codec.token_note(token) == codec.Note(0, 60, 0)
    assert codec.token_name(token) == "piano:60:soft"
    with pytest.raises(ValueError):
        codec.note_token("kazoo", 60)
    with pytest.raises(ValueError):
        codec.frames_for(-1)


def test_decode_rejects_out_of_vocabulary_and_non_integer_tokens():
    with pytest.raises(ValueError, match="token ids"):
        codec.decode(np.array([codec.VOCAB_SIZE]))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="one-dimensional"):
        codec.decode(np.zeros((2, 3), dtype=np.int64))


def test_silent_tokens_decode_to_silence_and_canonicalise_to_rest():
    tokens = np.array([codec.BOS, codec.PAD, codec.HOLD, codec.REST])
    assert not codec.decode(tokens).any()
    assert codec.canonical(tokens).tolist() == [codec.REST] * 4


def test_hold_and_repeated_onset_sound_different():
    note = codec.note_token("organ", 57, 1)
    held = codec.decode(np.array([note, codec.HOLD]))
    repeated = codec.decode(np.array([note, note]))
    assert not np.allclose(held, repeated)


@pytest.mark.parametrize("seed", range(5))
def test_encode_recovers_tokens_of_clean_renders(seed):
    tokens = random_tokens(np.random.default_rng(seed), 80)
    recovered = codec.encode(codec.decode(tokens), codec.SAMPLE_RATE)
    assert recovered.dtype == np.int64
    assert np.mean(recovered == codec.canonical(tokens)) >= 0.97


def test_encode_survives_mp3_and_resampling():
    tokens = random_tokens(np.random.default_rng(7), 48)
    wave = codec.decode(tokens)
    mp3, sr = decode_audio(encode_audio(wave, codec.SAMPLE_RATE, "mp3"))
    assert np.mean(codec.encode(mp3[: len(wave)], sr) == codec.canonical(tokens)) >= 0.9
    from scipy.signal import resample_poly

    upsampled = resample_poly(wave, 2, 1)
    assert np.mean(codec.encode(upsampled, 32_000) == codec.canonical(tokens)) >= 0.9


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_formats_round_trip(fmt):
    wave = codec.decode(random_tokens(np.random.default_rng(3), 16))
    data = encode_audio(wave, codec.SAMPLE_RATE, fmt)
    decoded, sr = decode_audio(data)
    assert sr == codec.SAMPLE_RATE
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - len(wave)) <= 2 * 1152  # mp3 frames pad the end
    n = min(len(decoded), len(wave))
    if fmt in ("wav", "flac"):
        assert np.max(np.abs(decoded[:n] - wave[:n])) < 1e-3
    else:  # lossy: the spectrum survives
        assert np.corrcoef(log_mel(decoded[:n]).ravel(), log_mel(wave[:n]).ravel())[0, 1] > 0.9


def test_formats_reject_bad_input():
    with pytest.raises(AudioFormatError, match="unsupported"):
        encode_audio(np.zeros(10), 16000, "aac")
    with pytest.raises(AudioFormatError, match="cannot decode"):
        decode_audio(b"definitely not audio")
    with pytest.raises(AudioFormatError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioFormatError, match="NaN"):
        encode_audio(np.array([np.nan], dtype=np.float32), 16000)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (wav_header(1_000_000, 1, data=bytes(1000)), AudioOutOfRange, "sample rate 1000000 Hz"),
        (wav_header(16_000, 64), AudioOutOfRange, "64 channels"),
        (flac_header(1_000_000, 1), AudioOutOfRange, "sample rate 1000000 Hz"),
        (flac_header(16_000, 8), AudioOutOfRange, "8 channels"),
        (flac_header(48_000, 2, seconds=3 * 3600), AudioTooLarge, "10800.0 s of audio, the limit is 600 s"),
    ],
)
def test_decode_refuses_headers_outside_the_limits_before_decoding(monkeypatch, data, error, match):
    import soundfile

    monkeypatch.setattr(soundfile, "read", lambda *a, **k: pytest.fail("decoded despite the header"))
    with pytest.raises(error, match=match):
        decode_audio(data)


def test_header_limits_are_parameters():
    header = read_header(flac_header(44_100, 2, seconds=20))
    assert (header.samplerate, header.channels, header.frames) == (44_100, 2, 882_000)
    check_header(header)  # the defaults: 8..48 kHz, 2 channels, 600 s
    with pytest.raises(AudioTooLarge, match="20.0 s of audio, the limit is 10 s"):
        check_header(header, AudioLimits(max_seconds=10))
    with pytest.raises(AudioOutOfRange, match="outside the accepted 8000..32000 Hz"):
        check_header(header, AudioLimits(max_sample_rate=32_000))
    with pytest.raises(AudioOutOfRange, match="2 channels, at most 1"):
        check_header(header, AudioLimits(max_channels=1))
    check_header(header, AudioLimits(max_seconds=None))
    assert AudioLimits(max_seconds=60).max_samples == 60 * 48_000 * 2
    assert AudioLimits(max_seconds=None).max_samples is None
    # limits=None skips the header check: this header then fails in the decoder instead.
    with pytest.raises(AudioFormatError, match="cannot decode"):
        decode_audio(flac_header(1_000_000, 1), limits=None)
    with pytest.raises(AudioFormatError, match="cannot decode"):
        read_header(b"RIFF" + bytes(40))


def test_log_mel_shape_and_silence_floor():
    mel = log_mel(np.zeros(16000, dtype=np.float32))
    assert mel.shape == (N_MELS, 16000 // HOP)
    assert mel.dtype == np.float32
    assert np.allclose(mel, np.log(1e-5))
    tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    loudest_band = log_mel(tone).mean(axis=1).argmax()
    assert 0 < loudest_band < N_MELS - 1
