"""Bradley-Terry preference reward model: init from the generator, loss, training, windows, ONNX."""

import json
import math
from pathlib import Path

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
    bootstrap_weights,
    bradley_terry_loss,
    clip_windows,
    fit_preference_heads,
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
        pairs.append(
            PreferencePair(
                cond / np.linalg.norm(cond),
                melody(rng, "flute", length),
                melody(rng, others[rng.integers(len(others))], length),
            )
        )
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
    config = PreferenceTrainingConfig(
        learning_rate=3e-3, optimizer="adamw", batch_size=16, epochs=3, window_frames=16, progress=False
    )
    metrics = train_preference_model(model, instrument_pairs(160, seed=1), config, heldout=instrument_pairs(60, seed=2))
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["heldout_accuracy"] > 0.8
    assert metrics["n_train_pairs"] == 160 and metrics["n_heldout_pairs"] == 60


def test_training_keeps_the_epoch_that_generalises_best(generator):
    """Training votes that disagree with the held-out ones: every epoch makes the model worse there, so the
    starting model is kept; with agreeing votes a trained epoch is kept."""
    contrary = [PreferencePair(p.cond, p.other, p.preferred) for p in instrument_pairs(80, seed=4)]
    model = PreferenceRewardModel.from_generator(generator)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = PreferenceTrainingConfig(
        learning_rate=3e-3, optimizer="adamw", batch_size=16, epochs=4, window_frames=16, progress=False
    )
    metrics = train_preference_model(model, contrary, config, heldout=instrument_pairs(60, seed=6))
    assert metrics["train_loss_last"] < metrics["train_loss_first"]  # it did learn the training votes ...
    assert metrics["best_epoch"] == 0  # ... which hurt on the held-out pairs
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    signal = PreferenceRewardModel.from_generator(generator)
    learned = train_preference_model(
        signal, instrument_pairs(160, seed=1), config, heldout=instrument_pairs(60, seed=2)
    )
    assert learned["best_epoch"] >= 1 and learned["heldout_accuracy"] > 0.8


def test_training_holds_out_a_seeded_fraction(generator):
    model = PreferenceRewardModel.from_generator(generator)
    config = PreferenceTrainingConfig(batch_size=8, max_steps=2, heldout_fraction=0.25, progress=False)
    metrics = train_preference_model(model, instrument_pairs(20, seed=3), config)
    assert (metrics["n_train_pairs"], metrics["n_heldout_pairs"], metrics["steps"]) == (15, 5, 2)


def test_unknown_optimizer_is_rejected(generator):
    with pytest.raises(ValueError, match="optimizer"):
        train_preference_model(
            PreferenceRewardModel(TINY),
            instrument_pairs(4, 0),
            PreferenceTrainingConfig(optimizer="sgd", progress=False),
        )


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


@pytest.mark.parametrize("n_heads, penalty", [(1, 0.0), (3, 0.5)])
def test_save_load_and_onnx_export_agree_with_torch(generator, tmp_path, n_heads, penalty):
    model = PreferenceRewardModel.from_generator(generator, n_heads=n_heads, disagreement_penalty=penalty)
    with torch.no_grad():
        model.head.weight.normal_()  # a non-trivial head so the comparison means something
    save_preference_model(model, tmp_path, {"version": "3", "window_frames": 16})
    loaded, meta = load_preference_model(tmp_path)
    assert meta["version"] == "3" and meta["ensemble"] == {"n_heads": n_heads, "disagreement_penalty": penalty}
    assert (loaded.n_heads, loaded.disagreement_penalty) == (n_heads, penalty)
    rng = np.random.default_rng(4)
    cond = rng.standard_normal((4, 384)).astype(np.float32)
    clips = [melody(rng, f, n) for f, n in zip(("piano", "brass", "synth", "guitar"), (3, 16, 30, 9), strict=True)]
    reference = TorchPreferenceModel(model, window_frames=16).score(cond, clips)
    assert reference.shape == (4,)
    np.testing.assert_allclose(TorchPreferenceModel.load(tmp_path).score(cond, clips), reference, atol=1e-6)
    onnx_model = OnnxPreferenceModel.load(tmp_path)
    assert onnx_model.version == "3" and onnx_model.window_frames == 16
    np.testing.assert_allclose(onnx_model.score(cond, clips), reference, atol=1e-4)
    assert np.ptp(reference) > 1e-3


def test_served_score_is_the_heads_mean_minus_the_penalty_times_their_std(generator):
    model = PreferenceRewardModel.from_generator(generator, n_heads=4, disagreement_penalty=0.7).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    rng = np.random.default_rng(5)
    cond = torch.from_numpy(rng.standard_normal((3, 384)).astype(np.float32))
    tokens = torch.from_numpy(np.stack([melody(rng, "piano", 10) for _ in range(3)]))
    with torch.no_grad():
        heads = model.head_scores(cond, tokens)
        served = model(cond, tokens)
    assert heads.shape == (3, 4) and served.shape == (3,)
    expected = heads.numpy().mean(axis=1) - 0.7 * heads.numpy().std(axis=1, ddof=1)
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (served < heads.mean(dim=1)).all()  # the heads disagree: the penalty lowers every score
    model.disagreement_penalty = 0.0
    with torch.no_grad():
        np.testing.assert_allclose(model(cond, tokens).numpy(), heads.mean(dim=1).numpy(), rtol=1e-6)
    # identical heads: no disagreement, no penalty (and finite)
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight[:1].expand_as(model.head.weight))
        model.head.bias.fill_(0.1)
    model.disagreement_penalty = 0.7
    with torch.no_grad():
        np.testing.assert_allclose(
            model(cond, tokens).numpy(), model.head_scores(cond, tokens)[:, 0].numpy(), atol=1e-5
        )


def test_ensemble_heads_start_different_and_are_trained_on_their_own_resample(generator):
    torch.manual_seed(0)
    model = PreferenceRewardModel.from_generator(generator, n_heads=3, disagreement_penalty=0.5)
    assert not torch.equal(model.head.weight[0], model.head.weight[1])
    weights = bootstrap_weights(200, 3, seed=0)
    assert weights.shape == (200, 3) and abs(weights.mean() - 1) < 0.1 and (weights == 0).any()
    assert not np.array_equal(weights[:, 0], weights[:, 1])
    assert bootstrap_weights(200, 1, seed=0) is None  # one head: plain (unweighted) training
    config = PreferenceTrainingConfig(
        learning_rate=3e-3, optimizer="adamw", batch_size=16, epochs=3, window_frames=16, progress=False
    )
    metrics = train_preference_model(model, instrument_pairs(160, seed=1), config, heldout=instrument_pairs(60, seed=2))
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["heldout_accuracy"] > 0.8  # measured on the served (penalised) score
    assert metrics["n_heads"] == 3 and metrics["disagreement_penalty"] == 0.5 and metrics["heldout_head_std"] > 0


def test_weighted_bradley_terry_loss_is_the_mean_over_heads_of_each_heads_weighted_loss():
    preferred, other = torch.tensor([[2.0, 0.0], [1.0, -1.0]]), torch.zeros(2, 2)
    weights = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    ties = torch.tensor([False, True])
    per_head = [float(bradley_terry_loss(preferred[:, h], other[:, h], ties, weights[:, h])) for h in range(2)]
    assert float(bradley_terry_loss(preferred, other, ties, weights)) == pytest.approx(np.mean(per_head))
    # unit weights: the plain loss
    assert float(bradley_terry_loss(preferred[:, 0], other[:, 0], ties, torch.ones(2))) == pytest.approx(
        float(bradley_terry_loss(preferred[:, 0], other[:, 0], ties))
    )


def test_set_heads_keeps_trained_heads_and_perturbs_the_copies(generator):
    single = PreferenceRewardModel.from_generator(generator)
    with torch.no_grad():
        single.head.weight.normal_()
    original = single.head.weight.detach().clone()
    single.set_heads(3, seed=1)
    assert single.n_heads == 3 and single.head.weight.shape == (3, TINY.d_model)
    assert torch.equal(single.head.weight[0], original[0])
    for copy_ in single.head.weight.detach()[1:]:
        assert not torch.equal(copy_, original[0]) and float((copy_ - original[0]).abs().max()) < 0.2
    single.set_heads(2)
    assert single.n_heads == 2 and torch.equal(single.head.weight[0], original[0])


def test_a_checkpoint_without_ensemble_fields_loads_as_one_head_without_penalty(generator, tmp_path):
    model = PreferenceRewardModel.from_generator(generator)
    save_preference_model(model, tmp_path, {"window_frames": 16}, export_onnx=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["ensemble"]  # as written before the ensemble existed
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded, _ = load_preference_model(tmp_path)
    assert (loaded.n_heads, loaded.disagreement_penalty) == (1, 0.0)


COMMITTED = Path(__file__).resolve().parents[2] / "checkpoints" / "preference"


@pytest.mark.skipif(not (COMMITTED / "weights.pt").is_file(), reason="no committed preference checkpoint")
def test_the_committed_single_head_checkpoint_still_loads_and_matches_its_onnx():
    meta = json.loads((COMMITTED / "meta.json").read_text())
    assert "ensemble" not in meta
    model, _ = load_preference_model(COMMITTED)
    assert (model.n_heads, model.disagreement_penalty) == (1, 0.0)
    rng = np.random.default_rng(6)
    cond = rng.standard_normal((2, 384)).astype(np.float32)
    clips = [melody(rng, "flute", 30), melody(rng, "piano", 12)]
    torch_scores = TorchPreferenceModel.load(COMMITTED).score(cond, clips)
    np.testing.assert_allclose(OnnxPreferenceModel.load(COMMITTED).score(cond, clips), torch_scores, atol=1e-4)


def test_bootstrap_pairs_prefer_the_captions_own_clean_clip():
    from musicrl.models.train_preference import bootstrap_pairs
    from musicrl.text import load_text_encoder

    pairs = bootstrap_pairs(6, seed=0, split="valid", text_encoder=load_text_encoder("hashing"), duration_s=2.0)
    assert len(pairs) == 6 and all(p.cond.shape == (384,) for p in pairs)
    mismatch, glitch = pairs[0], pairs[1]
    assert not np.array_equal(mismatch.preferred, mismatch.other)
    glitched = glitch.other != glitch.preferred
    assert glitched.any() and set(glitch.other[glitched].tolist()) <= set(codec.GLITCH_TOKENS)


def test_the_probe_s_cross_validated_accuracy_is_out_of_sample():
    """Votes unrelated to the clips: with a weak penalty the heads fit the training pairs (32 features,
    30 pairs), yet the
    cross-validated accuracy, which decides whether the model is used, stays near chance."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    generator = Generator(TINY)
    pairs = [
        PreferencePair(
            cond=rng.normal(size=TINY.text_dim).astype(np.float32),
            preferred=melody(rng, "piano", 12),
            other=melody(rng, "piano", 12),
        )
        for _ in range(30)
    ]
    model = PreferenceRewardModel.from_generator(generator, n_heads=2, disagreement_penalty=0.0)
    metrics = fit_preference_heads(model, pairs, l2=1e-4, folds=5)
    assert metrics["train_accuracy"] >= 0.75 and metrics["cv_accuracy"] <= 0.55  # measured: 0.80 and 0.47
    assert metrics["n_cv_decided"] == 30 and metrics["n_train_pairs"] == 30
