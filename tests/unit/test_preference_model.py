"""Bradley-Terry preference reward model: init from the generator, loss, training, windows, ONNX."""

import math

import numpy as np
import pytest
import torch

from musicrl.audio import codec
from musicrl.models.generator import Generator, GeneratorConfig
from musicrl.models.preference import (
    OnnxPreferenceModel,
    PreferencePair,
    PreferenceRewardModel,
    PreferenceTrainingConfig,
    TorchPreferenceModel,
    bradley_terry_loss,
    clip_windows,
    load_preference_model,
    save_preference_model,
    train_preference_model,
)

pytestmark = pytest.mark.unit

TINY = GeneratorConfig(n_layers=2, n_heads=2, d_model=32, max_frames=64)


def melody(rng: np.random.Generator, family: str, n_frames: int) -> np.ndarray:
    """A random melody on one instrument family: note onsets and holds."""
    tokens = []
    for _ in range(n_frames):
        if tokens and rng.random() < 0.3:
            tokens.append(codec.HOLD)
        else:
            tokens.append(codec.note_token(family, int(rng.integers(55, 80)), int(rng.integers(0, 2))))
    return np.array(tokens, dtype=np.int64)


def instrument_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Listeners who always prefer the flute clip over a clip on another instrument, whatever the caption."""
    rng = np.random.default_rng(seed)
    others = [f for f in codec.FAMILIES if f != "flute"]
    pairs = []
    for _ in range(n):
        cond = rng.standard_normal(384).astype(np.float32)
        length = int(rng.integers(12, 24))
        pairs.append(PreferencePair(cond / np.linalg.norm(cond), melody(rng, "flute", length), melody(rng, others[rng.integers(len(others))], length)))
    return pairs


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    return Generator(TINY).eval()


def test_trunk_is_initialised_from_the_generator(generator):
    model = PreferenceRewardModel.from_generator(generator)
    generator_state = generator.state_dict()
    for name, tensor in model.trunk.state_dict().items():
        assert torch.equal(tensor, generator_state[name]), name
    # a copy, not an alias: training the reward model leaves the policy alone
    with torch.no_grad():
        model.trunk.blocks[0].mlp.fc.weight.add_(1.0)
    assert not torch.equal(model.trunk.blocks[0].mlp.fc.weight, generator.blocks[0].mlp.fc.weight)


def test_bradley_terry_loss_values():
    preferred, other = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (-math.log(1 / (1 + math.exp(-2.0))) + math.log(2.0)) / 2
    assert float(bradley_terry_loss(preferred, other)) == pytest.approx(expected, rel=1e-6)
    # a tie is fitted best by equal scores
    ties = torch.tensor([True])
    at_zero = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]), ties)
    off_zero = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), ties)
    assert float(at_zero) == pytest.approx(math.log(2.0)) and float(off_zero) > float(at_zero)


def test_training_learns_the_preference_and_generalises(generator):
    model = PreferenceRewardModel.from_generator(generator)
    config = PreferenceTrainingConfig(learning_rate=3e-3, optimizer="adamw", batch_size=16, epochs=3, window_frames=16, progress=False)
    metrics = train_preference_model(model, instrument_pairs(160, seed=1), config, heldout=instrument_pairs(60, seed=2))
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["heldout_accuracy"] > 0.8
    assert metrics["n_train_pairs"] == 160 and metrics["n_heldout_pairs"] == 60


def test_training_holds_out_a_seeded_fraction(generator):
    model = PreferenceRewardModel.from_generator(generator)
    config = PreferenceTrainingConfig(batch_size=8, max_steps=2, heldout_fraction=0.25, progress=False)
    metrics = train_preference_model(model, instrument_pairs(20, seed=3), config)
    assert (metrics["n_train_pairs"], metrics["n_heldout_pairs"], metrics["steps"]) == (15, 5, 2)


def test_unknown_optimizer_is_rejected(generator):
    with pytest.raises(ValueError, match="optimizer"):
        train_preference_model(PreferenceRewardModel(TINY), instrument_pairs(4, 0), PreferenceTrainingConfig(optimizer="sgd", progress=False))


def test_windows_are_first_and_last():
    clip = np.arange(50) % codec.VOCAB_SIZE
    first, last = clip_windows(clip, 20)
    assert np.array_equal(first, clip[:20]) and np.array_equal(last, clip[30:])
    assert len(clip_windows(clip[:20], 20)) == 1
    with pytest.raises(ValueError):
        clip_windows(np.zeros(0, dtype=np.int64), 20)


def test_scores_ignore_padding_and_average_windows(generator):
    scorer = TorchPreferenceModel(PreferenceRewardModel.from_generator(generator), window_frames=16)
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((3, 384)).astype(np.float32)
    clips = [melody(rng, "piano", 5), melody(rng, "organ", 40), melody(rng, "bells", 16)]
    together = scorer.score(cond, clips)
    alone = [scorer.score(cond[i : i + 1], [clips[i]])[0] for i in range(3)]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    halves = scorer.score(np.stack([cond[1], cond[1]]), [clips[1][:16], clips[1][-16:]])
    assert together[1] == pytest.approx(halves.mean(), abs=1e-5)


def test_score_rejects_bad_input(generator):
    scorer = TorchPreferenceModel(PreferenceRewardModel.from_generator(generator))
    with pytest.raises(ValueError, match="token ids"):
        scorer.score(np.zeros((1, 384), np.float32), [np.array([codec.VOCAB_SIZE])])
    with pytest.raises(ValueError, match="one row per clip"):
        scorer.score(np.zeros((2, 384), np.float32), [np.array([7])])


def test_save_load_and_onnx_export_agree_with_torch(generator, tmp_path):
    model = PreferenceRewardModel.from_generator(generator)
    with torch.no_grad():
        model.head.weight.normal_()  # a non-trivial head so the comparison means something
    save_preference_model(model, tmp_path, {"version": "3", "window_frames": 16})
    loaded, meta = load_preference_model(tmp_path)
    assert meta["version"] == "3"
    rng = np.random.default_rng(4)
    cond = rng.standard_normal((4, 384)).astype(np.float32)
    clips = [melody(rng, f, n) for f, n in zip(("piano", "brass", "synth", "guitar"), (3, 16, 30, 9), strict=True)]
    reference = TorchPreferenceModel(model, window_frames=16).score(cond, clips)
    np.testing.assert_allclose(TorchPreferenceModel.load(tmp_path).score(cond, clips), reference, atol=1e-6)
    onnx_model = OnnxPreferenceModel.load(tmp_path)
    assert onnx_model.version == "3" and onnx_model.window_frames == 16
    np.testing.assert_allclose(onnx_model.score(cond, clips), reference, atol=1e-4)
    assert np.ptp(reference) > 1e-3


def test_bootstrap_pairs_prefer_the_captions_own_clean_clip():
    from musicrl.models.train_preference import bootstrap_pairs
    from musicrl.text import load_text_encoder

    pairs = bootstrap_pairs(6, seed=0, split="valid", text_encoder=load_text_encoder("hashing"), duration_s=2.0)
    assert len(pairs) == 6 and all(p.cond.shape == (384,) for p in pairs)
    mismatch, glitch = pairs[0], pairs[1]
    assert not np.array_equal(mismatch.preferred, mismatch.other)
    glitched = glitch.other != glitch.preferred
    assert glitched.any() and set(glitch.other[glitched].tolist()) <= set(codec.GLITCH_TOKENS)
