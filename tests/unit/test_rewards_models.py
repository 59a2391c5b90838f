import json
from pathlib import Path

import numpy as np
import pytest
import torch

from musicrl.audio.features import log_mel
from musicrl.corpus import make_corpus
from musicrl.models.audio_encoder import AudioEncoderConfig, AudioTextEncoder
from musicrl.models.audio_export import write_checkpoint
from musicrl.models.quality import MosRegressor
from musicrl.models.train_audio import (
    ContrastiveTrainer,
    MosTrainer,
    QualityTrainingConfig,
    TextAdherenceTrainingConfig,
    retrieval_metrics,
)
from musicrl.rewards import load_reward_models
from musicrl.rewards.onnx_impl import OnnxQuality, OnnxTextAdherence
from musicrl.rewards.torch_impl import TorchQuality, TorchTextAdherence

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SMALL = AudioEncoderConfig(channels=(16, 16, 16), width=16, out_dim=384)


@pytest.fixture(scope="module")
def mels():
    return np.stack([log_mel(r.render()) for r in make_corpus(3, seed=2, split="test")])


def test_onnx_export_agrees_with_torch_for_any_length(tmp_path, mels):
    torch.manual_seed(0)
    write_checkpoint(
        AudioTextEncoder(SMALL).eval(), tmp_path / "text_adherence", "text_adherence", "embedding", {}, {}, "test"
    )
    write_checkpoint(MosRegressor(SMALL).eval(), tmp_path / "quality", "quality", "mos", {}, {}, "test")
    onnx_models = load_reward_models(
        tmp_path, impl={"text_adherence": "onnx", "quality": "onnx", "preference": "tiny"}, text_encoder="hashing"
    )
    torch_models = load_reward_models(
        tmp_path, impl={"text_adherence": "torch", "quality": "torch", "preference": "tiny"}, text_encoder="hashing"
    )
    assert isinstance(onnx_models.text_adherence, OnnxTextAdherence) and isinstance(
        torch_models.text_adherence, TorchTextAdherence
    )
    assert isinstance(onnx_models.quality, OnnxQuality) and isinstance(torch_models.quality, TorchQuality)
    for frames in (500, 137):
        batch = mels[:, :, :frames]
        np.testing.assert_allclose(
            onnx_models.text_adherence.embed_audio(batch), torch_models.text_adherence.embed_audio(batch), atol=1e-4
        )
        np.testing.assert_allclose(onnx_models.quality.mos(batch), torch_models.quality.mos(batch), atol=1e-4)
    assert onnx_models.versions["text_adherence"] == torch_models.versions["text_adherence"]
    assert onnx_models.versions["text_adherence"].startswith("text_adherence-")


def _tiny_text_config(**overrides):
    return TextAdherenceTrainingConfig(
        **(
            {
                "n_train": 16,
                "n_valid": 8,
                "n_captions": 2,
                "text_encoder": "hashing",
                "steps": 4,
                "batch_size": 8,
                "crop_frames": 100,
                "checkpoint_every": 2,
                "eval_every": 2,
            }
            | overrides
        )
    )


def test_contrastive_training_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"
    straight = ContrastiveTrainer(_tiny_text_config(), tmp_path / "a", tmp_path / "out_a", cache, SMALL)
    straight.train()
    paused = ContrastiveTrainer(_tiny_text_config(), tmp_path / "b", tmp_path / "out_b", cache, SMALL)
    paused.train(stop_at=2)
    resumed = ContrastiveTrainer(_tiny_text_config(), tmp_path / "b", tmp_path / "out_b", cache, SMALL)
    metrics = resumed.train()
    assert metrics["steps"] == 4 and resumed.step == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    with pytest.raises(ValueError, match="another configuration"):
        ContrastiveTrainer(_tiny_text_config(lr=1e-4), tmp_path / "b", tmp_path / "out_b", cache, SMALL).train()


def test_quality_training_runs_and_writes_a_checkpoint(tmp_path):
    config = QualityTrainingConfig(
        n_train=12,
        n_valid=6,
        renders_per_record=1,
        steps=3,
        batch_size=6,
        crop_frames=100,
        checkpoint_every=3,
        eval_every=3,
    )
    trainer = MosTrainer(config, tmp_path / "work", tmp_path / "quality", tmp_path / "cache", SMALL)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and "valid/spearman" in metrics
    directory = trainer.save(metrics, "test")
    assert {p.name for p in directory.iterdir()} >= {"config.json", "weights.pt", "model.onnx", "meta.json"}


def test_retrieval_metrics_count_ranks():
    text = np.eye(4, dtype=np.float32)
    audio = text[[0, 1, 3, 2]]
    metrics = retrieval_metrics(audio, text)
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0 and metrics["chance_top1"] == 0.25


@pytest.mark.parametrize("name", ["text_adherence", "quality"])
def test_committed_checkpoint_is_small_versioned_and_documented(name):
    directory = ROOT / "checkpoints" / name
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["kind"] == name and meta["version"].startswith(name)
    assert sum(p.stat().st_size for p in directory.iterdir()) < 30 * 2**20
    card = (ROOT / "docs" / "models" / f"{name}.md").read_text()
    assert "musicrl models train-" in card and meta["version"] in card


@pytest.mark.parametrize("name", ["text_adherence", "quality"])
def test_committed_onnx_agrees_with_committed_weights(name, mels):
    onnx = load_reward_models(
        ROOT / "checkpoints",
        impl={"text_adherence": "onnx", "quality": "onnx", "preference": "tiny"},
        text_encoder="hashing",
    )
    torch_models = load_reward_models(
        ROOT / "checkpoints",
        impl={"text_adherence": "torch", "quality": "torch", "preference": "tiny"},
        text_encoder="hashing",
    )
    if name == "text_adherence":
        np.testing.assert_allclose(
            onnx.text_adherence.embed_audio(mels), torch_models.text_adherence.embed_audio(mels), atol=1e-4
        )
    else:
        np.testing.assert_allclose(onnx.quality.mos(mels), torch_models.quality.mos(mels), atol=1e-4)
