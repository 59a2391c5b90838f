"""The reward-model-fit benchmark: the whole run at a tiny size on a tiny generator, and its summary of the draws."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from finetune_helpers import one_thread, servable_generator  # noqa: F401 - fixture
from typer.testing import CliRunner

from finetune_worker.settings import FinetuneSettings
from loadtests.reward_model_fit import (
    FITS,
    RewardModelFitConfig,
    margin_accuracy,
    run_reward_model_fit,
    summarize,
    table_rows,
    write_results,
)
from musicrl.models.preference import PreferenceRewardModel, save_preference_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def embed384(prompts: list[str]) -> np.ndarray:
    """A fixed random unit vector per prompt, the size of the real text embedding (what servable_generator takes)."""
    rows = []
    for prompt in prompts:
        vector = np.random.default_rng(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")).normal(
            size=384
        )
        rows.append(vector / np.linalg.norm(vector))
    return np.stack(rows).astype(np.float32)


def _row(size, fit, draw, test, decision, seconds=1.0):
    return {
        "size": size,
        "fit": fit,
        "draw": draw,
        "test_accuracy": test,
        "decision_accuracy": decision,
        "passes": decision > 0.5,
        "seconds": seconds,
    }


def test_summary_of_the_draws_counts_passes_and_wrong_refusals():
    rows = [
        _row(110, "probe", 0, 0.60, 0.55),
        _row(110, "probe", 1, 0.58, 0.48),  # the second: refused, wrongly
        _row(110, "probe", 2, 0.49, 0.52, seconds=4.0),  # used though no better than chance
        _row(110, "finetune", 0, 0.56, float("nan")),  # no decided held-out pair: refused, wrongly
        _row(110, "finetune", 1, 0.47, 0.45),  # refused, rightly
        {"size": 110, "fit": "finetune_warm_bootstrap", "draw": 0, "skipped": "architecture differs"},
    ]
    summary = {(p["size"], p["fit"]): p for p in summarize(rows, [110])}
    probe = summary[(110, "probe")]
    assert probe["draws"] == 3 and probe["skipped"] == 0
    assert probe["test_accuracy_mean"] == pytest.approx(np.mean([0.60, 0.58, 0.49]))
    assert probe["test_accuracy_std"] == pytest.approx(np.std([0.60, 0.58, 0.49]))
    assert probe["decision_accuracy_min"] == pytest.approx(0.48)
    assert probe["pass_rate"] == pytest.approx(2 / 3)
    assert probe["wrong_refusal_rate"] == pytest.approx(1 / 3) and probe["wrong_pass_rate"] == pytest.approx(1 / 3)
    assert probe["seconds_mean"] == pytest.approx(2.0)
    finetune = summary[(110, "finetune")]
    assert (
        finetune["draws"] == 2 and finetune["pass_rate"] == 0 and finetune["wrong_refusal_rate"] == pytest.approx(0.5)
    )
    assert finetune["decision_accuracy_mean"] == pytest.approx(0.45) and finetune["wrong_pass_rate"] == 0
    warm = summary[(110, "finetune_warm_bootstrap")]
    assert warm["draws"] == 0 and warm["skipped"] == 1 and warm["pass_rate"] is None
    # a zero margin counts half; ties are not decided pairs
    assert margin_accuracy([1.0, -1.0, 0.0, -5.0], [False, False, False, True]) == pytest.approx(0.5)
    assert math.isnan(margin_accuracy([1.0], [True]))


def test_tiny_run_fits_three_models_per_draw_on_disjoint_prompts_and_writes_reports(tmp_path):
    generator = servable_generator(0)
    bootstrap = tmp_path / "bootstrap"  # stands in for checkpoints/preference: same architecture, other weights
    save_preference_model(PreferenceRewardModel.from_generator(servable_generator(1)), bootstrap, export_onnx=False)
    config = RewardModelFitConfig(pool_pairs=24, test_pairs=12, sizes=(12, 20), draws=1, clip_s=1.0, captions=20)
    results = run_reward_model_fit(
        config,
        generator=generator,
        embed=embed384,
        bootstrap_dir=bootstrap,
        settings=FinetuneSettings(),
        progress=False,
    )

    data = results["data"]
    assert data["pool_pairs"] == 24 and data["test_pairs"] == 12 and data["shared_prompts"] == 0
    assert sum(data["pool_votes"].values()) == 24 and set(data["pool_votes"]) <= {"a", "b", "tie"}
    rows = results["rows"]
    assert [(r["size"], r["fit"]) for r in rows] == [(size, fit) for size in (12, 20) for fit in FITS]
    for row in rows:
        assert "skipped" not in row, row
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["passes"] == (row["decision_accuracy"] is not None and row["decision_accuracy"] > 0.5)
        if row["fit"] == "probe":  # the probe fits and cross-validates on every sampled pair
            assert row["n_train_pairs"] == row["size"]
        else:  # fine-tuning trains on the 80 % split by generation id and keeps an epoch on the rest
            assert row["n_train_pairs"] == row["size"] - row["n_heldout_split"] and "best_epoch" in row
    for key in ("bootstrap_as_is", "oracle_mean_listener"):
        assert 0.0 <= results["baselines"][key] <= 1.0
    assert len(results["summary"]) == 2 * len(FITS) and all(p["draws"] == 1 for p in results["summary"])
    assert len(table_rows(results)) == 2 * len(FITS)

    json_path, png_path = write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text())["summary"] == results["summary"]
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_command_is_registered_and_refuses_sizes_above_the_pool():
    from loadtests.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["reward-model-fit", "--help"]).exit_code == 0
    result = runner.invoke(app, ["reward-model-fit", "--pool-pairs", "100", "--sizes", "110,230"])
    assert result.exit_code == 2 and "larger than the training pool" in result.output
