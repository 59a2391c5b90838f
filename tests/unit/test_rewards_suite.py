import numpy as np
import pytest

from musicrl.audio import codec
from musicrl.audio.degrade import render_degraded
from musicrl.corpus import make_corpus
from musicrl.rewards import (
    Clip,
    PreferenceModel,
    QualityModel,
    RewardSuite,
    TextAdherenceModel,
    load_reward_models,
)
from musicrl.rewards.tiny import TinyPreference, TinyQuality, TinyTextAdherence

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_suite():
    return RewardSuite(load_reward_models(impl="tiny"))


def test_tiny_implementations_are_plugged_in_by_configuration(tiny_suite):
    models = tiny_suite.models
    assert isinstance(models.text_adherence, TinyTextAdherence) and isinstance(
        models.text_adherence, TextAdherenceModel
    )
    assert isinstance(models.quality, TinyQuality) and isinstance(models.quality, QualityModel)
    assert isinstance(models.preference, TinyPreference) and isinstance(models.preference, PreferenceModel)
    assert tiny_suite.versions == {
        "text_adherence": "tiny-1",
        "quality": "tiny-1",
        "preference": "tiny-1",
        "text_encoder": "hashing",
    }


def test_suite_scores_tokens_and_audio_alike(tiny_suite):
    record = make_corpus(1, seed=5)[0]
    from_tokens, from_audio = tiny_suite.score(
        [Clip(record.caption, tokens=record.tokens), Clip(record.caption, wave=record.render())]
    )
    for key in ("text_adherence", "quality_mos", "quality"):
        assert from_tokens[key] == pytest.approx(from_audio[key], abs=1e-5)
    # audio-only clips reach the preference model through codec.encode
    assert from_tokens["preference"] == pytest.approx(from_audio["preference"], abs=1e-6)
    assert 1.0 <= from_tokens["quality_mos"] <= 5.0
    assert from_tokens["quality"] == pytest.approx((from_tokens["quality_mos"] - 1) / 4)


def test_combined_is_the_weighted_sum_of_requested_components(tiny_suite):
    record = make_corpus(1, seed=6)[0]
    clip = Clip(record.caption, tokens=record.tokens)
    full = tiny_suite.score([clip], weights={"text_adherence": 2.0, "quality": 0.5, "preference": -1.0})[0]
    assert full["combined"] == pytest.approx(
        2.0 * full["text_adherence"] + 0.5 * full["quality"] - full["preference"], abs=1e-6
    )
    partial = tiny_suite.score([clip], components=["quality"])[0]
    assert partial["text_adherence"] is None and partial["preference"] is None
    assert partial["combined"] == pytest.approx(partial["quality"])


def test_tiny_quality_and_preference_react_to_artefacts(tiny_suite):
    record = make_corpus(1, seed=7)[0]
    rng = np.random.default_rng(0)
    noisy = render_degraded(record.tokens, {"noise": 0.9}, rng)
    clean_score, noisy_score = tiny_suite.score(
        [Clip("x", tokens=record.tokens), Clip("x", wave=noisy)], components=["quality"]
    )
    assert noisy_score["quality_mos"] < clean_score["quality_mos"]
    glitched = record.tokens.copy()
    glitched[::4] = codec.NOISE
    clean_pref, glitched_pref = tiny_suite.score(
        [Clip("x", tokens=record.tokens), Clip("x", tokens=glitched)], components=["preference"]
    )
    assert glitched_pref["preference"] < clean_pref["preference"]


def test_long_clips_are_windowed(tiny_suite):
    long_tokens = np.concatenate([r.tokens for r in make_corpus(5, seed=8)])  # 50 s
    result = tiny_suite.score([Clip("a calm piano piece", tokens=long_tokens)])[0]
    assert np.isfinite(result["combined"])


def test_bad_requests_get_clear_errors(tiny_suite):
    with pytest.raises(ValueError, match="unknown reward components"):
        tiny_suite.score([Clip("x", tokens=np.array([codec.REST] * 8))], components=["loudness"])
    with pytest.raises(ValueError, match="shorter"):
        tiny_suite.score([Clip("x", wave=np.zeros(100, dtype=np.float32))])
    with pytest.raises(ValueError, match="audio or tokens"):
        tiny_suite.score([Clip("x")])
    with pytest.raises(ValueError, match="finite"):
        tiny_suite.score([Clip("x", wave=np.full(16000, np.nan, dtype=np.float32))])
    with pytest.raises(ValueError, match="unknown reward implementation"):
        load_reward_models(impl="tensorflow")
    assert tiny_suite.score([]) == []


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text_adherence checkpoint"):
        load_reward_models(tmp_path, impl="torch")
