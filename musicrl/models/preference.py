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
DEFAULT_WINDOW_FRAMES = codec.frames_for(EDGE_WINDOW_S)


class PreferenceRewardModel(nn.Module):
    """Generator trunk + scalar head; ``forward(cond, tokens, lengths) -> scores [B]``."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = Generator(config)
        self.head = nn.Linear(config.d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_generator(cls, generator: Generator) -> PreferenceRewardModel:
        """A reward model whose trunk starts as a copy of ``generator`` (which is left untouched)."""
        model = cls(copy.deepcopy(generator.config))
        model.trunk.load_state_dict(generator.state_dict())
        return model

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B]; ``lengths`` [B] marks right padding (the trunk is causal, so padding never leaks back)."""
        states = self.trunk.hidden(cond, tokens)
        if lengths is None:
            pooled = states.mean(dim=1)
        else:
            mask = (torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)).to(states.dtype)
            pooled = (states * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)


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


def score_clips(model: PreferenceRewardModel, cond: torch.Tensor, clips: Sequence[np.ndarray], window_frames: int) -> torch.Tensor:
    """Score [N] of each clip: the mean of its window scores (differentiable)."""
    tokens, lengths, owners = _window_batch(clips, window_frames)
    device = next(model.parameters()).device
    window_scores = model(cond.to(device)[owners.to(device)], tokens.to(device), lengths.to(device))
    totals = torch.zeros(len(clips), device=device).index_add(0, owners.to(device), window_scores)
    counts = torch.bincount(owners, minlength=len(clips)).to(device)
    return totals / counts


# ---------------------------------------------------------------------- training


@dataclass
class PreferencePair:
    cond: np.ndarray  # [text_dim] caption embedding
    preferred: np.ndarray  # tokens of the clip the listener chose (either clip for a tie)
    other: np.ndarray  # tokens of the other clip
    tie: bool = False


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


def bradley_terry_loss(preferred_scores: torch.Tensor, other_scores: torch.Tensor, ties: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the choices under Bradley-Terry; a tie is a half-half target."""
    margin = preferred_scores - other_scores
    target = torch.ones_like(margin) if ties is None else torch.where(ties, 0.5, 1.0).to(margin.dtype)
    return -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin)).mean()


def _make_optimizer(model: nn.Module, config: PreferenceTrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=config.learning_rate)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'adafactor' or 'adamw'")


def _pair_tensors(pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray], torch.Tensor]:
    cond = torch.from_numpy(np.stack([np.asarray(p.cond, dtype=np.float32) for p in pairs]))
    ties = torch.tensor([bool(p.tie) for p in pairs])
    return cond, [np.asarray(p.preferred) for p in pairs], [np.asarray(p.other) for p in pairs], ties


def pair_scores(model: PreferenceRewardModel, pairs: Sequence[PreferencePair], window_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(preferred), r(other)) for each pair, both clips scored in one batch (differentiable)."""
    cond, preferred, other, _ = _pair_tensors(pairs)
    scores = score_clips(model, torch.cat([cond, cond]), preferred + other, window_frames)
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def evaluate_pairs(model: PreferenceRewardModel, pairs: Sequence[PreferencePair], window_frames: int = DEFAULT_WINDOW_FRAMES, batch_size: int = 64) -> dict:
    """Pairwise accuracy (non-tie pairs; a zero margin counts half) and Bradley-Terry loss."""
    was_training = model.training
    model.eval()
    margins, ties = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        preferred, other = pair_scores(model, chunk, window_frames)
        margins.append((preferred - other).cpu())
        ties.append(torch.tensor([bool(p.tie) for p in chunk]))
    model.train(was_training)
    if not margins:
        return {"accuracy": float("nan"), "loss": float("nan"), "n_pairs": 0}
    margin, tie = torch.cat(margins), torch.cat(ties)
    decided = margin[~tie]
    accuracy = float(((decided > 0).float() + 0.5 * (decided == 0).float()).mean()) if decided.numel() else float("nan")
    loss = float(bradley_terry_loss(margin, torch.zeros_like(margin), tie))
    return {"accuracy": accuracy, "loss": loss, "n_pairs": int(margin.numel())}


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
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
    before = evaluate_pairs(model, heldout, config.window_frames)
    model.train()
    losses, step = [], 0
    progress = tqdm(total=total_steps, desc="preference model", disable=not config.progress)
    while step < total_steps:
        order = rng.permutation(len(pairs))
        for start in range(0, len(pairs), config.batch_size):
            if step >= total_steps:
                break
            batch = [pairs[i] for i in order[start : start + config.batch_size]]
            preferred, other = pair_scores(model, batch, config.window_frames)
            loss = bradley_terry_loss(preferred, other, torch.tensor([bool(p.tie) for p in batch], device=preferred.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    progress.close()
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
        "heldout_loss": after["loss"],
    }


# ---------------------------------------------------------------------- checkpoints, ONNX and serving


def save_preference_model(model: PreferenceRewardModel, directory: str | Path, meta: dict | None = None, export_onnx: bool = True) -> Path:
    """``config.json`` + ``weights.pt`` + ``meta.json`` (+ ``preference.onnx``) in ``directory``."""
    directory = write_checkpoint(model, directory, meta)
    if export_onnx:
        export_preference_onnx(model, directory / ONNX_FILE)
    return directory


def load_preference_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[PreferenceRewardModel, dict]:
    return read_checkpoint(directory, PreferenceRewardModel, "preference model", device)


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
            raise ValueError(f"cond must be [n, text_dim] with one row per clip, got {cond.shape} for {len(clips)} clips")
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

    def __init__(self, model: PreferenceRewardModel, version: str = "0", window_frames: int = DEFAULT_WINDOW_FRAMES) -> None:
        self.model, self.version, self.window_frames = model.eval(), version, window_frames

    @classmethod
    def load(cls, directory: str | Path, version: str | None = None) -> TorchPreferenceModel:
        model, meta = load_preference_model(directory)
        return cls(model, version or str(meta.get("version", "0")), int(meta.get("window_frames", DEFAULT_WINDOW_FRAMES)))

    @torch.no_grad()
    def _score_windows(self, cond, tokens, lengths):
        return self.model(torch.from_numpy(cond), torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()


class OnnxPreferenceModel(_WindowedScorer):
    """The PreferenceModel interface backed by ONNX Runtime (what the reward service serves)."""

    def __init__(self, path: str | Path, version: str = "0", window_frames: int = DEFAULT_WINDOW_FRAMES, threads: int = 1) -> None:
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
