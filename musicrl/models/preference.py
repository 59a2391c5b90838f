"""Bradley-Terry user-preference reward model over (caption embedding, clip tokens).

As in MusicRL (section 3.3), the reward model is the generator's trunk plus a
scalar head and is initialised from the generator's weights: the paper found
that a reward model trained from scratch did no better than chance. The score
of a clip is the head applied to the mean of the trunk's last-layer states over
the clip's frames. Long clips are scored on windows (the first and the last
``window_frames``, 20 s by default, as the paper does) and the window scores
averaged, so training and serving see the same windows.

Training maximises the Bradley-Terry likelihood of the observed choices:

    P(a preferred to b) = sigmoid(r(x, a) - r(x, b))
    loss = -[y log sigmoid(r_a - r_b) + (1 - y) log sigmoid(r_b - r_a)]

with y = 1 for a preference and y = 1/2 for a tie. Held-out pairwise accuracy
is measured on non-tie pairs.

A small ensemble (``n_heads`` > 1) puts several scalar heads on the shared
trunk. Each head is fitted with its own bootstrap weights on the pairs (Poisson(1)
per pair and head, drawn once per training run) and the Bradley-Terry loss is
averaged over the heads. The served score of a window is

    mean over heads - disagreement_penalty * std over heads

so clips on which the heads disagree (where the model is guessing) score lower,
and the policy is not pushed there. ``forward`` returns that one score, so the
ONNX export and the serving interface keep one score per clip. Both numbers are
stored in ``meta.json`` (``ensemble``); a checkpoint without them (older ones)
loads as one head with no penalty, which is exactly the model it always was.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from musicrl.audio import codec
from musicrl.models.generator import META_FILE, Generator, GeneratorConfig, read_checkpoint, write_checkpoint
from musicrl.rewards.windowing import EDGE_WINDOW_S, edge_windows

ONNX_FILE = "preference.onnx"
ENSEMBLE_KEY = "ensemble"  # meta.json: {"n_heads", "disagreement_penalty"}
DEFAULT_WINDOW_FRAMES = codec.frames_for(EDGE_WINDOW_S)


class PreferenceRewardModel(nn.Module):
    """Generator trunk + ``n_heads`` scalar heads; ``forward(cond, tokens, lengths) -> scores [B]``.

    The score is the heads' mean minus ``disagreement_penalty`` times their standard
    deviation (with one head: that head's score).
    """

    def __init__(self, config: GeneratorConfig, n_heads: int = 1, disagreement_penalty: float = 0.0) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be at least 1, got {n_heads}")
        if not disagreement_penalty >= 0:
            raise ValueError(f"disagreement_penalty must be >= 0, got {disagreement_penalty}")
        self.config = config
        self.n_heads = int(n_heads)
        self.disagreement_penalty = float(disagreement_penalty)
        self.trunk = Generator(config)
        self.head = nn.Linear(config.d_model, self.n_heads)  # one row per head: different random inits
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_generator(
        cls, generator: Generator, n_heads: int = 1, disagreement_penalty: float = 0.0
    ) -> PreferenceRewardModel:
        """A reward model whose trunk starts as a copy of ``generator`` (which is left untouched)."""
        model = cls(copy.deepcopy(generator.config), n_heads, disagreement_penalty)
        model.trunk.load_state_dict(generator.state_dict())
        return model

    @property
    def ensemble(self) -> dict:
        """What ``meta.json`` stores so that :func:`load_preference_model` rebuilds the same model."""
        return {"n_heads": self.n_heads, "disagreement_penalty": self.disagreement_penalty}

    @torch.no_grad()
    def set_heads(self, n_heads: int, seed: int = 0) -> PreferenceRewardModel:
        """Change the number of heads in place, keeping the trained ones.

        Head i becomes the old head ``i % old_n``; the copies get a small seeded perturbation
        (the init's scale) so the bootstrap can pull them apart. Used to warm-start an ensemble
        from a model trained with another number of heads (such as the single-head default).
        """
        if n_heads < 1:
            raise ValueError(f"n_heads must be at least 1, got {n_heads}")
        if n_heads == self.n_heads:
            return self
        old_weight, old_bias = self.head.weight.detach().clone(), self.head.bias.detach().clone()
        source = torch.arange(n_heads) % self.n_heads
        head = nn.Linear(self.config.d_model, n_heads).to(old_weight.device, old_weight.dtype)
        head.weight.copy_(old_weight[source])
        head.bias.copy_(old_bias[source])
        copies = torch.arange(n_heads) >= self.n_heads
        if copies.any():
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn((int(copies.sum()), self.config.d_model), generator=generator) * 0.02
            head.weight[copies.to(old_weight.device)] += noise.to(old_weight.device, old_weight.dtype)
        self.head, self.n_heads = head, int(n_heads)
        return self

    def head_scores(
        self, cond: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every head's score [B, n_heads]; ``lengths`` [B] marks right padding (the trunk is causal, so padding
        never leaks back)."""
        states = self.trunk.hidden(cond, tokens)
        if lengths is None:
            pooled = states.mean(dim=1)
        else:
            mask = (torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)).to(
                states.dtype
            )
            pooled = (states * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)

    def combine(self, head_scores: torch.Tensor) -> torch.Tensor:
        """Served score [...] from head scores [..., n_heads]: mean - penalty * std (sample std over heads)."""
        if self.n_heads == 1:
            return head_scores[..., 0]
        mean = head_scores.mean(dim=-1)
        if self.disagreement_penalty == 0:
            return mean
        variance = ((head_scores - mean.unsqueeze(-1)) ** 2).sum(dim=-1) / (self.n_heads - 1)
        return mean - self.disagreement_penalty * torch.sqrt(variance.clamp(min=1e-12))

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Served scores [B] (see :meth:`combine`)."""
        return self.combine(self.head_scores(cond, tokens, lengths))


# ---------------------------------------------------------------------- windows


def clip_windows(tokens: np.ndarray, window_frames: int) -> list[np.ndarray]:
    """The first and the last ``window_frames`` of a clip, or the whole clip when it fits in one window."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"a clip must be a non-empty 1-D token array, got shape {tokens.shape}")
    return [tokens[start:end] for start, end in edge_windows(tokens.size, window_frames)]


def _window_batch(clips: Sequence[np.ndarray], window_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded windows [W, L], their lengths [W] and the clip each belongs to [W]."""
    windows, owners = [], []
    for i, clip in enumerate(clips):
        for window in clip_windows(clip, window_frames):
            windows.append(window)
            owners.append(i)
    lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)
    padded = torch.full((len(windows), int(lengths.max())), codec.PAD, dtype=torch.long)
    for row, window in enumerate(windows):
        padded[row, : len(window)] = torch.from_numpy(window)
    return padded, lengths, torch.tensor(owners, dtype=torch.long)


def _clip_scores(
    model: PreferenceRewardModel, cond: torch.Tensor, clips: Sequence[np.ndarray], window_frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(served score [N], every head's score [N, n_heads]) of each clip, each the mean over the clip's windows."""
    tokens, lengths, owners = _window_batch(clips, window_frames)
    device = next(model.parameters()).device
    owners = owners.to(device)
    heads = model.head_scores(cond.to(device)[owners], tokens.to(device), lengths.to(device))
    served = model.combine(heads)  # per window, as the served model (ONNX) scores windows
    counts = torch.bincount(owners, minlength=len(clips)).to(heads.dtype)
    served_totals = torch.zeros(len(clips), device=device, dtype=served.dtype).index_add(0, owners, served)
    head_totals = torch.zeros((len(clips), heads.shape[1]), device=device, dtype=heads.dtype).index_add(
        0, owners, heads
    )
    return served_totals / counts, head_totals / counts.unsqueeze(1)


def score_clips(
    model: PreferenceRewardModel,
    cond: torch.Tensor,
    clips: Sequence[np.ndarray],
    window_frames: int,
    per_head: bool = False,
) -> torch.Tensor:
    """Score [N] of each clip: the mean of its window scores (differentiable).

    ``per_head``: every head's score [N, n_heads] instead (each head's window scores averaged), what training fits.
    """
    served, heads = _clip_scores(model, cond, clips, window_frames)
    return heads if per_head else served


# ---------------------------------------------------------------------- training


@dataclass
class PreferencePair:
    cond: np.ndarray | None  # [text_dim] caption embedding (None for a MusicGen model: T5 conditions on ``prompt``)
    preferred: np.ndarray  # tokens of the clip the listener chose (either clip for a tie): [T], or [K, T] codes
    other: np.ndarray  # tokens of the other clip
    tie: bool = False
    prompt: str = ""  # the caption itself (what a MusicGen trunk conditions on)


@dataclass
class PreferenceTrainingConfig:
    learning_rate: float = 1e-4  # the paper's reward-model learning rate
    # AdamW, not the paper's Adafactor: torch's Adafactor scales steps by each parameter's RMS, so at the
    # paper's lr a small model barely moves; "adafactor" is still accepted (try lr=1e-2).
    optimizer: str = "adamw"
    batch_size: int = 32  # pairs per step, as in the paper
    epochs: int = 4
    max_steps: int | None = None
    window_frames: int = DEFAULT_WINDOW_FRAMES
    heldout_fraction: float = 0.1
    seed: int = 0
    progress: bool = True
    # Keep the weights of the epoch (0 = the starting model) with the lowest held-out loss: a few hundred
    # noisy votes are memorised within a few epochs (train accuracy 0.92, held-out 0.49 in a closed-loop
    # round, against 0.59 for the model it started from).
    keep_best_epoch: bool = True


def bradley_terry_loss(
    preferred_scores: torch.Tensor,
    other_scores: torch.Tensor,
    ties: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood of the choices under Bradley-Terry; a tie is a half-half target.

    Scores are [B] or [B, n_heads] (``ties`` [B] then applies to every head). ``weights`` (the shape of
    the scores; bootstrap weights of mean 1) weight each term; the mean is taken over pairs and heads.
    """
    margin = preferred_scores - other_scores
    if ties is None:
        target = torch.ones_like(margin)
    else:
        target = torch.where(ties, 0.5, 1.0).to(margin.device, margin.dtype)
        target = target.reshape(target.shape + (1,) * (margin.ndim - target.ndim))
    nll = -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin))
    return nll.mean() if weights is None else (weights.to(nll.dtype) * nll).mean()


def bootstrap_weights(n_pairs: int, n_heads: int, seed: int) -> np.ndarray | None:
    """Poisson(1) weight of every pair for every head [n_pairs, n_heads] (None for a single head: plain training).

    Drawn once for a training run, so each head fits its own resample of the pairs throughout; redrawn
    every epoch, every head would see all the pairs on average and the heads would agree for no reason.
    """
    if n_heads <= 1:
        return None
    return np.random.default_rng([seed, 0xB007]).poisson(1.0, size=(n_pairs, n_heads)).astype(np.float32)


def _make_optimizer(model: nn.Module, config: PreferenceTrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=config.learning_rate)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'adafactor' or 'adamw'")


def _pair_tensors(
    pairs: Sequence[PreferencePair],
) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray], torch.Tensor]:
    cond = torch.from_numpy(np.stack([np.asarray(p.cond, dtype=np.float32) for p in pairs]))
    ties = torch.tensor([bool(p.tie) for p in pairs])
    return cond, [np.asarray(p.preferred) for p in pairs], [np.asarray(p.other) for p in pairs], ties


def pair_scores(
    model: PreferenceRewardModel, pairs: Sequence[PreferencePair], window_frames: int, per_head: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(preferred), r(other)) for each pair, both clips scored in one batch (differentiable); ``per_head``:
    [B, n_heads] each."""
    cond, preferred, other, _ = _pair_tensors(pairs)
    scores = score_clips(model, torch.cat([cond, cond]), preferred + other, window_frames, per_head=per_head)
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def evaluate_pairs(
    model: PreferenceRewardModel,
    pairs: Sequence[PreferencePair],
    window_frames: int = DEFAULT_WINDOW_FRAMES,
    batch_size: int = 64,
) -> dict:
    """Pairwise accuracy of the served score (non-tie pairs; a zero margin counts half) and Bradley-Terry loss.

    ``head_std``: the heads' mean disagreement (standard deviation over heads of a clip's score), 0 with one head.
    """
    was_training = model.training
    model.eval()
    margins, ties, stds = [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        cond, preferred, other, _ = _pair_tensors(chunk)
        served, heads = _clip_scores(model, torch.cat([cond, cond]), preferred + other, window_frames)
        margins.append((served[: len(chunk)] - served[len(chunk) :]).cpu())
        ties.append(torch.tensor([bool(p.tie) for p in chunk]))
        stds.append(heads.std(dim=1).cpu() if heads.shape[1] > 1 else torch.zeros(heads.shape[0]))
    model.train(was_training)
    if not margins:
        return {"accuracy": float("nan"), "loss": float("nan"), "n_pairs": 0, "head_std": float("nan")}
    margin, tie = torch.cat(margins), torch.cat(ties)
    decided = margin[~tie]
    accuracy = float(((decided > 0).float() + 0.5 * (decided == 0).float()).mean()) if decided.numel() else float("nan")
    loss = float(bradley_terry_loss(margin, torch.zeros_like(margin), tie))
    return {
        "accuracy": accuracy,
        "loss": loss,
        "n_pairs": int(margin.numel()),
        "head_std": float(torch.cat(stds).mean()),
    }


def train_preference_model(
    model: PreferenceRewardModel,
    pairs: Sequence[PreferencePair],
    config: PreferenceTrainingConfig | None = None,
    heldout: Sequence[PreferencePair] | None = None,
) -> dict:
    """Fit ``model`` on preference pairs; returns metrics incl. held-out pairwise accuracy.

    Without ``heldout``, a seeded ``heldout_fraction`` of ``pairs`` is held out.
    """
    config = config or PreferenceTrainingConfig()
    pairs = list(pairs)
    rng = np.random.default_rng(config.seed)
    if heldout is None:
        order = rng.permutation(len(pairs))
        n_heldout = int(round(len(pairs) * config.heldout_fraction))
        heldout = [pairs[i] for i in order[:n_heldout]]
        pairs = [pairs[i] for i in order[n_heldout:]]
    if not pairs:
        raise ValueError("no training pairs left after holding out")
    torch.manual_seed(config.seed)
    optimizer = _make_optimizer(model, config)
    weights = bootstrap_weights(len(pairs), getattr(model, "n_heads", 1), config.seed)
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
    before = evaluate_pairs(model, heldout, config.window_frames)
    best = {"epoch": 0, "loss": before["loss"], "state": copy.deepcopy(model.state_dict())}
    model.train()
    losses, step, epoch = [], 0, 0
    progress = tqdm(total=total_steps, desc="preference model", disable=not config.progress)
    while step < total_steps:
        order = rng.permutation(len(pairs))
        for start in range(0, len(pairs), config.batch_size):
            if step >= total_steps:
                break
            indices = order[start : start + config.batch_size]
            batch = [pairs[i] for i in indices]
            ties = torch.tensor([bool(p.tie) for p in batch])
            if weights is None:
                preferred, other = pair_scores(model, batch, config.window_frames)
                loss = bradley_terry_loss(preferred, other, ties.to(preferred.device))
            else:  # one Bradley-Terry loss per head on its bootstrap weights, averaged over heads
                preferred, other = pair_scores(model, batch, config.window_frames, per_head=True)
                loss = bradley_terry_loss(
                    preferred, other, ties.to(preferred.device), torch.from_numpy(weights[indices]).to(preferred.device)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        epoch += 1
        if config.keep_best_epoch and heldout:
            held = evaluate_pairs(model, heldout, config.window_frames)
            if held["loss"] < best["loss"]:
                best = {"epoch": epoch, "loss": held["loss"], "state": copy.deepcopy(model.state_dict())}
    progress.close()
    if config.keep_best_epoch and heldout:
        model.load_state_dict(best["state"])
    model.eval()
    after = evaluate_pairs(model, heldout, config.window_frames)
    train_eval = evaluate_pairs(model, pairs, config.window_frames)
    return {
        "steps": step,
        "n_train_pairs": len(pairs),
        "n_heldout_pairs": len(heldout),
        "train_loss_first": losses[0] if losses else float("nan"),
        "train_loss_last": float(np.mean(losses[-max(1, steps_per_epoch) :])) if losses else float("nan"),
        "train_accuracy": train_eval["accuracy"],
        "heldout_accuracy_before": before["accuracy"],
        "heldout_accuracy": after["accuracy"],
        "best_epoch": best["epoch"] if config.keep_best_epoch and heldout else epoch,
        "heldout_loss": after["loss"],
        "n_heads": getattr(model, "n_heads", 1),
        "disagreement_penalty": getattr(model, "disagreement_penalty", 0.0),
        "heldout_head_std": after["head_std"],
    }


# ---------------------------------------------------------------------- fitting the heads alone


@torch.no_grad()
def clip_features(
    model: PreferenceRewardModel, pairs: Sequence[PreferencePair], window_frames: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled trunk states of every pair's two clips, ([N, d_model] preferred, [N, d_model] other).

    A clip's feature is the mean over its windows of the window's pooled states, so a linear head
    applied to it gives the mean of the window scores, which is how clips are served. A model with its
    own trunk (``MusicgenPreferenceModel``) computes its features itself (``clip_pair_features``).
    """
    if hasattr(model, "clip_pair_features"):
        return model.clip_pair_features(pairs, window_frames)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preferred, other = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        cond, clips_a, clips_b, _ = _pair_tensors(chunk)
        tokens, lengths, owners = _window_batch(clips_a + clips_b, window_frames)
        owners = owners.to(device)
        states = model.trunk.hidden(torch.cat([cond, cond]).to(device)[owners], tokens.to(device))
        mask = (torch.arange(tokens.shape[1], device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)).to(
            states.dtype
        )
        pooled = (states * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        sums = torch.zeros((2 * len(chunk), pooled.shape[1]), device=device, dtype=pooled.dtype).index_add(
            0, owners, pooled
        )
        features = sums / torch.bincount(owners, minlength=2 * len(chunk)).to(pooled.dtype).unsqueeze(1)
        preferred.append(features[: len(chunk)].cpu())
        other.append(features[len(chunk) :].cpu())
    model.train(was_training)
    return torch.cat(preferred), torch.cat(other)


def fit_head(diffs: torch.Tensor, ties: torch.Tensor, l2: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weights w [d] of one linear head: minimise sum_i weight_i * BT-nll(w . diff_i) + l2 * |w * scale|^2.

    ``diffs`` [N, d] are feature differences (preferred - other). The penalty is on the weights of
    standardised features (``scale`` = the differences' standard deviation per feature), so one
    ``l2`` suits any feature scale; the bias cancels in every difference and is not fitted. Convex,
    solved to convergence by L-BFGS on the full batch.
    """
    scale = diffs.std(dim=0).clamp(min=1e-6)
    x = (diffs / scale).double()
    target = torch.where(ties, 0.5, 1.0).double()
    w_i = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        margin = x @ w
        nll = -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin))
        loss = (w_i * nll).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return (w.detach() / scale.double()).float()


def _fit_heads(diffs: torch.Tensor, ties: torch.Tensor, n_heads: int, l2: float, seed: int) -> torch.Tensor:
    """[n_heads, d]: head k fitted on its own bootstrap weights (one head: all pairs once)."""
    weights = bootstrap_weights(len(diffs), n_heads, seed)
    if weights is None:
        return fit_head(diffs, ties, l2)[None, :]
    return torch.stack([fit_head(diffs, ties, l2, torch.from_numpy(weights[:, k])) for k in range(n_heads)])


def _served_accuracy(
    heads: torch.Tensor,
    diffs: torch.Tensor,
    ties: torch.Tensor,
    model: PreferenceRewardModel,
    preferred: torch.Tensor,
    other: torch.Tensor,
) -> list[bool]:
    """Per decided pair: does the served score (mean - penalty * std over heads) rank the preferred clip first?"""
    decided = ~ties
    served = model.combine(preferred[decided] @ heads.T) - model.combine(other[decided] @ heads.T)
    return [bool(m > 0) if m != 0 else None for m in served]


def fit_preference_heads(
    model: PreferenceRewardModel,
    pairs: Sequence[PreferencePair],
    *,
    l2: float,
    folds: int = 5,
    seed: int = 0,
    window_frames: int = DEFAULT_WINDOW_FRAMES,
) -> dict:
    """Fit ``model``'s heads on ``pairs`` with its trunk frozen; returns metrics with a cross-validated accuracy.

    The trunk (a copy of the generator, as the paper initialises the reward model) turns every clip
    into one feature vector; each head is an L2-regularised Bradley-Terry (logistic) model on the
    feature differences, fitted on its own bootstrap resample. A convex fit on a few hundred pairs
    takes seconds, so the model's accuracy can be estimated by ``folds``-fold cross-validation over
    all the pairs instead of on a held-out fifth of them: about five times the pairs behind the
    number that decides whether the model is used (docs/finetune.md, "Reward model").
    """
    pairs = list(pairs)
    if len(pairs) < folds:
        raise ValueError(f"need at least {folds} pairs to cross-validate, got {len(pairs)}")
    preferred, other = clip_features(model, pairs, window_frames)
    ties = torch.tensor([bool(p.tie) for p in pairs])
    diffs = preferred - other
    order = np.random.default_rng([seed, 0xF01D]).permutation(len(pairs))
    fold_of = np.empty(len(pairs), dtype=np.int64)
    fold_of[order] = np.arange(len(pairs)) % folds
    outcomes: list[bool | None] = []
    for k in range(folds):
        train, test = torch.from_numpy(fold_of != k), torch.from_numpy(fold_of == k)
        heads = _fit_heads(diffs[train], ties[train], model.n_heads, l2, seed + k)
        outcomes += _served_accuracy(heads, diffs[test], ties[test], model, preferred[test], other[test])
    heads = _fit_heads(diffs, ties, model.n_heads, l2, seed)
    with torch.no_grad():
        model.head.weight.copy_(heads.to(model.head.weight.dtype))
        model.head.bias.zero_()
    train_outcomes = _served_accuracy(heads, diffs, ties, model, preferred, other)

    def accuracy(values: list[bool | None]) -> float:  # a zero margin counts half, as in evaluate_pairs
        return float(np.mean([0.5 if v is None else float(v) for v in values])) if values else float("nan")

    model.eval()
    return {
        "fit": "probe",
        "n_train_pairs": len(pairs),
        "cv_folds": folds,
        "cv_accuracy": accuracy(outcomes),
        "n_cv_decided": len(outcomes),
        "train_accuracy": accuracy(train_outcomes),
        "l2": l2,
        "n_heads": model.n_heads,
        "disagreement_penalty": model.disagreement_penalty,
    }


# ---------------------------------------------------------------------- checkpoints, ONNX and serving


def save_preference_model(
    model: PreferenceRewardModel, directory: str | Path, meta: dict | None = None, export_onnx: bool = True
) -> Path:
    """``config.json`` + ``weights.pt`` + ``meta.json`` (+ ``preference.onnx``) in ``directory``.

    ``meta.json`` gets ``ensemble`` (number of heads, disagreement penalty) so the model loads as saved.
    """
    directory = write_checkpoint(model, directory, {**(meta or {}), ENSEMBLE_KEY: model.ensemble})
    if export_onnx:
        export_preference_onnx(model, directory / ONNX_FILE)
    return directory


def load_preference_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[PreferenceRewardModel, dict]:
    """The model saved by :func:`save_preference_model` and its meta; without ``ensemble`` in the meta
    (checkpoints from before the ensemble), one head and no penalty."""
    meta_path = Path(directory) / META_FILE
    ensemble = (json.loads(meta_path.read_text()) if meta_path.is_file() else {}).get(ENSEMBLE_KEY) or {}
    n_heads, penalty = int(ensemble.get("n_heads", 1)), float(ensemble.get("disagreement_penalty", 0.0))
    return read_checkpoint(
        directory, lambda config: PreferenceRewardModel(config, n_heads, penalty), "preference model", device
    )


def export_preference_onnx(model: PreferenceRewardModel, path: str | Path, opset: int = 17) -> Path:
    """Export ``(cond [N, text_dim], tokens [N, L] int64, lengths [N] int64) -> score [N]``."""
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    example = (torch.zeros(2, model.config.text_dim), torch.zeros(2, 8, dtype=torch.long), torch.tensor([8, 5]))
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript;
        # it is still the one that exports this model without extra dependencies.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=["cond", "tokens", "lengths"],
            output_names=["score"],
            dynamic_axes={"cond": {0: "n"}, "tokens": {0: "n", 1: "frames"}, "lengths": {0: "n"}, "score": {0: "n"}},
            opset_version=opset,
        )
    return path


class _WindowedScorer:
    """``score(cond, tokens) -> (n,)`` over first/last windows; subclasses run one batch of windows."""

    version: str
    window_frames: int

    def score(self, cond, tokens) -> np.ndarray:
        cond = np.asarray(cond, dtype=np.float32)
        clips = [np.asarray(t, dtype=np.int64) for t in tokens]
        if cond.ndim != 2 or cond.shape[0] != len(clips):
            raise ValueError(
                f"cond must be [n, text_dim] with one row per clip, got {cond.shape} for {len(clips)} clips"
            )
        for clip in clips:
            if clip.size and (clip.min() < 0 or clip.max() >= codec.VOCAB_SIZE):
                raise ValueError(f"token ids must be in [0, {codec.VOCAB_SIZE})")
        if not clips:
            return np.zeros(0, dtype=np.float32)
        windows, lengths, owners = _window_batch(clips, self.window_frames)
        window_scores = self._score_windows(cond[owners.numpy()], windows.numpy(), lengths.numpy())
        totals = np.bincount(owners.numpy(), weights=window_scores, minlength=len(clips))
        return (totals / np.bincount(owners.numpy(), minlength=len(clips))).astype(np.float32)

    def _score_windows(self, cond: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TorchPreferenceModel(_WindowedScorer):
    """The PreferenceModel interface backed by the torch model (what training uses)."""

    def __init__(
        self, model: PreferenceRewardModel, version: str = "0", window_frames: int = DEFAULT_WINDOW_FRAMES
    ) -> None:
        self.model, self.version, self.window_frames = model.eval(), version, window_frames

    @classmethod
    def load(cls, directory: str | Path, version: str | None = None) -> TorchPreferenceModel:
        model, meta = load_preference_model(directory)
        return cls(
            model, version or str(meta.get("version", "0")), int(meta.get("window_frames", DEFAULT_WINDOW_FRAMES))
        )

    @torch.no_grad()
    def _score_windows(self, cond, tokens, lengths):
        return self.model(torch.from_numpy(cond), torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()


class OnnxPreferenceModel(_WindowedScorer):
    """The PreferenceModel interface backed by ONNX Runtime (what the reward service serves)."""

    def __init__(
        self, path: str | Path, version: str = "0", window_frames: int = DEFAULT_WINDOW_FRAMES, threads: int = 1
    ) -> None:
        import onnxruntime as ort  # noqa: PLC0415 - only serving needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.version, self.window_frames = version, window_frames

    @classmethod
    def load(cls, directory: str | Path, version: str | None = None, threads: int = 1) -> OnnxPreferenceModel:
        directory = Path(directory)
        meta_path = directory / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        window = int(meta.get("window_frames", DEFAULT_WINDOW_FRAMES))
        return cls(directory / ONNX_FILE, version or str(meta.get("version", "0")), window, threads)

    def _score_windows(self, cond, tokens, lengths):
        return self.session.run(["score"], {"cond": cond, "tokens": tokens, "lengths": lengths})[0]
