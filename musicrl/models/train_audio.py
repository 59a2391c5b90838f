"""Training of the default text-adherence and quality models from the procedural corpus.

Both trainers are seeded and resumable: the full training state (weights,
optimizer, step, sampler state) is saved to `work_dir` every
`checkpoint_every` steps and picked up again by the same command. Rendered
log-mels and caption embeddings are cached under `cache_dir` (gitignored).

- `ContrastiveTrainer`: InfoNCE between the audio embedding and the frozen
  caption embedding, with CLIP's learnable temperature:
  loss = (CE(s * A T^T, I) + CE(s * T A^T, I)) / 2.
- `MosTrainer`: mean squared error between the predicted MOS and the label
  MOS = 1 + 4 * prod(1 - strength) of the degradations applied.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from musicrl.audio import codec
from musicrl.audio.degrade import DEGRADATIONS, DEGRADATIONS_VERSION, mos_of, render_degraded
from musicrl.audio.features import log_mel
from musicrl.checkpoint import load_torch, save_torch_atomic
from musicrl.corpus import make_corpus
from musicrl.models.audio_encoder import AudioEncoderConfig, AudioTextEncoder
from musicrl.models.audio_export import write_checkpoint
from musicrl.models.quality import MosRegressor

DEFAULT_CACHE = Path(".data/audio_cache")


# ---------------------------------------------------------------- data


def _cache_path(cache_dir: Path, kind: str, **key) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{kind}-{digest}.npz"


def clean_mels(records, desc: str = "render") -> np.ndarray:
    """float16 (N, n_mels, frames) log-mels of the clean renders."""
    return np.stack([log_mel(r.render()).astype(np.float16) for r in tqdm(records, desc=desc, leave=False)])


def sample_degradations(rng: np.random.Generator) -> dict[str, float]:
    """20 % clean, 50 % one degradation, 30 % two, strengths uniform in [0, 1]."""
    u = rng.random()
    count = 0 if u < 0.2 else 1 if u < 0.7 else 2
    names = rng.choice(DEGRADATIONS, size=count, replace=False)
    return {str(name): float(rng.random()) for name in names}


def text_adherence_data(n: int, seed: int, split: str, n_captions: int, text_encoder: str, cache_dir: Path) -> dict:
    """Mels, caption embeddings (N, n_captions, dim) and captions of `n` corpus records, cached."""
    path = _cache_path(
        cache_dir, "text", n=n, seed=seed, split=split, n_captions=n_captions, enc=text_encoder, vocab=codec.VOCAB_SIZE
    )
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return {k: data[k] for k in data.files}
    from musicrl.text import load_text_encoder

    records = make_corpus(n, seed=seed, split=split, n_captions=n_captions)
    captions = [[r.caption, *r.extra_captions] for r in records]
    encoder = load_text_encoder(text_encoder)
    flat = [c for group in captions for c in group]
    embeddings = np.concatenate(
        [encoder.embed(flat[i : i + 256]) for i in tqdm(range(0, len(flat), 256), desc=f"embed {split}", leave=False)]
    )
    data = {
        "mels": clean_mels(records, f"render {split}"),
        "text": embeddings.reshape(n, n_captions, -1).astype(np.float32),
        "captions": np.array(captions),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def quality_data(n: int, seed: int, split: str, renders_per_record: int, cache_dir: Path) -> dict:
    """Mels and MOS labels of degraded renders, with the degradations applied (JSON per row)."""
    path = _cache_path(
        cache_dir,
        "quality",
        n=n,
        seed=seed,
        split=split,
        renders=renders_per_record,
        degradations=DEGRADATIONS,
        version=DEGRADATIONS_VERSION,
    )
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return {k: data[k] for k in data.files}
    records = make_corpus(n, seed=seed, split=split)
    rng = np.random.default_rng([seed, 7])
    mels, mos, specs = [], [], []
    for record in tqdm(records, desc=f"degrade {split}", leave=False):
        for _ in range(renders_per_record):
            strengths = sample_degradations(rng)
            mels.append(log_mel(render_degraded(record.tokens, strengths, rng)).astype(np.float16))
            mos.append(mos_of(strengths))
            specs.append(json.dumps(strengths))
    data = {"mels": np.stack(mels), "mos": np.array(mos, dtype=np.float32), "degradations": np.array(specs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def random_crop(mels: np.ndarray, frames: int, generator: torch.Generator) -> torch.Tensor:
    batch = torch.from_numpy(mels.astype(np.float32))
    if batch.shape[-1] <= frames:
        return batch
    start = int(torch.randint(0, batch.shape[-1] - frames + 1, (1,), generator=generator))
    return batch[..., start : start + frames]


# ---------------------------------------------------------------- trainers


@dataclass
class TextAdherenceTrainingConfig:
    n_train: int = 3000
    n_valid: int = 200
    n_captions: int = 3
    text_encoder: str = "minilm"
    seed: int = 0
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    crop_frames: int = 400  # 8 s crops of the 10 s clips
    checkpoint_every: int = 100
    eval_every: int = 200
    threads: int = 1


@dataclass
class QualityTrainingConfig:
    n_train: int = 1500
    n_valid: int = 150
    renders_per_record: int = 2
    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    crop_frames: int = 400
    checkpoint_every: int = 100
    eval_every: int = 200
    threads: int = 1


class _ResumableTrainer:
    """Shared loop: seeded sampling, AdamW with cosine decay, periodic state saves, resume."""

    name = ""

    def __init__(self, config, model: torch.nn.Module, work_dir: Path, out_dir: Path) -> None:
        self.config, self.model = config, model
        self.work_dir, self.out_dir = Path(work_dir), Path(out_dir)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.05
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history: list[dict] = []

    @property
    def state_path(self) -> Path:
        return self.work_dir / f"{self.name}-state.pt"

    def _save_state(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "history": self.history,
            "config": asdict(self.config),
        }
        save_torch_atomic(state, self.state_path)

    def _resume(self) -> None:
        if not self.state_path.is_file():
            return
        state = load_torch(self.state_path)
        if state["config"] != asdict(self.config):
            raise ValueError(f"{self.state_path} was written with another configuration; delete it to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout masks continue where they stopped
        self.step, self.history = state["step"], state["history"]

    def batch_loss(self) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def validate(self) -> dict:
        raise NotImplementedError

    def train(self, stop_at: int | None = None) -> dict:
        """Train to `config.steps` (or pause at `stop_at`), resuming from the saved state if any."""
        torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        self._resume()
        progress = tqdm(total=self.config.steps, initial=self.step, desc=f"train {self.name}")
        start = time.perf_counter()
        end = min(self.config.steps, stop_at or self.config.steps)
        while self.step < end:
            self.model.train()
            loss, logs = self.batch_loss()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            progress.update(1)
            progress.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                self.history.append({"step": self.step, **logs, **self.validate()})
                progress.write(json.dumps(self.history[-1]))
            if self.step % self.config.checkpoint_every == 0 or self.step in (self.config.steps, end):
                self._save_state()
        progress.close()
        return {
            "steps": self.step,
            "train_seconds_this_run": round(time.perf_counter() - start, 1),
            **(self.history[-1] if self.history else {}),
        }


class ContrastiveTrainer(_ResumableTrainer):
    """The MuLan/CLAP-style audio tower against frozen caption embeddings."""

    name = "text_adherence"

    def __init__(
        self,
        config: TextAdherenceTrainingConfig,
        work_dir: Path,
        out_dir: Path,
        cache_dir: Path = DEFAULT_CACHE,
        model_config: AudioEncoderConfig | None = None,
    ) -> None:
        torch.manual_seed(config.seed)
        super().__init__(config, AudioTextEncoder(model_config or AudioEncoderConfig()), work_dir, out_dir)
        self.train_data = text_adherence_data(
            config.n_train, config.seed, "train", config.n_captions, config.text_encoder, cache_dir
        )
        self.valid_data = text_adherence_data(config.n_valid, config.seed, "valid", 1, config.text_encoder, cache_dir)

    def batch_loss(self):
        c = self.config
        index = torch.randint(0, c.n_train, (c.batch_size,), generator=self.generator)
        which = torch.randint(0, c.n_captions, (c.batch_size,), generator=self.generator)
        mels = random_crop(self.train_data["mels"][index.numpy()], c.crop_frames, self.generator)
        text = torch.from_numpy(self.train_data["text"][index.numpy(), which.numpy()])
        audio = self.model(mels)
        scale = self.model.logit_scale.clamp(max=np.log(100.0)).exp()
        logits = scale * audio @ text.T
        target = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, {"loss": loss.item(), "temperature": 1.0 / scale.item()}

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        audio = self.model(torch.from_numpy(self.valid_data["mels"].astype(np.float32))).numpy()
        return {f"valid/{k}": v for k, v in retrieval_metrics(audio, self.valid_data["text"][:, 0]).items()}

    def save(self, metrics: dict, command: str) -> Path:
        self.model.eval()
        return write_checkpoint(
            self.model,
            self.out_dir,
            kind="text_adherence",
            output="embedding",
            training=asdict(self.config),
            metrics=metrics,
            command=command,
        )


class MosTrainer(_ResumableTrainer):
    name = "quality"

    def __init__(
        self,
        config: QualityTrainingConfig,
        work_dir: Path,
        out_dir: Path,
        cache_dir: Path = DEFAULT_CACHE,
        model_config: AudioEncoderConfig | None = None,
    ) -> None:
        torch.manual_seed(config.seed)
        super().__init__(config, MosRegressor(model_config or AudioEncoderConfig()), work_dir, out_dir)
        self.train_data = quality_data(config.n_train, config.seed, "train", config.renders_per_record, cache_dir)
        self.valid_data = quality_data(config.n_valid, config.seed, "valid", 1, cache_dir)

    def batch_loss(self):
        c = self.config
        index = torch.randint(0, len(self.train_data["mos"]), (c.batch_size,), generator=self.generator)
        mels = random_crop(self.train_data["mels"][index.numpy()], c.crop_frames, self.generator)
        target = torch.from_numpy(self.train_data["mos"][index.numpy()])
        loss = F.mse_loss(self.model(mels), target)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self) -> dict:
        from scipy.stats import spearmanr

        self.model.eval()
        predicted = self.model(torch.from_numpy(self.valid_data["mels"].astype(np.float32))).numpy()
        target = self.valid_data["mos"]
        return {
            "valid/mae": float(np.mean(np.abs(predicted - target))),
            "valid/spearman": float(spearmanr(predicted, target).statistic),
        }

    def save(self, metrics: dict, command: str) -> Path:
        self.model.eval()
        return write_checkpoint(
            self.model,
            self.out_dir,
            kind="quality",
            output="mos",
            training=asdict(self.config),
            metrics=metrics,
            command=command,
        )


def retrieval_metrics(audio: np.ndarray, text: np.ndarray) -> dict:
    """Caption retrieval from audio: rank of each clip's own caption among all captions."""
    similarity = audio @ text.T
    own = np.diag(similarity)
    rank = (similarity > own[:, None]).sum(axis=1)
    n = len(audio)
    return {
        "top1": float(np.mean(rank < 1)),
        "top5": float(np.mean(rank < 5)),
        "n": n,
        "chance_top1": 1.0 / n,
        "chance_top5": min(1.0, 5.0 / n),
    }
