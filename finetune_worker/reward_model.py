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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from finetune_worker.trainers.base import RewardFunction
from musicrl.buffer import DEFAULT_MIN_LISTEN_FRACTION, PreferenceRow, clip_codes, split_of, usable_pair
from musicrl.logging import get_logger
from musicrl.models.generator import Generator
from musicrl.models.preference import (
    DEFAULT_WINDOW_FRAMES,
    PreferencePair,
    PreferenceRewardModel,
    PreferenceTrainingConfig,
    fit_preference_heads,
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


@dataclass
class PairRows:
    """The buffer rows one cycle trains and evaluates the reward model on, and how they were chosen."""

    train: list[dict]
    heldout: list[dict]
    stats: dict = field(default_factory=dict)


def _recency(row: PreferenceRow, index: int) -> tuple[float, int]:
    """Sort key, larger is newer: the time the consumer received the vote, then the position in the buffer."""
    received = row.get("received_at")
    return (received.timestamp() if isinstance(received, datetime) else float("-inf"), index)


def _cap_per_user(
    items: list[tuple[tuple[float, int], dict]], cap: int | None
) -> tuple[list[tuple[tuple[float, int], dict]], int]:
    """Keep at most ``cap`` items per ``user_pseudonym``, each user's newest; the kept items stay in their order.

    ``items`` are ``(_recency(row, index), row)`` with distinct indices, so the order is total and the result
    deterministic. A row without a pseudonym (none comes from the consumer: the event requires one) is not capped.
    Returns the kept items and how many were dropped. O(n log n).
    """
    if cap is None:
        return items, 0
    counts: dict[str, int] = {}
    keep: set[int] = set()
    for key, row in sorted(items, key=lambda item: item[0], reverse=True):
        user = row.get("user_pseudonym")
        if user is None or counts.get(user, 0) < cap:
            keep.add(key[1])
            if user is not None:
                counts[user] = counts.get(user, 0) + 1
    kept = [item for item in items if item[0][1] in keep]
    return kept, len(items) - len(kept)


def select_pair_rows(
    rows: Sequence[PreferenceRow],
    current_policy: str,
    *,
    max_pairs: int,
    heldout_fraction: float,
    seed: int = 0,
    min_listen_fraction: float = DEFAULT_MIN_LISTEN_FRACTION,
    max_pairs_per_user: int | None = None,
) -> PairRows:
    """The reward model's rows for one cycle, bounded whatever the size of the buffer window.

    Only usable rows (``musicrl.buffer.usable_pair``) count, split by generation id (``split_of``) as always.
    Per user: with ``max_pairs_per_user``, each ``user_pseudonym`` keeps at most that many rows in the
    train split and as many in the held-out split, its newest (``finetune_max_pairs_per_user``): one
    listener who floods votes weighs no more than that in the model or its held-out check. The dropped
    rows are counted in ``stats``.
    Train: every train-split row of ``current_policy`` (if there are more than ``max_pairs``, the newest
    ``max_pairs``), then a seeded uniform sample of the older policies' train-split rows fills up to
    ``max_pairs`` (the replay; seeded by ``seed`` and the policy, so a resumed cycle picks the same rows
    and the next policy's cycle a different sample). Held-out: the eval-split rows, current policy first,
    newest first, at most ``max_pairs // 4``. Rows sampled across a hot swap (``mixed_policy``) count
    under their ``policy_version`` like any other. O(n log n) in the rows; the pairs (and prompt embeddings)
    are built afterwards for the selected rows only.
    """
    train_items, heldout_items = [], []
    for index, row in enumerate(rows):
        if not usable_pair(row, min_listen_fraction):
            continue
        split = heldout_items if split_of(row["generation_id"], heldout_fraction) == "eval" else train_items
        split.append((_recency(row, index), row))
    n_train_available, n_heldout_available = len(train_items), len(heldout_items)
    train_items, n_train_dropped = _cap_per_user(train_items, max_pairs_per_user)
    heldout_items, n_heldout_dropped = _cap_per_user(heldout_items, max_pairs_per_user)
    current, older = [], []
    for recency, row in train_items:
        if row.get("policy_version") == current_policy:
            current.append((recency, row))
        else:
            older.append(row)
    heldout = [(row.get("policy_version") == current_policy, recency, row) for recency, row in heldout_items]
    newest = [row for _, row in sorted(current, key=lambda item: item[0], reverse=True)[:max_pairs]]
    n_replay = min(len(older), max_pairs - len(newest))
    rng = np.random.default_rng([seed, zlib.crc32(str(current_policy).encode())])
    picked = np.sort(rng.choice(len(older), size=n_replay, replace=False)) if n_replay > 0 else []
    replay = [older[i] for i in picked]
    heldout.sort(key=lambda item: (item[0], item[1]), reverse=True)
    kept_heldout = [row for _, _, row in heldout[: max_pairs // 4]]
    stats = {
        "n_train_current_policy": len(newest),
        "n_train_replay": len(replay),
        "n_train_available": n_train_available,
        "n_heldout_available": n_heldout_available,
        "max_pairs": max_pairs,
        "max_pairs_per_user": max_pairs_per_user,
        "n_train_dropped_user_cap": n_train_dropped,
        "n_heldout_dropped_user_cap": n_heldout_dropped,
        "n_dropped_user_cap": n_train_dropped + n_heldout_dropped,
    }
    if n_train_dropped or n_heldout_dropped:
        log.info(
            "reward_model.user_cap",
            max_pairs_per_user=max_pairs_per_user,
            dropped_train=n_train_dropped,
            dropped_heldout=n_heldout_dropped,
        )
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
        return (
            None,
            f"trained with held-out fraction {trained_with} < {heldout_fraction}: its training pairs are now held out",
        )
    model.set_heads(n_heads, seed=seed)
    model.disagreement_penalty = float(disagreement_penalty)
    return model, "ok"


def row_codebooks(row: PreferenceRow) -> tuple[int, int]:
    """(K of clip a, K of clip b) of a buffer row: its ``codebooks_a/b`` columns, 1 where absent or null."""
    return int(row.get("codebooks_a") or 1), int(row.get("codebooks_b") or 1)


def rows_of_codebooks(rows: Sequence[PreferenceRow], num_codebooks: int) -> list[PreferenceRow]:
    """The rows whose two clips both have ``num_codebooks`` codebooks (a policy's reward model reads its own
    kind's clips)."""
    return [r for r in rows if row_codebooks(r) == (num_codebooks, num_codebooks)]


def pairs_from_rows(
    rows: Sequence[PreferenceRow],
    embed: Callable[[list[str]], np.ndarray] | None,
    min_listen_fraction: float = DEFAULT_MIN_LISTEN_FRACTION,
    num_codebooks: int = 1,
) -> BufferPairs:
    """Bradley-Terry pairs (preferred first; ties kept as ties) from buffer rows.

    Clips are ``[T]`` tokens for one codebook (as always) and ``[K, T]`` codes for ``num_codebooks`` K > 1
    (the flat, codebook-major ``tokens_a/b`` reshaped with ``codebooks_a/b``, ``musicrl.buffer.clip_codes``);
    rows whose clips have another number of codebooks (another kind of policy) are left out. ``embed``: the
    prompts' embeddings of the default model; None for MusicGen (its trunk conditions on the prompt itself).
    """
    kept = [
        r for r in rows if usable_pair(r, min_listen_fraction) and row_codebooks(r) == (num_codebooks, num_codebooks)
    ]
    if not kept:
        return BufferPairs([], [], [])
    prompts = sorted({r["prompt"] for r in kept})
    cond = dict(zip(prompts, np.asarray(embed(prompts), dtype=np.float32))) if embed is not None else {}

    def clip(row: dict, side: str) -> np.ndarray:
        tokens = np.asarray(row[f"tokens_{side}"], dtype=np.int64)
        return tokens if num_codebooks == 1 else clip_codes(tokens, num_codebooks)

    pairs = []
    for row in kept:
        win, lose = ("b", "a") if row["choice"] == "b" else ("a", "b")
        pairs.append(
            PreferencePair(
                cond=cond.get(row["prompt"]),
                preferred=clip(row, win),
                other=clip(row, lose),
                tie=row["choice"] == "tie",
                prompt=row["prompt"],
            )
        )
    return BufferPairs(pairs, [r["prompt"] for r in kept], [r["generation_id"] for r in kept])


def single_reward_accuracy(
    pairs: BufferPairs, reward_fn: RewardFunction, components: tuple[str, ...]
) -> dict[str, float]:
    """Pairwise accuracy of each reward component used alone on the decided pairs (equal scores count half)."""
    decided = [i for i, p in enumerate(pairs.pairs) if not p.tie]
    if not decided:
        return {c: float("nan") for c in components}
    prompts = [pairs.prompts[i] for i in decided]

    def scores(clips: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len({c.shape for c in clips}) == 1:
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
    if not isinstance(generator, Generator):
        raise ValueError(
            "fine-tuning the reward model (finetune_rm_fit=finetune) is for the default generator; "
            f"a {getattr(generator, 'kind', type(generator).__name__)} policy's model is fitted as a probe "
            "(finetune_rm_fit=probe)"
        )
    device = next(generator.parameters()).device
    model = (
        start if start is not None else PreferenceRewardModel.from_generator(generator, n_heads, disagreement_penalty)
    ).to(device)
    metrics = train_preference_model(model, train.pairs, config, heldout=heldout.pairs)
    if reward_fn is not None and heldout.pairs:
        for name, accuracy in single_reward_accuracy(heldout, reward_fn, ("text_adherence", "quality")).items():
            metrics[f"heldout_accuracy_{name}_only"] = accuracy
    metrics["n_heldout_decided"] = sum(1 for p in heldout.pairs if not p.tie)
    save_preference_model(
        model, out_dir, meta={**(meta or {}), "window_frames": config.window_frames, "metrics": metrics}
    )
    log.info("reward_model.trained", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


def fit_reward_model(
    generator: Generator,
    train: BufferPairs,
    heldout: BufferPairs,
    reward_fn: RewardFunction | None,
    out_dir: Path,
    *,
    l2: float,
    folds: int,
    n_heads: int,
    disagreement_penalty: float,
    seed: int = 0,
    meta: dict | None = None,
) -> dict:
    """The reward model as a frozen copy of ``generator`` with linear heads fitted on every selected pair
    (``finetune_rm_fit=probe``, the default); save it (with ONNX) in ``out_dir``; returns metrics.

    ``heldout_accuracy`` is the ``folds``-fold cross-validated accuracy over the train and held-out pairs
    together (``cv_accuracy``): every pair is judged by heads that never saw it, and the number that decides
    whether the model is used rests on all the pairs rather than a fifth of them.
    """
    pairs = BufferPairs(
        train.pairs + heldout.pairs, train.prompts + heldout.prompts, train.generation_ids + heldout.generation_ids
    )
    if not pairs.pairs:
        raise ValueError("no training pairs in the buffer")
    device = next(generator.parameters()).device
    if isinstance(generator, Generator):
        model = PreferenceRewardModel.from_generator(generator, n_heads, disagreement_penalty).to(device)
    else:  # a MusicGen policy: its decoder is the trunk (musicrl.models.preference_musicgen)
        from musicrl.models.preference_musicgen import MusicgenPreferenceModel  # noqa: PLC0415 - imports transformers

        model = MusicgenPreferenceModel.from_policy(generator, n_heads, disagreement_penalty).to(device)
    metrics = fit_preference_heads(model, pairs.pairs, l2=l2, folds=folds, seed=seed)
    # The names the cycle, its reports and the fine-tune fit share: every decided pair was judged out of sample.
    metrics["heldout_accuracy"], metrics["n_heldout_decided"] = metrics["cv_accuracy"], metrics["n_cv_decided"]
    if reward_fn is not None:
        for name, accuracy in single_reward_accuracy(pairs, reward_fn, ("text_adherence", "quality")).items():
            metrics[f"heldout_accuracy_{name}_only"] = accuracy  # fixed rewards: every pair is out of sample
    if isinstance(model, PreferenceRewardModel):
        save_preference_model(
            model, out_dir, meta={**(meta or {}), "window_frames": DEFAULT_WINDOW_FRAMES, "metrics": metrics}
        )
    else:
        model.save(out_dir, meta={**(meta or {}), "window_frames": model.window_frames, "metrics": metrics})
    log.info("reward_model.fitted", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


def reward_model_from_settings(
    settings,
    generator: Generator,
    train: BufferPairs,
    heldout: BufferPairs,
    reward_fn: RewardFunction | None,
    out_dir: Path,
    *,
    start: PreferenceRewardModel | None = None,
    meta: dict | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """(metrics, training config as JSON) of the preference model the settings (``FinetuneSettings``) ask for:
    the probe fit, or the paper's fine-tuning (continuing ``start`` when given)."""
    s = settings
    heads = {"n_heads": s.finetune_rm_heads, "disagreement_penalty": s.finetune_rm_disagreement_penalty}
    if s.finetune_rm_fit == "probe":
        config = {"fit": "probe", "l2": s.finetune_rm_l2, "cv_folds": s.finetune_rm_cv_folds, "seed": s.finetune_seed}
        metrics = fit_reward_model(
            generator,
            train,
            heldout,
            reward_fn,
            out_dir,
            l2=s.finetune_rm_l2,
            folds=s.finetune_rm_cv_folds,
            seed=s.finetune_seed,
            meta=meta,
            **heads,
        )
        return metrics, {**config, **heads}
    training = PreferenceTrainingConfig(
        learning_rate=s.finetune_rm_lr,
        epochs=s.finetune_rm_epochs,
        batch_size=s.finetune_rm_batch_size,
        seed=s.finetune_seed,
        optimizer=s.finetune_rm_optimizer,
        progress=progress,
    )
    metrics = train_reward_model(
        generator, train, heldout, reward_fn, training, out_dir, start=start, meta=meta, **heads
    )
    return metrics, {"fit": "finetune", **asdict(training), **heads}
