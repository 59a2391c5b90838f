"""Train the Bradley-Terry user-preference reward model on the on-policy buffer.

As in the paper (section 3.3): pairs from users who listened to both clips, a
deterministic train/held-out split (by generation id, ``musicrl.buffer.split_of``),
the model initialised from the current generator's weights, and the held-out
pairwise accuracy reported next to the accuracy of the text-adherence reward
alone and the quality reward alone on the same pairs (the paper: 60 % versus
51.6 % and 53.3 %). The model itself is ``musicrl.models.preference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from finetune_worker.trainers.base import RewardFunction
from musicrl.logging import get_logger
from musicrl.models.generator import Generator
from musicrl.models.preference import (
    PreferencePair,
    PreferenceRewardModel,
    PreferenceTrainingConfig,
    save_preference_model,
    train_preference_model,
)

log = get_logger(__name__)


@dataclass
class BufferPairs:
    pairs: list[PreferencePair]
    prompts: list[str]
    generation_ids: list[str]


def listened_to_both(row: dict, min_listen_frac: float) -> bool:
    fractions = (row.get("listen_a_frac"), row.get("listen_b_frac"))
    return all(f is not None and f >= min_listen_frac for f in fractions)


def pairs_from_rows(rows: list[dict], embed: Callable[[list[str]], np.ndarray], min_listen_frac: float = 0.5) -> BufferPairs:
    """Bradley-Terry pairs (preferred first; ties kept as ties) from buffer rows."""
    kept = [r for r in rows if r["choice"] in ("a", "b", "tie") and listened_to_both(r, min_listen_frac)]
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
) -> dict:
    """Fit the model from ``generator``'s weights, save it (with ONNX) in ``out_dir``; returns metrics."""
    if not train.pairs:
        raise ValueError("no training pairs in the buffer")
    model = PreferenceRewardModel.from_generator(generator).to(next(generator.parameters()).device)
    metrics = train_preference_model(model, train.pairs, config, heldout=heldout.pairs)
    if reward_fn is not None and heldout.pairs:
        for name, accuracy in single_reward_accuracy(heldout, reward_fn, ("text_adherence", "quality")).items():
            metrics[f"heldout_accuracy_{name}_only"] = accuracy
    metrics["n_heldout_decided"] = sum(1 for p in heldout.pairs if not p.tie)
    save_preference_model(model, out_dir, meta={"window_frames": config.window_frames, "metrics": metrics})
    log.info("reward_model.trained", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics
