"""Pretrain the generator on the procedural corpus: next-token cross-entropy given the caption.

Each training example is one corpus clip (from its first frame, so the model
learns how clips begin) paired with one of its captions, embedded once by the
frozen text encoder and cached. The run is seeded and resumable: the training
state (model, optimiser, step) is written to ``work_dir`` every
``checkpoint_every`` steps and a rerun with the same settings continues from it;
the batch of step ``s`` depends only on ``(seed, s)``. The final weights go to
``out_dir`` in the format of :func:`musicrl.models.generator.save_generator`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from musicrl.audio import codec
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

    @property
    def duration_s(self) -> float:
        return self.model.max_frames / codec.FRAME_RATE

    def fingerprint(self) -> str:
        """What a resumed run must share with the run it continues."""
        keys = asdict(self)
        for volatile in ("out_dir", "work_dir", "checkpoint_every", "eval_every", "threads", "progress", "steps"):
            keys.pop(volatile)
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class CaptionedClips:
    tokens: torch.Tensor  # [N, T] int64
    embeddings: torch.Tensor  # [N, captions_per_clip, text_dim] float32


def load_split(config: GeneratorTrainingConfig, split: str, n: int, captions_per_clip: int) -> CaptionedClips:
    """Corpus clips of ``split`` with their caption embeddings (cached under ``work_dir``)."""
    from musicrl.corpus import make_corpus  # noqa: PLC0415
    from musicrl.text import load_text_encoder  # noqa: PLC0415

    records = make_corpus(n, seed=config.corpus_seed, split=split, duration_s=config.duration_s, n_captions=captions_per_clip)
    tokens = torch.from_numpy(np.stack([r.tokens for r in records]))
    captions = [c for r in records for c in ([r.caption] + r.extra_captions)[:captions_per_clip]]
    key = hashlib.sha256(json.dumps([config.model.text_encoder, captions]).encode()).hexdigest()[:16]
    cache = Path(config.work_dir) / f"embeddings-{split}-{key}.npy"
    if cache.is_file():
        vectors = np.load(cache)
    else:
        encoder = load_text_encoder(config.model.text_encoder)
        chunks = [captions[i : i + 256] for i in range(0, len(captions), 256)]
        vectors = np.concatenate([encoder.embed(chunk) for chunk in tqdm(chunks, desc=f"embedding {split} captions", disable=not config.progress)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    return CaptionedClips(tokens, torch.from_numpy(vectors).view(n, captions_per_clip, -1))


def learning_rate_at(step: int, config: GeneratorTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_learning_rate`` (nanoGPT's schedule)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_learning_rate)


def make_optimizer(model: Generator, config: GeneratorTrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms and the BOS vector)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95))


def next_token_loss(model: Generator, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(cond, tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def batches_at(data: CaptionedClips, step: int, config: GeneratorTrainingConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cond, tokens) of the whole clips and of the clip openings of ``step``; depends only on (seed, step)."""
    rng = np.random.default_rng([config.seed, step])
    batches = []
    for size, frames in ((config.batch_size, data.tokens.shape[1]), (config.start_batch_size, config.start_frames)):
        if size:
            clips = rng.integers(0, data.tokens.shape[0], size)
            phrasings = rng.integers(0, data.embeddings.shape[1], size)
            batches.append((data.embeddings[clips, phrasings], data.tokens[clips, :frames]))
    return batches


def batch_loss(model: Generator, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy over every token of the step's batches."""
    total = sum(next_token_loss(model, cond, tokens) * tokens.numel() for cond, tokens in batches)
    return total / sum(tokens.numel() for _, tokens in batches)


@torch.no_grad()
def validation_loss(model: Generator, data: CaptionedClips, batch_size: int = 50) -> float:
    model.eval()
    losses = [
        float(next_token_loss(model, data.embeddings[i : i + batch_size, 0], data.tokens[i : i + batch_size])) * len(data.tokens[i : i + batch_size])
        for i in range(0, len(data.tokens), batch_size)
    ]
    model.train()
    return sum(losses) / len(data.tokens)


def train_generator(config: GeneratorTrainingConfig, resume: bool = True) -> dict:
    """Train (or continue training) and write the final checkpoint; returns the run's metrics."""
    torch.set_num_threads(config.threads)
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    train = load_split(config, "train", config.n_train, config.captions_per_clip)
    valid = load_split(config, "valid", config.n_valid, 1)

    torch.manual_seed(config.seed)
    model = Generator(config.model)
    if config.init_from is not None:
        initial, _ = load_generator(config.init_from)
        if initial.config != config.model:
            raise ValueError(f"{config.init_from} has another model config than this run: {initial.config}")
        model.load_state_dict(initial.state_dict())
    optimizer = make_optimizer(model, config)
    start_step, fingerprint = 0, config.fingerprint()
    state_path = work_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{state_path} belongs to a run with other settings; pass --no-resume or another work dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]

    def checkpoint(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "fingerprint": fingerprint}, tmp)
        tmp.replace(state_path)  # atomic: a crash mid-write never leaves a broken state

    log = (work_dir / LOG_FILE).open("a")
    model.train()
    recent: list[float] = []
    started = time.perf_counter()
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="generator", disable=not config.progress)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss = batch_loss(model, batches_at(train, step, config))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        recent = (recent + [float(loss.detach())])[-20:]
        progress.set_postfix(loss=f"{np.mean(recent):.3f}")
        done = step + 1
        entry = {"step": done, "train_loss": float(np.mean(recent)), "lr": learning_rate_at(step, config), "elapsed_s": round(time.perf_counter() - started, 1)}
        if done % config.eval_every == 0 or done == config.steps:
            entry["valid_loss"] = validation_loss(model, valid)
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoint(done)
        if "valid_loss" in entry or done % 10 == 0:
            log.write(json.dumps(entry) + "\n")
            log.flush()
    log.close()

    metrics = {
        "steps": config.steps,
        "train_loss": float(np.mean(recent)) if recent else None,
        "valid_loss": validation_loss(model, valid),
        "parameters": model.num_parameters(),
        "train_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    meta = {
        "version": "1",
        "kind": "generator",
        "metrics": metrics,
        "training": json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in ("out_dir", "work_dir", "model", "progress")}, default=str)),
        "codec": {"vocab_size": codec.VOCAB_SIZE, "frame_rate": codec.FRAME_RATE, "sample_rate": codec.SAMPLE_RATE},
    }
    save_generator(model.eval(), config.out_dir, meta)
    return metrics
