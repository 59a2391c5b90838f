"""Generator evaluation: the attribute probe, real-time factors and the merged results file."""

import json

import numpy as np
import pytest
import torch

from musicrl.models.attribute_probe import TARGETS, probe_features
from musicrl.models.evaluate import GeneratorEvaluationConfig, evaluate_generator
from musicrl.models.generator import Generator, GeneratorConfig, save_generator

pytestmark = pytest.mark.unit


def test_probe_features_of_silence_are_finite():
    features = probe_features(np.zeros(16000, dtype=np.float32))
    assert set(features) == {"timbre", "rhythm", "tonality"}
    assert all(np.isfinite(v).all() for v in features.values())


def test_evaluation_of_an_untrained_generator(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_generator(
        Generator(GeneratorConfig(n_layers=1, n_heads=2, d_model=16, max_frames=40, text_encoder="hashing")),
        tmp_path / "gen",
        {"version": "1"},
    )
    results = tmp_path / "models.json"
    results.write_text(json.dumps({"codec": {"kept": True}}))
    config = GeneratorEvaluationConfig(
        checkpoint=checkpoint,
        results=results,
        plot=tmp_path / "recovery.png",
        n_probe_train=120,
        n_probe_test=40,
        n_prompts=12,
        n_showcase=2,
        duration_s=4.0,
        rtf_repeats=1,
        other_sampling=((0.99, 5),),
        progress=False,
    )
    evaluate_generator(config)
    written = json.loads(results.read_text())
    assert written["codec"] == {"kept": True}
    assert written["generator"]["real_time_factor"]["rtf_generation_batch1"] > 0
    recovery = written["attribute_recovery"]
    for target in TARGETS:
        scores = recovery["targets"][target]
        assert 0.0 <= scores["generated_accuracy"] <= 1.0
        low, high = scores["generated_accuracy_ci95"]
        assert (
            0.0 <= low <= scores["generated_accuracy"] <= high <= 1.0 and high - low > 0.1
        )  # 12 prompts: a wide interval
        assert scores["chance"]["uniform"] == pytest.approx(1 / len(scores["classes"]))
    assert set(recovery["other_sampling"]) == {"temperature=0.99,top_k=5"}
    # the probe itself hears the instrument of real corpus renders far above chance
    instrument = recovery["targets"]["instrument"]
    assert instrument["probe_accuracy_on_heldout_corpus"] > 2 * instrument["chance"]["majority"]
    assert (tmp_path / "recovery.png").stat().st_size > 10_000
