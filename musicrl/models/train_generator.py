"""Pretrain the generator on the procedural corpus: next-token cross-entropy given the caption.

Each training example is one corpus clip (from its first frame, so the model
learns how clips begin) paired with one of its captions, embedded once by the
frozen text encoder and cached. The run is seeded and resumable: the training
state (model, optimiser, step) is written to ``work_dir`` every
``checkpoint_every`` steps and a rerun with the same settings continues from it;
the batch of step ``s`` depends only on ``(seed, s)``. The final weights go to
``out_dir`` in the format of :func:`musicrl.models.generator.save_generator`.

Counterfactual captions (``counterfactual_batch_size`` > 0): some words of a
caption (the mode, the tempo) move its sentence embedding so little (cosine
~0.98 when swapped) that next-token cross-entropy alone never teaches the model
to follow them. For those clip openings the loss adds, per attribute, the
Bradley-Terry loss of the generator as a classifier of its own captions:

    L_cf = -log sigmoid( log p(x | c) - log p(x | c') ) / T

where c is the clip's caption, c' the same phrasing with that attribute
changed (``musicrl.corpus.counterfactual_captions``) and T the opening's
length, so that at weight 1 a token counts in L_cf as much as in the
cross-entropy (unnormalised, the sequence-level term swamped it and the
cross-entropy rose).

Attribute head (``model.attribute_names``): the auxiliary loss is the
cross-entropy of the head's classifiers against the corpus labels of every
caption of the step (counterfactual ones too, with their changed labels). A
head the run adds to a trained model is first fitted in closed form, because
a zero-initialised layer grows by at most the learning rate per Adam step (a
logit bias of 3 nats would take thousands of steps): the classifiers by
logistic regression on the training captions, the logit bias to the
log-likelihood ratio of each token given each attribute value in the
training clips, log p(token | value) - log p(token).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from musicrl.audio import codec
from musicrl.checkpoint import load_torch, save_torch_atomic
from musicrl.models.generator import Generator, GeneratorConfig, load_generator, save_generator

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


def default_model_config() -> GeneratorConfig:
    return GeneratorConfig(n_layers=4, n_heads=4, d_model=256, max_frames=codec.frames_for(30.0))


@dataclass
class GeneratorTrainingConfig:
    out_dir: Path = Path("checkpoints/generator")
    work_dir: Path = Path(".data/train/generator")  # resumable state and the embedding cache, not committed
    model: GeneratorConfig = field(default_factory=default_model_config)
    init_from: Path | None = None  # a generator checkpoint to start from (a second stage) instead of random weights
    n_train: int = 3000  # corpus clips; each comes with `captions_per_clip` phrasings
    n_valid: int = 200
    captions_per_clip: int = 2
    corpus_seed: int = 0
    steps: int = 500
    batch_size: int = 16  # whole clips per step
    # Clip openings per step, cropped to `start_frames`: the prompt is what decides the first notes (instrument,
    # key, pace) while later frames mostly follow from the earlier ones, so openings teach conditioning cheaply.
    start_batch_size: int = 0
    start_frames: int = 40
    # Clip openings per step also scored under counterfactual captions (see the module docstring); their
    # cross-entropy under the true caption counts like that of the other openings.
    counterfactual_batch_size: int = 0
    counterfactual_frames: int = 80
    counterfactual_weight: float = 1.0
    attribute_weight: float = 1.0  # the attribute head's auxiliary loss (when the model has a head)
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 100
    seed: int = 0
    threads: int = 1
    progress: bool = True
    command: str | None = None  # the command line that ran it, recorded in meta.json

    @property
    def duration_s(self) -> float:
        return self.model.max_frames / codec.FRAME_RATE

    def fingerprint(self) -> str:
        """What a resumed run must share with the run it continues."""
        keys = asdict(self)
        for volatile in (
            "out_dir",
            "work_dir",
            "checkpoint_every",
            "eval_every",
            "threads",
            "progress",
            "steps",
            "command",
        ):
            keys.pop(volatile)
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class CaptionedClips:
    tokens: torch.Tensor  # [N, T] int64
    embeddings: torch.Tensor  # [N, captions_per_clip, text_dim] float32
    # [N, captions_per_clip, len(COUNTERFACTUAL_ATTRIBUTES), text_dim]: caption k with one attribute changed
    counterfactuals: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [N, len(model.attribute_names)] int64, for the attribute head
    counterfactual_labels: torch.Tensor | None = None  # [N, len(COUNTERFACTUAL_ATTRIBUTES), len(attribute_names)]
    bpm: torch.Tensor | None = None  # [N] float32: the clips' BPM, for a model with a beat clock
    counterfactual_bpm: torch.Tensor | None = None  # [N, len(COUNTERFACTUAL_ATTRIBUTES)]


def _embed(config: GeneratorTrainingConfig, captions: list[str], name: str) -> np.ndarray:
    """Embeddings of ``captions`` by the frozen text encoder, cached under ``work_dir``."""
    from musicrl.text import load_text_encoder  # noqa: PLC0415

    key = hashlib.sha256(json.dumps([config.model.text_encoder, captions]).encode()).hexdigest()[:16]
    cache = Path(config.work_dir) / f"embeddings-{name}-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    encoder = load_text_encoder(config.model.text_encoder)
    chunks = [captions[i : i + 256] for i in range(0, len(captions), 256)]
    vectors = np.concatenate(
        [encoder.embed(chunk) for chunk in tqdm(chunks, desc=f"embedding {name} captions", disable=not config.progress)]
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def load_split(
    config: GeneratorTrainingConfig, split: str, n: int, captions_per_clip: int, counterfactuals: bool = False
) -> CaptionedClips:
    """Corpus clips of ``split`` with their caption embeddings (and those of their counterfactual captions), and
    labels."""
    from musicrl.corpus import COUNTERFACTUAL_ATTRIBUTES, attribute_labels, counterfactual_captions, make_corpus  # noqa: PLC0415

    names = config.model.attribute_names
    records = make_corpus(
        n, seed=config.corpus_seed, split=split, duration_s=config.duration_s, n_captions=captions_per_clip
    )
    tokens = torch.from_numpy(np.stack([r.tokens for r in records]))
    captions = [c for r in records for c in ([r.caption] + r.extra_captions)[:captions_per_clip]]
    data = CaptionedClips(tokens, torch.from_numpy(_embed(config, captions, split)).view(n, captions_per_clip, -1))
    if names:
        data.labels = torch.tensor([attribute_labels(r.attributes, names) for r in records])
    if config.model.bpm_bins:
        data.bpm = torch.tensor([float(r.attributes["bpm"]) for r in records])
    if counterfactuals:
        variants = [
            counterfactual_captions(r.index, r.seed, split, config.duration_s, captions_per_clip) for r in records
        ]
        changed = [
            phrasing[name] for _, phrasings in variants for phrasing in phrasings for name in COUNTERFACTUAL_ATTRIBUTES
        ]
        vectors = torch.from_numpy(_embed(config, changed, f"{split}-counterfactual"))
        data.counterfactuals = vectors.view(n, captions_per_clip, len(COUNTERFACTUAL_ATTRIBUTES), -1)
        if names:
            data.counterfactual_labels = torch.tensor(
                [[attribute_labels(attrs[name], names) for name in COUNTERFACTUAL_ATTRIBUTES] for attrs, _ in variants]
            )
        if config.model.bpm_bins:
            data.counterfactual_bpm = torch.tensor(
                [[float(attrs[name].bpm) for name in COUNTERFACTUAL_ATTRIBUTES] for attrs, _ in variants]
            )
    return data


def learning_rate_at(step: int, config: GeneratorTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_learning_rate`` (nanoGPT's schedule)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (
        config.learning_rate - config.min_learning_rate
    )


def fit_attribute_head(model: Generator, data: CaptionedClips) -> dict:
    """Set the attribute head to logistic regressions fitted on the training captions; returns their training
    accuracy."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x = data.embeddings.flatten(0, 1)
    y = data.labels.repeat_interleave(data.embeddings.shape[1], dim=0)
    if data.counterfactuals is not None:
        x = torch.cat([x, data.counterfactuals.flatten(0, 2)])
        y = torch.cat(
            [y, data.counterfactual_labels.unsqueeze(1).expand(-1, data.embeddings.shape[1], -1, -1).flatten(0, 2)]
        )
    weights, biases, accuracy = [], [], {}
    for g, (name, size) in enumerate(zip(model.config.attribute_names, model.config.attribute_sizes, strict=True)):
        target = y[:, g].numpy()
        classifier = LogisticRegression(C=10.0, max_iter=2000).fit(x.numpy(), target)
        full_w, full_b = (
            np.zeros((size, x.shape[1])),
            np.full(size, -10.0),
        )  # a value never seen in training stays unlikely
        coef, intercept = classifier.coef_, classifier.intercept_
        if (
            len(classifier.classes_) == 2
        ):  # sklearn keeps one row for two classes: logits (-z/2, z/2) give the same softmax
            coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        full_w[classifier.classes_], full_b[classifier.classes_] = coef, intercept
        weights.append(full_w), biases.append(full_b)
        accuracy[f"{name}_head_fit_accuracy"] = float(classifier.score(x.numpy(), target))
    with torch.no_grad():
        model.attribute_logits.weight.copy_(torch.from_numpy(np.concatenate(weights)))
        model.attribute_logits.bias.copy_(torch.from_numpy(np.concatenate(biases)))
        model.attribute_bias.weight.copy_(
            token_log_likelihood_ratios(data, model.config.attribute_sizes, model.config.vocab_size).T
        )
        model.attribute_bias.bias.zero_()
        if model.config.bpm_bins:  # as loud as the position table the trained model already reads
            model.clock_proj.weight.normal_(0.0, float(model.pos_emb.weight.std()))
    return accuracy


def token_log_likelihood_ratios(
    data: CaptionedClips, sizes: tuple[int, ...], vocab_size: int, prior_frames: float = 100.0
) -> torch.Tensor:
    """[sum(sizes), V]: log p(token | attribute value) - log p(token) over the frames of the training clips.

    p(token | value) is smoothed towards p(token) with ``prior_frames`` pseudo-frames, so a token never
    played under a value gets log(prior_frames / (frames of that value + prior_frames)), not a boost.
    """
    frames = data.tokens.shape[1]
    marginal = torch.bincount(data.tokens.flatten(), minlength=vocab_size).double() + 1.0
    marginal = marginal / marginal.sum()
    rows = []
    for g, size in enumerate(sizes):
        labels = data.labels[:, g].repeat_interleave(frames)
        ones = torch.ones(labels.numel(), dtype=torch.float64)
        counts = torch.zeros(size, vocab_size, dtype=torch.float64).index_put_(
            (labels, data.tokens.flatten()), ones, accumulate=True
        )
        conditional = (counts + prior_frames * marginal) / (counts.sum(dim=1, keepdim=True) + prior_frames)
        rows.append((conditional / marginal).log())
    return torch.cat(rows).float()


def attribute_loss(model: Generator, cond: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the head's classifiers [] and whether each was right [B, G]."""
    logits = model.attribute_logits_of(cond)
    loss = sum(F.cross_entropy(group, labels[:, g]) for g, group in enumerate(logits)) / len(logits)
    return loss, torch.stack([group.argmax(-1) == labels[:, g] for g, group in enumerate(logits)], dim=1)


def make_optimizer(model: Generator, config: GeneratorTrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms and the BOS vector)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95))


def next_token_loss(model: Generator, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(cond, tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


@dataclass
class Batch:
    cond: torch.Tensor  # [B, text_dim]
    tokens: torch.Tensor  # [B, T]
    counterfactual_cond: torch.Tensor | None = None  # [B, A, text_dim]
    labels: torch.Tensor | None = None  # [B, G]
    counterfactual_labels: torch.Tensor | None = None  # [B, A, G]
    bpm: torch.Tensor | None = None  # [B]: the beat clock's BPM (None: what the model reads off the caption)
    counterfactual_bpm: torch.Tensor | None = None  # [B, A]


def batches_at(data: CaptionedClips, step: int, config: GeneratorTrainingConfig) -> list[Batch]:
    """Whole clips, clip openings and counterfactual openings of ``step``; depends only on (seed, step)."""
    rng = np.random.default_rng([config.seed, step])
    batches = []
    sizes = (
        (config.batch_size, data.tokens.shape[1], False),
        (config.start_batch_size, config.start_frames, False),
        (config.counterfactual_batch_size, config.counterfactual_frames, True),
    )
    for size, frames, counterfactual in sizes:
        if size:
            clips = rng.integers(0, data.tokens.shape[0], size)
            phrasings = rng.integers(0, data.embeddings.shape[1], size)
            batch = Batch(data.embeddings[clips, phrasings], data.tokens[clips, :frames])
            if counterfactual:
                batch.counterfactual_cond = data.counterfactuals[clips, phrasings]
            if data.labels is not None:
                batch.labels = data.labels[clips]
                batch.counterfactual_labels = data.counterfactual_labels[clips] if counterfactual else None
            if data.bpm is not None:
                batch.bpm = data.bpm[clips]
                batch.counterfactual_bpm = data.counterfactual_bpm[clips] if counterfactual else None
            batches.append(batch)
    return batches


def counterfactual_scores(model: Generator, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each clip under its caption [B, 1 + A] (counterfactuals after the first column) and the
    logits."""
    B, A, D = batch.counterfactual_cond.shape
    cond = torch.cat([batch.cond.unsqueeze(1), batch.counterfactual_cond], dim=1).reshape(B * (A + 1), D)
    tokens = batch.tokens.repeat_interleave(A + 1, dim=0)
    bpm = (
        None if batch.bpm is None else torch.cat([batch.bpm.unsqueeze(1), batch.counterfactual_bpm], dim=1).reshape(-1)
    )
    logits = model(cond, tokens, bpm)
    logp = -F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").sum(-1)
    return logp.view(B, A + 1), logits.view(B, A + 1, *logits.shape[1:])[:, 0]


def batch_loss(
    model: Generator, batches: list[Batch], counterfactual_weight: float = 1.0, attribute_weight: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over every token of the step's batches, plus the weighted counterfactual and attribute losses;
    and what to log."""
    cross_entropy, n_tokens, counterfactual, logs = 0.0, 0, 0.0, {}
    conds, labels = [], []
    for batch in batches:
        if batch.counterfactual_cond is None:
            logits = model(batch.cond, batch.tokens, batch.bpm)
        else:
            scores, logits = counterfactual_scores(model, batch)
            margin = scores[:, :1] - scores[:, 1:]  # [B, A]: log-likelihood ratio of the true caption
            # Divided by the length: at weight 1 a token weighs in this loss what it weighs in the cross-entropy.
            counterfactual = F.softplus(-margin).mean() / batch.tokens.shape[1]
            logs = counterfactual_logs(margin)
        cross_entropy = cross_entropy + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.tokens.reshape(-1), reduction="sum"
        )
        n_tokens += batch.tokens.numel()
        if batch.labels is not None:
            conds.append(batch.cond), labels.append(batch.labels)
            if batch.counterfactual_labels is not None:
                (
                    conds.append(batch.counterfactual_cond.flatten(0, 1)),
                    labels.append(batch.counterfactual_labels.flatten(0, 1)),
                )
    cross_entropy = cross_entropy / n_tokens
    loss = cross_entropy + counterfactual_weight * counterfactual
    if conds:
        attributes, right = attribute_loss(model, torch.cat(conds), torch.cat(labels))
        loss = loss + attribute_weight * attributes
        logs |= {"attribute_loss": float(attributes.detach())} | head_accuracy(model, right)
    return loss, logs | {"cross_entropy": float(cross_entropy.detach())}


def head_accuracy(model: Generator, right: torch.Tensor) -> dict:
    return {
        f"{name}_head_accuracy": float(right[:, g].float().mean())
        for g, name in enumerate(model.config.attribute_names)
    }


def counterfactual_logs(margin: torch.Tensor) -> dict:
    """Per attribute: how often the true caption is the likelier one, and the mean log-likelihood ratio."""
    from musicrl.corpus import COUNTERFACTUAL_ATTRIBUTES  # noqa: PLC0415

    margin = margin.detach()
    logs = {"counterfactual_loss": float(F.softplus(-margin).mean())}
    for a, name in enumerate(COUNTERFACTUAL_ATTRIBUTES):
        logs[f"{name}_preferred"] = float((margin[:, a] > 0).float().mean())
        logs[f"{name}_margin_nats"] = float(margin[:, a].mean())
    return logs


@torch.no_grad()
def validation_loss(model: Generator, data: CaptionedClips, batch_size: int = 50) -> float:
    model.eval()
    losses = [
        float(next_token_loss(model, data.embeddings[i : i + batch_size, 0], data.tokens[i : i + batch_size]))
        * len(data.tokens[i : i + batch_size])
        for i in range(0, len(data.tokens), batch_size)
    ]
    model.train()
    return sum(losses) / len(data.tokens)


@torch.no_grad()
def validation_counterfactuals(model: Generator, data: CaptionedClips, frames: int, batch_size: int = 50) -> dict:
    """Counterfactual logs on held-out clip openings: does the model prefer the true caption?"""
    model.eval()
    margins = []
    for i in range(0, len(data.tokens), batch_size):
        rows = slice(i, i + batch_size)
        scores, _ = counterfactual_scores(
            model, Batch(data.embeddings[rows, 0], data.tokens[rows, :frames], data.counterfactuals[rows, 0])
        )
        margins.append(scores[:, :1] - scores[:, 1:])
    model.train()
    return {f"valid_{k}": v for k, v in counterfactual_logs(torch.cat(margins)).items()}


@torch.no_grad()
def validation_attributes(model: Generator, data: CaptionedClips) -> dict:
    """The attribute head's accuracy on held-out captions (and their counterfactuals)."""
    cond, labels = data.embeddings[:, 0], data.labels
    if data.counterfactuals is not None:
        cond = torch.cat([cond, data.counterfactuals[:, 0].flatten(0, 1)])
        labels = torch.cat([labels, data.counterfactual_labels.flatten(0, 1)])
    _, right = attribute_loss(model, cond, labels)
    return {f"valid_{k}": v for k, v in head_accuracy(model, right).items()}


def validation_metrics(model: Generator, data: CaptionedClips, config: GeneratorTrainingConfig) -> dict:
    metrics = {"valid_loss": validation_loss(model, data)}
    if data.counterfactuals is not None:
        metrics |= validation_counterfactuals(model, data, config.counterfactual_frames)
    if data.labels is not None:
        metrics |= validation_attributes(model, data)
    return metrics


def initial_model(config: GeneratorTrainingConfig) -> tuple[Generator, bool, dict]:
    """Random weights, or those of ``init_from`` (a checkpoint without the run's attribute head gets one added);
    whether the model has an attribute head that is still untrained; and the parent checkpoint's meta ({} if none)."""
    torch.manual_seed(config.seed)
    model = Generator(config.model)
    if config.init_from is None:
        return model, bool(config.model.attribute_names), {}
    initial, parent = load_generator(config.init_from)
    without_head = {"attribute_names": (), "attribute_sizes": (), "bpm_bins": ()}
    if initial.config != config.model and initial.config != replace(config.model, **without_head):
        raise ValueError(f"{config.init_from} has another model config than this run: {initial.config}")
    missing, unexpected = model.load_state_dict(initial.state_dict(), strict=False)
    if unexpected or any(not name.startswith(("attribute_", "clock_proj")) for name in missing):
        raise ValueError(
            f"{config.init_from} does not fit this run's model: missing {missing}, unexpected {unexpected}"
        )
    return model, bool(missing), parent


def train_generator(config: GeneratorTrainingConfig, resume: bool = True) -> dict:
    """Train (or continue training) and write the final checkpoint; returns the run's metrics."""
    torch.set_num_threads(config.threads)
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    counterfactuals = config.counterfactual_batch_size > 0
    train = load_split(config, "train", config.n_train, config.captions_per_clip, counterfactuals)
    valid = load_split(config, "valid", config.n_valid, 1, counterfactuals)

    model, new_head, parent = initial_model(config)
    optimizer = make_optimizer(model, config)
    start_step, fingerprint, head_fit = 0, config.fingerprint(), {}
    state_path = work_dir / STATE_FILE
    if resume and state_path.is_file():
        state = load_torch(state_path)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{state_path} belongs to a run with other settings; pass --no-resume or another work dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, head_fit = state["step"], state.get("head_fit", {})
    if new_head and start_step == 0:
        head_fit = fit_attribute_head(model, train)

    def checkpoint(step: int) -> None:
        save_torch_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "fingerprint": fingerprint,
                "head_fit": head_fit,
            },
            state_path,
        )  # atomic: a crash mid-write never leaves a broken state

    log = (work_dir / LOG_FILE).open("a")
    model.train()
    recent: list[float] = []
    started = time.perf_counter()
    progress = tqdm(
        range(start_step, config.steps),
        initial=start_step,
        total=config.steps,
        desc="generator",
        disable=not config.progress,
    )
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss, logs = batch_loss(
            model, batches_at(train, step, config), config.counterfactual_weight, config.attribute_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        recent = (recent + [logs["cross_entropy"]])[-20:]
        progress.set_postfix(
            loss=f"{np.mean(recent):.3f}", **{k: f"{v:.2f}" for k, v in logs.items() if k.endswith("_preferred")}
        )
        done = step + 1
        entry = {
            "step": done,
            "train_loss": float(np.mean(recent)),
            "lr": learning_rate_at(step, config),
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        entry |= {k: v for k, v in logs.items() if k != "cross_entropy"}
        if done % config.eval_every == 0 or done == config.steps:
            entry |= validation_metrics(model, valid, config)
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoint(done)
        if "valid_loss" in entry or done % 10 == 0:
            log.write(json.dumps(entry) + "\n")
            log.flush()
    log.close()

    metrics = {
        "steps": config.steps,
        "train_loss": float(np.mean(recent)) if recent else None,
        **validation_metrics(model, valid, config),
        **head_fit,
        "parameters": model.num_parameters(),
        "train_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    save_generator(model.eval(), config.out_dir, checkpoint_meta(parent, metrics, config))
    return metrics


def checkpoint_meta(parent: dict, metrics: dict, config: GeneratorTrainingConfig) -> dict:
    """meta.json of a run's checkpoint: its metrics and settings, and the stages of its lineage (the parent's,
    then this one).

    A run from ``init_from`` gets the parent's version + 1, one from scratch version 1.
    """
    training = json.loads(
        json.dumps(
            {k: v for k, v in asdict(config).items() if k not in ("out_dir", "work_dir", "progress", "command")},
            default=str,
        )
    )
    stages = list(parent.get("stages", []))
    stages.append(
        {
            "stage": len(stages) + 1,
            "parent_version": parent.get("version"),
            "command": config.command,
            "metrics": metrics,
            "training": training,
        }
    )
    version = str(int(parent["version"]) + 1) if str(parent.get("version", "")).isdigit() else "1"
    return {
        "version": version,
        "kind": "generator",
        "metrics": metrics,
        "training": training,
        "stages": stages,
        "codec": {"vocab_size": codec.VOCAB_SIZE, "frame_rate": codec.FRAME_RATE, "sample_rate": codec.SAMPLE_RATE},
    }
