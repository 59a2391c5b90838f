"""Bradley-Terry reward model on buffer rows: listening filter, ties, held-out accuracy next to single-reward baselines."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_helpers import TokenFractionReward, embed, tiny_generator, one_thread  # noqa: F401 - fixture
from finetune_worker.reward_model import pairs_from_rows, single_reward_accuracy, train_reward_model
from musicrl.models.preference import PreferenceTrainingConfig, load_preference_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _rows(n: int, seed: int) -> list[dict]:
    """Listeners prefer the clip with more 7s (a taste the text_adherence fake, which counts 3s, does not see)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = rng.integers(0, 16, 12), rng.integers(0, 16, 12)
        choice = "a" if (a == 7).sum() > (b == 7).sum() else "b" if (b == 7).sum() > (a == 7).sum() else "tie"
        rows.append({"generation_id": f"{seed:04d}{i:028d}", "prompt": f"prompt {i % 5}", "choice": choice,
                     "tokens_a": a.tolist(), "tokens_b": b.tolist(), "listen_a_frac": 1.0, "listen_b_frac": 1.0})
    return rows


def test_pairs_keep_listened_votes_put_the_preferred_first_and_keep_ties():
    rows = _rows(6, 0)
    rows[0]["listen_b_frac"] = 0.1  # did not listen to both: the paper drops these
    rows[1]["choice"] = "none"
    pairs = pairs_from_rows(rows, embed, min_listen_frac=0.5)
    assert len(pairs.pairs) == 4 and pairs.generation_ids == [r["generation_id"] for r in rows[2:]]
    for pair, row in zip(pairs.pairs, rows[2:]):
        winner = row["tokens_b"] if row["choice"] == "b" else row["tokens_a"]
        assert pair.preferred.tolist() == winner and pair.tie == (row["choice"] == "tie")


def test_reward_model_beats_single_reward_baselines_on_held_out_pairs(tmp_path):
    train, heldout = pairs_from_rows(_rows(160, 1), embed), pairs_from_rows(_rows(60, 2), embed)
    config = PreferenceTrainingConfig(learning_rate=3e-3, optimizer="adamw", epochs=5, batch_size=32, window_frames=16, progress=False)
    metrics = train_reward_model(tiny_generator(), train, heldout, TokenFractionReward(), config, tmp_path / "rm")
    assert metrics["heldout_accuracy"] > 0.7
    assert metrics["heldout_accuracy"] > metrics["heldout_accuracy_text_adherence_only"]
    assert metrics["heldout_accuracy"] > metrics["heldout_accuracy_quality_only"] == 0.5  # the fake quality is constant
    model, meta = load_preference_model(tmp_path / "rm")
    assert meta["window_frames"] == 16 and (tmp_path / "rm" / "preference.onnx").is_file()


def test_single_reward_accuracy_counts_equal_scores_half():
    pairs = pairs_from_rows(_rows(20, 3), embed)
    accuracy = single_reward_accuracy(pairs, TokenFractionReward(), ("quality",))
    assert accuracy == {"quality": 0.5}
