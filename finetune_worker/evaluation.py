"""Score a policy on held-out prompts with fixed seeds: every reward component and the KL to a reference.

The same prompts and seeds are used for the candidate and for the policy it started
from, so the comparison in the evaluation gate is paired, not two noisy samples.
Either kind of policy (``musicrl.models.policy``) can be evaluated; the reference reuses
the candidate's conditioning, since the text encoder of both is the same frozen one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from finetune_worker.trainers.base import RewardFunction, combine_rewards, reward_input
from finetune_worker.trainers.reinforce import token_kl
from musicrl.models.generator import Generator
from musicrl.models.policy import Policy, as_policy


@torch.no_grad()
def evaluate_policy(
    policy: Generator | Policy,
    reference: Generator | Policy,
    prompts: list[str],
    embed: Callable[[list[str]], np.ndarray] | None,
    reward_fn: RewardFunction,
    weights: dict[str, float],
    n_frames: int,
    temperature: float = 0.99,
    samples_per_prompt: int = 2,
    batch_size: int = 32,
    seed: int = 1234,
) -> dict[str, float]:
    """Means over ``len(prompts) * samples_per_prompt`` clips: ``reward`` (weighted target),
    ``reward/<component>`` for every component returned, ``kl`` (per clip, summed over frames and codebooks).
    ``embed``: the default generator's prompt encoder."""
    if not prompts:
        raise ValueError("evaluation needs at least one held-out prompt")
    policy, reference = as_policy(policy, embed).eval(), as_policy(reference, embed).eval()
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [seed + i for i in range(len(rows))]
    components: dict[str, list[np.ndarray]] = {}
    kls = []
    for start in range(0, len(rows), batch_size):
        batch, batch_seeds = rows[start : start + batch_size], seeds[start : start + batch_size]
        cond = policy.condition(batch)
        tokens, _ = policy.sample(cond, n_frames, temperature, 0, batch_seeds)
        kls.append(token_kl(policy(cond, tokens), reference(cond, tokens)).sum((1, 2)).cpu().numpy())
        for name, values in reward_fn(batch, reward_input(tokens)).items():
            components.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
    merged = {name: np.concatenate(parts) for name, parts in components.items()}
    metrics = {"reward": float(np.mean(combine_rewards(merged, weights))), "kl": float(np.mean(np.concatenate(kls)))}
    metrics.update({f"reward/{name}": float(np.mean(values)) for name, values in merged.items()})
    metrics["n_clips"] = float(len(rows))
    return metrics
