"""The default (bootstrap) preference reward model, before any user has voted.

No user preferences exist when the system is first set up, so the committed
default is trained on pairs built from the corpus, encoding two weak priors a
listener is assumed to share:

- ``mismatch``: for a caption, its own clip is preferred to a clip composed for
  another attribute set (the music should follow the prompt);
- ``glitch``: a clip is preferred to the same clip with noise bursts and clicks
  written over a few frames (the music should be clean).

It is initialised from the generator, as in MusicRL. The finetune worker
replaces it with a model trained on the users' votes from the on-policy buffer
(:func:`musicrl.models.preference.train_preference_model`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musicrl.audio import codec
from musicrl.models.generator import load_generator
from musicrl.models.preference import (
    PreferencePair,
    PreferenceRewardModel,
    PreferenceTrainingConfig,
    evaluate_pairs,
    save_preference_model,
    train_preference_model,
)

PAIR_KINDS = ("mismatch", "glitch")


def with_glitches(tokens: np.ndarray, rng: random.Random, n_glitches: int = 4) -> np.ndarray:
    """A copy of ``tokens`` with ``n_glitches`` frames replaced by NOISE or CLICK tokens."""
    damaged = np.array(tokens, dtype=np.int64, copy=True)
    for frame in rng.sample(range(len(damaged)), min(n_glitches, len(damaged))):
        damaged[frame] = rng.choice(codec.GLITCH_TOKENS)
    return damaged


def bootstrap_pairs(n: int, seed: int, split: str, text_encoder, duration_s: float = 10.0) -> list[PreferencePair]:
    """``n`` pairs from corpus ``split``, alternating the two kinds."""
    from musicrl.corpus import make_corpus  # noqa: PLC0415

    records = make_corpus(n + 1, seed=seed, split=split, duration_s=duration_s)
    cond = text_encoder.embed([r.caption for r in records[:n]])
    rng = random.Random(f"bootstrap-pairs:{seed}:{split}")
    pairs = []
    for i in range(n):
        preferred = records[i].tokens
        if PAIR_KINDS[i % 2] == "mismatch":
            other = records[(i + 1 + rng.randrange(n)) % (n + 1)]  # any record but the caption's own
            pairs.append(PreferencePair(cond[i], preferred, other.tokens))
        else:
            pairs.append(PreferencePair(cond[i], preferred, with_glitches(preferred, rng)))
    return pairs


@dataclass
class BootstrapPreferenceConfig:
    generator: Path = Path("checkpoints/generator")
    out_dir: Path = Path("checkpoints/preference")
    n_train: int = 480
    n_heldout: int = 120
    corpus_seed: int = 0
    duration_s: float = 10.0
    training: PreferenceTrainingConfig = field(
        default_factory=lambda: PreferenceTrainingConfig(learning_rate=3e-4, epochs=2)
    )


def train_bootstrap_preference(config: BootstrapPreferenceConfig) -> dict:
    import torch  # noqa: PLC0415

    from musicrl.text import load_text_encoder  # noqa: PLC0415

    torch.set_num_threads(1)
    generator, generator_meta = load_generator(config.generator)
    encoder = load_text_encoder(generator.config.text_encoder)
    train = bootstrap_pairs(config.n_train, config.corpus_seed, "train", encoder, config.duration_s)
    heldout = bootstrap_pairs(config.n_heldout, config.corpus_seed, "test", encoder, config.duration_s)
    model = PreferenceRewardModel.from_generator(generator)
    metrics = train_preference_model(model, train, config.training, heldout=heldout)
    for kind in PAIR_KINDS:
        subset = [p for i, p in enumerate(heldout) if PAIR_KINDS[i % 2] == kind]
        metrics[f"heldout_accuracy_{kind}"] = evaluate_pairs(model, subset, config.training.window_frames)["accuracy"]
    meta = {
        "version": "0",
        "kind": "reward/preference",
        "window_frames": config.training.window_frames,
        "initialised_from": {"kind": "generator", "version": generator_meta.get("version")},
        "data": f"bootstrap corpus pairs ({', '.join(PAIR_KINDS)}), no user votes",
        "metrics": metrics,
    }
    save_preference_model(model, config.out_dir, meta)
    return metrics
