"""CLAP as the text-adherence reward, on a tiny random ClapModel saved with save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
from pretrained_helpers import (
    one_thread_per_module,  # noqa: F401 - autouse fixture
    tiny_clap,
)

from musicrl.audio.features import resample
from musicrl.rewards import AudioTextModel, Clip, RewardModels, RewardSuite, load_component
from musicrl.rewards.clap import ClapTextAdherence
from musicrl.rewards.tiny import TinyQuality
from musicrl.text import HashingTextEncoder
from musicrl.weights import directory_digest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return tiny_clap(tmp_path_factory.mktemp("clap"))


@pytest.fixture(scope="module")
def clap(clap_dir):
    return load_component("text_adherence", clap_dir, "clap")


class CountingClap:
    """The loaded CLAP, recording the windows the suite hands it."""

    def __init__(self, inner: ClapTextAdherence):
        self.inner, self.version, self.sample_rate = inner, inner.version, inner.sample_rate
        self.window_lengths: list[int] = []

    def embed_text(self, prompts):
        return self.inner.embed_text(prompts)

    def embed_waves(self, waves):
        self.window_lengths.extend(len(w) for w in waves)
        return self.inner.embed_waves(waves)


def suite_with(text_adherence) -> RewardSuite:
    return RewardSuite(
        RewardModels(
            text_adherence=text_adherence, quality=TinyQuality(), preference=None, text_encoder=HashingTextEncoder()
        )
    )


def noise(seconds: float, rate: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def test_configuration_loads_clap_from_a_save_pretrained_directory(clap, clap_dir):
    assert isinstance(clap, ClapTextAdherence) and isinstance(clap, AudioTextModel)
    assert clap.sample_rate == 48_000
    assert clap.version == f"clap-{directory_digest(clap_dir)}"
    assert load_component("text_adherence", clap_dir, "clap", version="7").version == "7"  # the registry's, when known
    text, audio = clap.embed_text(["calm piano", "fast drums"]), clap.embed_waves(np.stack([noise(2.0, 48_000, 0)]))
    assert text.shape == (2, 16) and audio.shape == (1, 16)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(audio, axis=1), 1.0, atol=1e-5)


def test_the_version_follows_the_weights(tmp_path):
    first, second = tiny_clap(tmp_path / "a", seed=0), tiny_clap(tmp_path / "b", seed=1)
    assert directory_digest(first) != directory_digest(second)
    assert directory_digest(first) == directory_digest(tiny_clap(tmp_path / "c", seed=0))


def test_clap_is_only_a_text_adherence_model(clap_dir):
    with pytest.raises(ValueError, match="text_adherence model, not a quality model"):
        load_component("quality", clap_dir, "clap")


def test_each_clip_is_scored_in_10_s_windows_at_48_khz_and_the_cosines_averaged(clap):
    counting = CountingClap(clap)
    clips = [
        Clip("calm piano", wave=noise(4.0, 16_000, 1)),
        Clip("fast drums", wave=noise(10.0, 16_000, 2)),
        Clip("sad strings", wave=noise(25.0, 16_000, 3)),
        Clip("calm piano", wave=noise(23.0, 16_000, 4)),
    ]
    scores = suite_with(counting).score(clips, components=["text_adherence"])
    # 4 s and 10 s: one window each; 25 s: 0-10, 10-20 and the last 10 s (the 5 s remainder counts);
    # 23 s: two windows (a 3 s remainder is dropped)
    assert sorted(counting.window_lengths) == [192_000] + [480_000] * 6

    wave = resample(clips[2].wave, 16_000, 48_000)
    windows = np.stack([wave[:480_000], wave[480_000:960_000], wave[-480_000:]])
    expected = float(np.mean(clap.embed_waves(windows) @ clap.embed_text(["sad strings"])[0]))
    assert scores[2]["text_adherence"] == pytest.approx(expected, abs=1e-5)
    assert all(-1.0 <= s["text_adherence"] <= 1.0 for s in scores)
    assert scores[2]["combined"] == pytest.approx(scores[2]["text_adherence"])


def test_audio_reaches_clap_at_its_own_rate_and_scores_are_deterministic(clap):
    wave48 = noise(6.0, 48_000, 5)
    expected = float((clap.embed_waves(wave48[None]) @ clap.embed_text(["slow guitar"])[0])[0])
    suite = suite_with(clap)
    first = suite.score(
        [Clip("slow guitar", wave=wave48, sample_rate=48_000)], components=["text_adherence", "quality"]
    )[0]
    again = suite.score(
        [Clip("slow guitar", wave=wave48, sample_rate=48_000)], components=["text_adherence", "quality"]
    )[0]
    assert first["text_adherence"] == pytest.approx(expected, abs=1e-6) and first == again
    assert first["quality_mos"] is not None  # the log-mel models still get their 16 kHz copy
