"""Bradley-Terry reward model on buffer rows: listening filter, ties, held-out accuracy next to single-reward
baselines; warm start from the previous model; bounded replay of the buffer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from finetune_helpers import TokenFractionReward, embed, one_thread, tiny_generator  # noqa: F401 - fixture

from finetune_worker.reward_model import (
    HELDOUT_FRACTION_KEY,
    load_warm_start,
    pairs_from_rows,
    select_pair_rows,
    single_reward_accuracy,
    train_reward_model,
)
from musicrl.buffer import split_of
from musicrl.models.generator import Generator, GeneratorConfig
from musicrl.models.preference import (
    PreferenceRewardModel,
    PreferenceTrainingConfig,
    evaluate_pairs,
    load_preference_model,
    save_preference_model,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _rows(n: int, seed: int) -> list[dict]:
    """Listeners prefer the clip with more 7s (a taste the text_adherence fake, which counts 3s, does not see)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = rng.integers(0, 16, 12), rng.integers(0, 16, 12)
        choice = "a" if (a == 7).sum() > (b == 7).sum() else "b" if (b == 7).sum() > (a == 7).sum() else "tie"
        rows.append(
            {
                "generation_id": f"{seed:04d}{i:028d}",
                "prompt": f"prompt {i % 5}",
                "choice": choice,
                "tokens_a": a.tolist(),
                "tokens_b": b.tolist(),
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
            }
        )
    return rows


def test_pairs_keep_listened_votes_put_the_preferred_first_and_keep_ties():
    rows = _rows(6, 0)
    rows[0]["listen_b_frac"] = 0.1  # did not listen to both: the paper drops these
    rows[1]["choice"] = "none"
    pairs = pairs_from_rows(rows, embed, min_listen_fraction=0.5)
    assert len(pairs.pairs) == 4 and pairs.generation_ids == [r["generation_id"] for r in rows[2:]]
    for pair, row in zip(pairs.pairs, rows[2:]):
        winner = row["tokens_b"] if row["choice"] == "b" else row["tokens_a"]
        assert pair.preferred.tolist() == winner and pair.tie == (row["choice"] == "tie")


def test_reward_model_beats_single_reward_baselines_on_held_out_pairs(tmp_path):
    train, heldout = pairs_from_rows(_rows(160, 1), embed), pairs_from_rows(_rows(60, 2), embed)
    config = PreferenceTrainingConfig(
        learning_rate=3e-3, optimizer="adamw", epochs=5, batch_size=32, window_frames=16, progress=False
    )
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


# ---------------------------------------------------------------------- warm start

FAST = PreferenceTrainingConfig(
    learning_rate=3e-3, optimizer="adamw", epochs=2, batch_size=32, window_frames=16, progress=False
)


def test_warm_start_continues_from_the_given_weights(tmp_path):
    generator = tiny_generator()
    train, heldout = pairs_from_rows(_rows(120, 1), embed), pairs_from_rows(_rows(60, 2), embed)
    first = train_reward_model(
        generator, train, heldout, None, FAST, tmp_path / "v1", n_heads=3, disagreement_penalty=0.5
    )
    start, why = load_warm_start(tmp_path / "v1", generator, n_heads=3, disagreement_penalty=0.5)
    assert why == "ok" and start.n_heads == 3
    saved, _ = load_preference_model(tmp_path / "v1")
    for name, tensor in saved.state_dict().items():  # the loaded model is the saved one, not the generator
        assert torch.equal(start.state_dict()[name], tensor), name
    assert evaluate_pairs(start, heldout.pairs, 16)["accuracy"] == pytest.approx(first["heldout_accuracy"])
    second = train_reward_model(generator, train, heldout, None, FAST, tmp_path / "v2", start=start)
    # the scores before training are the loaded model's: its held-out accuracy, not the generator's
    assert second["heldout_accuracy_before"] == pytest.approx(first["heldout_accuracy"])
    assert second["n_heads"] == 3 and load_preference_model(tmp_path / "v2")[0].n_heads == 3


def test_a_single_head_model_warm_starts_an_ensemble(tmp_path):
    generator = tiny_generator()
    save_preference_model(PreferenceRewardModel.from_generator(generator), tmp_path / "default", {"window_frames": 16})
    start, _ = load_warm_start(tmp_path / "default", generator, n_heads=4, disagreement_penalty=0.25)
    assert (start.n_heads, start.disagreement_penalty) == (4, 0.25)


def test_no_warm_start_from_another_architecture_or_a_narrower_split(tmp_path):
    generator = tiny_generator()
    other = Generator(GeneratorConfig(vocab_size=16, text_dim=8, max_frames=32, n_layers=2, n_heads=2, d_model=32))
    save_preference_model(PreferenceRewardModel.from_generator(other), tmp_path / "other", export_onnx=False)
    assert load_warm_start(tmp_path / "other", generator, 4, 0.5) == (
        None,
        "architecture differs from the parent generator's",
    )
    same = PreferenceRewardModel.from_generator(generator)
    save_preference_model(same, tmp_path / "narrow", {HELDOUT_FRACTION_KEY: 0.1}, export_onnx=False)
    model, why = load_warm_start(tmp_path / "narrow", generator, 4, 0.5, heldout_fraction=0.2)
    assert model is None and "held-out fraction" in why
    assert load_warm_start(tmp_path / "narrow", generator, 4, 0.5, heldout_fraction=0.1)[0] is not None


# ---------------------------------------------------------------------- bounded replay

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _buffer(n: int, policies: int = 4, seed: int = 0) -> list[dict]:
    """``n`` rows spread over policy versions 1..policies in time order (the newest policy last)."""
    rows = []
    for i in range(n):
        policy = 1 + i * policies // n
        rows.append(
            {
                "generation_id": f"g{seed}-{i:07d}",
                "prompt": f"prompt {i % 7}",
                "choice": ("a", "b", "tie")[i % 3],
                "tokens_a": [1, 2, 3],
                "tokens_b": [3, 2, 1],
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
                "policy_version": str(policy),
                "mixed_policy": i % 11 == 0,
                "received_at": T0 + timedelta(seconds=i),
            }
        )
    return rows


def test_replay_keeps_every_current_pair_and_fills_up_with_older_ones():
    rows = _buffer(2000)
    selected = select_pair_rows(rows, "4", max_pairs=800, heldout_fraction=0.2, seed=0)
    current = [r for r in rows if r["policy_version"] == "4" and split_of(r["generation_id"], 0.2) == "train"]
    assert len(selected.train) == 800
    assert [r["generation_id"] for r in selected.train[: len(current)]] == [
        r["generation_id"] for r in reversed(current)
    ]
    replay = selected.train[len(current) :]
    assert all(r["policy_version"] != "4" for r in replay) and len({r["generation_id"] for r in replay}) == len(replay)
    assert {r["policy_version"] for r in replay} == {"1", "2", "3"}  # a uniform sample, not only the newest
    assert all(split_of(r["generation_id"], 0.2) == "train" for r in selected.train)
    assert all(split_of(r["generation_id"], 0.2) == "eval" for r in selected.heldout)
    assert len(selected.heldout) == 200 and all(r["policy_version"] == "4" for r in selected.heldout[:50])
    assert selected.stats["n_train_current_policy"] == len(current) and selected.stats["n_train_replay"] == 800 - len(
        current
    )
    # seeded: the same rows again; another seed (or the next policy) samples others
    assert selected.train == select_pair_rows(rows, "4", max_pairs=800, heldout_fraction=0.2, seed=0).train
    assert selected.train != select_pair_rows(rows, "4", max_pairs=800, heldout_fraction=0.2, seed=1).train


def test_replay_never_exceeds_the_cap_and_keeps_the_newest_current_pairs():
    rows = _buffer(3000, policies=2)
    newest_first = sorted(
        (r for r in rows if r["policy_version"] == "2" and split_of(r["generation_id"], 0.1) == "train"),
        key=lambda r: r["received_at"],
        reverse=True,
    )
    for cap in (4, 50, 500, 1200, 5000):
        selected = select_pair_rows(rows, "2", max_pairs=cap, heldout_fraction=0.1, seed=0)
        assert len(selected.train) <= cap and len(selected.heldout) <= cap // 4
        n_current = min(cap, len(newest_first))
        assert selected.train[:n_current] == newest_first[:n_current]
    assert len(select_pair_rows(rows, "2", max_pairs=5000, heldout_fraction=0.1).train) == sum(
        split_of(r["generation_id"], 0.1) == "train" for r in rows
    )  # under the cap: every pair


def test_replay_drops_unusable_rows_before_counting():
    rows = _buffer(100, policies=1)
    for row in rows[:50]:
        row["listen_b_frac"] = 0.1
    selected = select_pair_rows(rows, "1", max_pairs=1000, heldout_fraction=0.1)
    assert all(r["listen_b_frac"] == 1.0 for r in selected.train + selected.heldout)
    assert len(selected.train) + len(selected.heldout) == 50


def test_the_reward_models_pairs_stay_capped_as_the_buffer_grows():
    sizes = {}
    for n in (500, 5000):
        rows = _buffer(n, policies=8, seed=n)
        selected = select_pair_rows(rows, "8", max_pairs=300, heldout_fraction=0.1, seed=0)
        sizes[n] = (
            len(pairs_from_rows(selected.train, embed).pairs),
            len(pairs_from_rows(selected.heldout, embed).pairs),
        )
    # a buffer 10x larger: the same number of training pairs (the same work per cycle), held-out capped at a quarter
    assert sizes[500][0] == sizes[5000][0] == 300
    assert sizes[500][1] < 75 and sizes[5000][1] == 75


def test_no_user_contributes_more_than_the_per_user_cap_newest_kept():
    """One listener floods the buffer (issue 16): at most max_pairs_per_user of their votes, the newest, in each
    split."""
    rows = _buffer(1200, policies=3)
    for i, row in enumerate(rows):
        row["user_pseudonym"] = "f" * 64 if i % 2 == 0 else f"{i % 40:064x}"  # half the votes are one user's
    flooder = [r for r in rows if r["user_pseudonym"] == "f" * 64]
    honest = [r for r in rows if r["user_pseudonym"] != "f" * 64]
    selected = select_pair_rows(rows, "3", max_pairs=400, heldout_fraction=0.2, seed=0, max_pairs_per_user=20)
    for split in (selected.train, selected.heldout):
        users = [r["user_pseudonym"] for r in split]
        assert max(users.count(u) for u in set(users)) <= 20
    flooder_train = [r for r in flooder if split_of(r["generation_id"], 0.2) == "train"]
    newest = sorted(flooder_train, key=lambda r: r["received_at"], reverse=True)[:20]
    kept = [r for r in selected.train if r["user_pseudonym"] == "f" * 64]
    assert {r["generation_id"] for r in kept} <= {
        r["generation_id"] for r in newest
    }  # only the newest 20 were eligible
    assert len(kept) == 20  # and all of them are current-policy rows, kept first
    stats = selected.stats
    flooder_heldout = len(flooder) - len(flooder_train)
    assert stats["n_train_dropped_user_cap"] == len(flooder_train) - 20 + sum(
        max(0, sum(r["user_pseudonym"] == u and split_of(r["generation_id"], 0.2) == "train" for r in honest) - 20)
        for u in {r["user_pseudonym"] for r in honest}
    )
    assert stats["n_heldout_dropped_user_cap"] >= flooder_heldout - 20
    assert stats["n_dropped_user_cap"] == stats["n_train_dropped_user_cap"] + stats["n_heldout_dropped_user_cap"]
    assert stats["max_pairs_per_user"] == 20 and len(selected.train) == 400  # the others fill the cycle's pairs
    # deterministic; without the cap the flooder's votes make up half the training pairs
    assert (
        select_pair_rows(rows, "3", max_pairs=400, heldout_fraction=0.2, seed=0, max_pairs_per_user=20).train
        == selected.train
    )
    uncapped = select_pair_rows(rows, "3", max_pairs=400, heldout_fraction=0.2, seed=0)
    assert (
        sum(r["user_pseudonym"] == "f" * 64 for r in uncapped.train) > 150 and uncapped.stats["n_dropped_user_cap"] == 0
    )
