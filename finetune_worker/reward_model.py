"""Train the Bradley-Terry user-preference reward model on the on-policy buffer.

As in the paper (section 3.3): pairs from users who listened to both clips, a
deterministic train/held-out split (by generation id, ``musicrl.buffer.split_of``),
the model initialised from the current generator's weights, and the held-out
pairwise accuracy reported next to the accuracy of the text-adherence reward
alone and the quality reward alone on the same pairs (the paper: 60 % versus
51.6 % and 53.3 %). The model itself is ``musicrl.models.preference``.

Across cycles (docs/finetune.md): the model is warm-started from the previous
cycle's (:func:`load_warm_start`) and trained on a bounded replay of the buffer
(:func:`select_pair_rows`): every pair of the current policy plus a seeded
sample of older ones, so a cycle's cost does not grow with the buffer.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_worker.trainers.base import RewardFunction
from musicrl.buffer import split_of
from musicrl.logging import get_logger
from musicrl.models.generator import Generator
from musicrl.models.preference import (
    PreferencePair,
    PreferenceRewardModel,
    PreferenceTrainingConfig,
    load_preference_model,
    save_preference_model,
    train_preference_model,
)

log = get_logger(__name__)

HELDOUT_FRACTION_KEY = "buffer_heldout_fraction"  # meta.json: the split the model's training pairs came from


@dataclass
class BufferPairs:
    pairs: list[PreferencePair]
    prompts: list[str]
    generation_ids: list[str]


def listened_to_both(row: dict, min_listen_frac: float) -> bool:
    fractions = (row.get("listen_a_frac"), row.get("listen_b_frac"))
    return all(f is not None and f >= min_listen_frac for f in fractions)


def usable_row(row: dict, min_listen_frac: float = 0.5) -> bool:
    """A row that makes a Bradley-Terry pair: a choice (or a tie) by a listener who heard both clips."""
    return row.get("choice") in ("a", "b", "tie") and listened_to_both(row, min_listen_frac)


@dataclass
class PairRows:
    """The buffer rows one cycle trains and evaluates the reward model on, and how they were chosen."""

    train: list[dict]
    heldout: list[dict]
    stats: dict = field(default_factory=dict)


def _recency(row: dict, index: int) -> tuple[float, int]:
    """Sort key, larger is newer: the time the consumer received the vote, then the position in the buffer."""
    received = row.get("received_at")
    return (received.timestamp() if isinstance(received, datetime) else float("-inf"), index)


def select_pair_rows(
    rows: Sequence[dict],
    current_policy: str,
    *,
    max_pairs: int,
    heldout_fraction: float,
    seed: int = 0,
    min_listen_frac: float = 0.5,
) -> PairRows:
    """The reward model's rows for one cycle, bounded whatever the size of the buffer window.

    Only usable rows (:func:`usable_row`) count, split by generation id (``split_of``) as always.
    Train: every train-split row of ``current_policy`` (if there are more than ``max_pairs``, the newest
    ``max_pairs``), then a seeded uniform sample of the older policies' train-split rows fills up to
    ``max_pairs`` (the replay; seeded by ``seed`` and the policy, so a resumed cycle picks the same rows
    and the next policy's cycle a different sample). Held-out: the eval-split rows, current policy first, newest first, at
    most ``max_pairs // 4``. Rows sampled across a hot swap (``mixed_policy``) count under their
    ``policy_version`` like any other. O(n log n) in the rows; the pairs (and prompt embeddings) are
    built afterwards for the selected rows only.
    """
    current, older, heldout = [], [], []
    for index, row in enumerate(rows):
        if not usable_row(row, min_listen_frac):
            continue
        if split_of(row["generation_id"], heldout_fraction) == "eval":
            heldout.append((row.get("policy_version") == current_policy, _recency(row, index), row))
        elif row.get("policy_version") == current_policy:
            current.append((_recency(row, index), row))
        else:
            older.append(row)
    newest = [row for _, row in sorted(current, key=lambda item: item[0], reverse=True)[:max_pairs]]
    n_replay = min(len(older), max_pairs - len(newest))
    rng = np.random.default_rng([seed, zlib.crc32(str(current_policy).encode())])
    picked = np.sort(rng.choice(len(older), size=n_replay, replace=False)) if n_replay > 0 else []
    replay = [older[i] for i in picked]
    heldout.sort(key=lambda item: (item[0], item[1]), reverse=True)
    kept_heldout = [row for _, _, row in heldout[: max_pairs // 4]]
    stats = {
        "n_train_current_policy": len(newest), "n_train_replay": len(replay),
        "n_train_available": len(current) + len(older), "n_heldout_available": len(heldout), "max_pairs": max_pairs,
    }
    return PairRows(newest + replay, kept_heldout, stats)


def load_warm_start(
    directory: str | Path,
    generator: Generator,
    n_heads: int,
    disagreement_penalty: float,
    *,
    heldout_fraction: float | None = None,
    seed: int = 0,
) -> tuple[PreferenceRewardModel | None, str]:
    """The preference model in ``directory`` to continue training, or None and why not.

    Not when its architecture (``GeneratorConfig``) differs from ``generator``'s, nor when it was trained
    with a smaller held-out share than ``heldout_fraction`` (its training pairs would now be held out, and
    the held-out accuracy would flatter it). Its heads are resized to ``n_heads``
    (:meth:`PreferenceRewardModel.set_heads`) and its penalty set to ``disagreement_penalty``, so a
    single-head model (the committed default) warm-starts an ensemble.
    """
    model, meta = load_preference_model(directory, device=next(generator.parameters()).device)
    if model.config != generator.config:
        return None, "architecture differs from the parent generator's"
    trained_with = meta.get(HELDOUT_FRACTION_KEY)
    if heldout_fraction is not None and trained_with is not None and float(trained_with) < heldout_fraction:
        return None, f"trained with held-out fraction {trained_with} < {heldout_fraction}: its training pairs are now held out"
    model.set_heads(n_heads, seed=seed)
    model.disagreement_penalty = float(disagreement_penalty)
    return model, "ok"


def pairs_from_rows(rows: list[dict], embed: Callable[[list[str]], np.ndarray], min_listen_frac: float = 0.5) -> BufferPairs:
    """Bradley-Terry pairs (preferred first; ties kept as ties) from buffer rows."""
    kept = [r for r in rows if usable_row(r, min_listen_frac)]
    if not kept:
        return BufferPairs([], [], [])
    prompts = sorted({r["prompt"] for r in kept})
    cond = dict(zip(prompts, np.asarray(embed(prompts), dtype=np.float32)))
    pairs = []
    for row in kept:
        win, lose = ("b", "a") if row["choice"] == "b" else ("a", "b")
        pairs.append(
            PreferencePair(
                cond=cond[row["prompt"]],
                preferred=np.asarray(row[f"tokens_{win}"], dtype=np.int64),
                other=np.asarray(row[f"tokens_{lose}"], dtype=np.int64),
                tie=row["choice"] == "tie",
            )
        )
    return BufferPairs(pairs, [r["prompt"] for r in kept], [r["generation_id"] for r in kept])


def single_reward_accuracy(pairs: BufferPairs, reward_fn: RewardFunction, components: tuple[str, ...]) -> dict[str, float]:
    """Pairwise accuracy of each reward component used alone on the decided pairs (equal scores count half)."""
    decided = [i for i, p in enumerate(pairs.pairs) if not p.tie]
    if not decided:
        return {c: float("nan") for c in components}
    prompts = [pairs.prompts[i] for i in decided]

    def scores(clips: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len({len(c) for c in clips}) == 1:
            return reward_fn(prompts, np.stack(clips))
        # clips of different lengths: score them one length at a time
        out: dict[str, np.ndarray] = {}
        for i, clip in enumerate(clips):
            for name, value in reward_fn([prompts[i]], clip[None, :]).items():
                out.setdefault(name, np.zeros(len(clips)))[i] = value[0]
        return out

    preferred = scores([pairs.pairs[i].preferred for i in decided])
    other = scores([pairs.pairs[i].other for i in decided])
    result = {}
    for name in components:
        margin = np.asarray(preferred[name]) - np.asarray(other[name])
        result[name] = float(np.mean((margin > 0) + 0.5 * (margin == 0)))
    return result


def train_reward_model(
    generator: Generator,
    train: BufferPairs,
    heldout: BufferPairs,
    reward_fn: RewardFunction | None,
    config: PreferenceTrainingConfig,
    out_dir: Path,
    *,
    start: PreferenceRewardModel | None = None,
    n_heads: int = 1,
    disagreement_penalty: float = 0.0,
    meta: dict | None = None,
) -> dict:
    """Fit the model, save it (with ONNX) in ``out_dir``; returns metrics.

    The model starts as ``start`` (a warm start, trained further in place) or else from ``generator``'s
    weights with ``n_heads`` heads and ``disagreement_penalty``. ``meta`` goes into ``meta.json``.
    """
    if not train.pairs:
        raise ValueError("no training pairs in the buffer")
    device = next(generator.parameters()).device
    model = (start if start is not None else PreferenceRewardModel.from_generator(generator, n_heads, disagreement_penalty)).to(device)
    metrics = train_preference_model(model, train.pairs, config, heldout=heldout.pairs)
    if reward_fn is not None and heldout.pairs:
        for name, accuracy in single_reward_accuracy(heldout, reward_fn, ("text_adherence", "quality")).items():
            metrics[f"heldout_accuracy_{name}_only"] = accuracy
    metrics["n_heldout_decided"] = sum(1 for p in heldout.pairs if not p.tie)
    save_preference_model(model, out_dir, meta={**(meta or {}), "window_frames": config.window_frames, "metrics": metrics})
    log.info("reward_model.trained", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics
