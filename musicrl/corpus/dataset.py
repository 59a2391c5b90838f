"""`make_corpus`: seeded, any size, with held-out splits disjoint in attribute sets."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from musicrl.audio import codec
from musicrl.corpus.attributes import COUNTERFACTUAL_ATTRIBUTES, Attributes, change_attribute, sample_attributes
from musicrl.corpus.captions import caption
from musicrl.corpus.composer import compose

# Cumulative share of attribute-set hashes per split.
SPLITS = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}


@dataclass
class Record:
    caption: str
    attributes: dict
    tokens: np.ndarray  # int64, one per frame
    split: str
    seed: int
    index: int
    glitches: int = 0  # glitch frames inserted (hidden from the caption)
    extra_captions: list[str] = field(default_factory=list)

    def render(self) -> np.ndarray:
        return codec.decode(self.tokens)

    def to_dict(self) -> dict:
        return {
            "caption": self.caption,
            "attributes": self.attributes,
            "tokens": self.tokens.tolist(),
            "split": self.split,
            "seed": self.seed,
            "index": self.index,
            "glitches": self.glitches,
        }


def split_of(attributes: Attributes) -> str:
    u = attributes.split_hash()
    return next(name for name, (low, high) in SPLITS.items() if low <= u < high)


def _draw_music(
    index: int, seed: int, split: str, duration_s: float
) -> tuple[random.Random, Attributes, list[int], int]:
    """The attribute set and tokens of record `index`, and its generator in the state its captions start from."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    rng = random.Random(f"musicrl-corpus:{seed}:{split}:{index}")
    while True:  # rejection sampling keeps every attribute set in exactly one split
        attributes = sample_attributes(rng)
        if split_of(attributes) == split:
            break
    tokens, glitches = compose(attributes, codec.frames_for(duration_s), rng)
    return rng, attributes, tokens, glitches


def make_record(
    index: int, seed: int = 0, split: str = "train", duration_s: float = 10.0, n_captions: int = 1
) -> Record:
    """Record `index` of (seed, split): the same arguments always give the same record."""
    rng, attributes, tokens, glitches = _draw_music(index, seed, split, duration_s)
    captions = [caption(attributes, rng) for _ in range(max(1, n_captions))]
    return Record(
        caption=captions[0],
        attributes=attributes.to_dict(),
        tokens=np.asarray(tokens, dtype=np.int64),
        split=split,
        seed=seed,
        index=index,
        glitches=glitches,
        extra_captions=captions[1:],
    )


def make_corpus(
    n: int, seed: int = 0, split: str = "train", duration_s: float = 10.0, n_captions: int = 1, start: int = 0
) -> list[Record]:
    """`n` records (indices start..start+n-1) of the split; deterministic in (seed, split, index)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_record(i, seed, split, duration_s, n_captions) for i in range(start, start + n)]


def counterfactual_captions(
    index: int,
    seed: int = 0,
    split: str = "train",
    duration_s: float = 10.0,
    n_captions: int = 1,
    attributes: tuple[str, ...] = COUNTERFACTUAL_ATTRIBUTES,
) -> tuple[dict[str, Attributes], list[dict[str, str]]]:
    """Record `index` with one attribute changed: the changed attribute sets, and each caption rephrased for them.

    The arguments are those of the record's `make_record` call (the duration too: composing
    draws from the generator the captions are phrased with). ``captions[k][name]`` is the
    record's caption k with attribute ``name`` (one of ``COUNTERFACTUAL_ATTRIBUTES``) changed
    to ``changed[name]``, every other word kept: a caption the record's music does not fit.
    The generator is trained to find its clip less likely under it (``musicrl.models.train_generator``).
    """
    rng, original, _, _ = _draw_music(index, seed, split, duration_s)
    changed_rng = random.Random(f"musicrl-counterfactual:{seed}:{split}:{index}")
    changed = {name: change_attribute(original, name, changed_rng) for name in attributes}
    captions = []
    for _ in range(max(1, n_captions)):
        state = rng.getstate()
        caption(original, rng)  # advances rng exactly as make_record does
        captions.append({name: caption(variant, _replayed(state)) for name, variant in changed.items()})
    return changed, captions


def _replayed(state) -> random.Random:
    rng = random.Random()
    rng.setstate(state)
    return rng
