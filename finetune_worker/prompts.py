"""Prompts for rollouts: recent user prompts from the buffer mixed with corpus captions.

User prompts keep the policy on what people actually ask for; corpus captions keep
it covering the whole attribute grammar while the buffer is small. Every prompt is
assigned to train or held-out by a hash of its text (the paper split its captions
90/10), so the evaluation gate never scores prompts the policy was trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def is_heldout(prompt: str, heldout_fraction: float) -> bool:
    digest = hashlib.sha256(f"musicrl-prompt-split:{prompt.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_prompts(prompts: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out), de-duplicated, order kept."""
    unique = list(dict.fromkeys(p for p in prompts if p and p.strip()))
    return [p for p in unique if not is_heldout(p, heldout_fraction)], [
        p for p in unique if is_heldout(p, heldout_fraction)
    ]


@dataclass
class PromptMixer:
    """``(step, rank, batch_size) -> prompts``: a seeded draw, ``user_fraction`` of them from user prompts.

    The draw depends only on (seed, step, rank), so a resumed run sees the prompts the
    killed one would have seen. Without user prompts every prompt is a caption.
    """

    user_prompts: list[str]
    captions: list[str]
    user_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.user_prompts and not self.captions:
            raise ValueError("no prompts: both the user prompts and the corpus captions are empty")
        if not 0.0 <= self.user_fraction <= 1.0:
            raise ValueError("user_fraction must be in [0, 1]")

    def __call__(self, step: int, rank: int, batch_size: int) -> list[str]:
        rng = np.random.default_rng([self.seed, step, rank])
        fraction = self.user_fraction if self.user_prompts else 0.0
        if not self.captions:
            fraction = 1.0
        from_users = rng.random(batch_size) < fraction
        return [
            self.user_prompts[rng.integers(len(self.user_prompts))]
            if user
            else self.captions[rng.integers(len(self.captions))]
            for user in from_users
        ]
