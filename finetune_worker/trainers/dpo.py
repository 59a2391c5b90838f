"""Online DPO on the buffer's preference pairs (Rafailov et al., 2023), same interface as REINFORCE.

No reward model and no rollouts: every pair in the on-policy buffer carries both
clips' tokens and the log-probabilities they had when the served policy sampled
them, and that served policy is the reference. The loss, minimised, is

    L(theta) = -log sigmoid(beta * [(log pi_theta(y_w|x) - log pi_ref(y_w|x))
                                    - (log pi_theta(y_l|x) - log pi_ref(y_l|x))])

with y_w the clip the listener preferred and log pi(y|x) the sum over the clip's
frames under the sampling distribution (temperature, top-k) recorded with the
pair. "Online" because each cycle trains on pairs sampled by the policy being
served, and the next cycle's pairs come from the policy this one produces.
Ties carry no preference and are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune_worker.trainers.base import (
    DistributedContext,
    OnlineTrainer,
    TrainerArgs,
    autocast,
    mark_step,
    rollout_seed,
    unwrap,
    wrap_ddp,
)
from finetune_worker.trainers.reinforce import make_optimizer, token_kl
from musicrl.buffer import clip_codes
from musicrl.device import resolve_device
from musicrl.models.generator import Generator, filter_logits
from musicrl.models.policy import Policy, token_logprobs


@dataclass(kw_only=True)
class DPOConfig(TrainerArgs):
    """Built from ``FinetuneSettings`` by ``finetune_worker.configs``."""

    beta: float
    learning_rate: float
    optimizer: str
    use_stored_logprobs: bool = True  # reference = the log-probs recorded at sampling time (no reference forward pass)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("beta must be > 0")


@dataclass(frozen=True)
class DPOPair:
    prompt: str
    chosen: np.ndarray  # tokens of the preferred clip
    rejected: np.ndarray
    chosen_logprobs: np.ndarray  # per-frame log-probs at sampling time
    rejected_logprobs: np.ndarray
    temperature: float = 0.99
    top_k: int = 0


def pairs_from_buffer(table) -> list[DPOPair]:
    """DPO pairs from buffer rows (a pyarrow table with the ``musicrl.buffer.ROW_SCHEMA`` columns, already chosen by
    ``musicrl.buffer.usable_pair``: ``FinetuneCycle.write_dpo_pairs``); ties dropped.

    Tokens and log-probs are ``[T]`` for one codebook (as always) and ``[K, T]`` for a clip of K > 1 codebooks
    (the flat, codebook-major columns reshaped with ``codebooks_a/b``, ``musicrl.buffer.clip_codes``)."""
    pairs = []
    for row in table.to_pylist():
        if row["choice"] not in ("a", "b"):
            continue
        win, lose = ("a", "b") if row["choice"] == "a" else ("b", "a")

        def clip(column: str, side: str, dtype, row: dict = row) -> np.ndarray:  # called within this iteration only
            values = np.asarray(row[f"{column}_{side}"], dtype=dtype)
            codebooks = int(row.get(f"codebooks_{side}") or 1)
            return values if codebooks == 1 else clip_codes(values, codebooks)

        pairs.append(
            DPOPair(
                prompt=row["prompt"],
                chosen=clip("tokens", win, np.int64),
                rejected=clip("tokens", lose, np.int64),
                chosen_logprobs=clip("logprobs", win, np.float32),
                rejected_logprobs=clip("logprobs", lose, np.float32),
                temperature=float(row["temperature"] or 1.0),
                top_k=int(row["top_k"] or 0),
            )
        )
    return pairs


def _pad(rows: Sequence[np.ndarray], value: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
        mask[i, : len(row)] = True
    return out, mask


class OnlineDPOTrainer(OnlineTrainer):
    """Trains ``model`` (a Generator, or a multi-codebook ``Policy`` such as MusicGen) in place on preference pairs;
    ``ref_model`` (of the same kind) stays frozen.

    For a ``Policy`` the pairs' clips are ``[K, T]`` codes and a clip's log-probability is the sum over its frames
    and codebooks (``Policy.logprobs`` under the pair's temperature and top-k); clips are batched by length, never
    padded (padding would change what MusicGen's delay pattern shows the late codebooks)."""

    def __init__(
        self,
        config: DPOConfig,
        model: Generator,
        ref_model: Generator,
        pairs: Sequence[DPOPair],
        embed: Callable[[list[str]], np.ndarray],
        checkpoint_dir: str | Path | None = None,
        dist_ctx: DistributedContext | None = None,
        candidates_dir: str | Path | None = None,
    ):
        super().__init__(config, checkpoint_dir, dist_ctx, candidates_dir)
        if not pairs:
            raise ValueError("DPO needs at least one non-tie preference pair")
        self.config = config
        self.device = resolve_device(config.device)
        self.policy = wrap_ddp(model.to(self.device), self.dist, self.device)
        self.ref_model = ref_model.to(self.device).eval().requires_grad_(False)
        self.pairs = list(pairs)
        self.embed = embed
        self.optimizer = make_optimizer(config.optimizer, self.policy.parameters(), config.learning_rate)
        self.is_policy = isinstance(model, Policy)

    @property
    def model(self) -> Generator | Policy:
        return unwrap(self.policy)

    def _batch(self, step: int) -> list[DPOPair]:
        rng = np.random.default_rng(rollout_seed(self.config.seed, step, self.dist.rank, 0))
        return [self.pairs[i] for i in rng.integers(0, len(self.pairs), self.config.batch_size)]

    def _sequence_logprobs(self, logits, tokens, mask, temperatures, top_ks) -> torch.Tensor:
        """Sum over frames of log pi(token) under each row's sampling distribution."""
        B, T, V = logits.shape
        flat = filter_logits(
            logits.reshape(B * T, V), temperatures.repeat_interleave(T), top_ks.repeat_interleave(T)
        ).reshape(B, T, V)
        logp = F.log_softmax(flat, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(1)

    def _policy_step(self, batch: list[DPOPair]) -> dict[str, float]:
        """One step for a ``Policy``: clips [K, T], grouped by length."""
        cfg, n = self.config, len(batch)
        clips = [p.chosen for p in batch] + [p.rejected for p in batch]
        stored = [p.chosen_logprobs for p in batch] + [p.rejected_logprobs for p in batch]
        prompts = [p.prompt for p in batch] * 2
        temperatures = [p.temperature for p in batch] * 2
        top_ks = [p.top_k for p in batch] * 2
        groups: dict[tuple, list[int]] = {}
        for i, clip in enumerate(clips):
            groups.setdefault(np.asarray(clip).shape, []).append(i)
        policy = unwrap(self.policy)
        self.policy.train()
        logp: dict[int, torch.Tensor] = {}
        ref_logp, kls, entropies, positions = torch.zeros(2 * n), torch.zeros(2 * n), [], 0
        for rows in groups.values():
            cond = policy.condition([prompts[i] for i in rows])
            tokens = torch.from_numpy(np.stack([np.asarray(clips[i], dtype=np.int64) for i in rows])).to(self.device)
            temps, ks = [temperatures[i] for i in rows], [top_ks[i] for i in rows]
            with autocast(self.device, cfg.mixed_precision):
                logits = self.policy(cond, tokens).float()
                with torch.no_grad():
                    ref_logits = self.ref_model(cond, tokens).float()
            sums = token_logprobs(logits, tokens, temps, ks).sum((1, 2))
            for j, i in enumerate(rows):
                logp[i] = sums[j]
            with torch.no_grad():
                if cfg.use_stored_logprobs:
                    ref = torch.tensor([float(np.sum(stored[i])) for i in rows])
                else:
                    ref = token_logprobs(ref_logits, tokens, temps, ks).sum((1, 2)).cpu()
                ref_logp[rows] = ref
                kls[rows] = token_kl(logits, ref_logits).sum((1, 2)).cpu()
                all_logp = F.log_softmax(logits, dim=-1)
                entropies.append(-(all_logp.exp() * all_logp).sum(-1).sum().cpu())
                positions += tokens.numel()
        ratios = torch.stack([logp[i] for i in range(2 * n)]) - ref_logp.to(self.device)
        return self._update(ratios, n) | {
            "kl": float(kls.mean()),
            "entropy": float(torch.stack(entropies).sum() / positions),
        }

    def _update(self, ratios: torch.Tensor, n: int) -> dict[str, float]:
        """The DPO loss on the log-ratios (pi_theta / pi_ref) of n chosen then n rejected clips, one optimizer
        step on it, and its metrics as TRL names them."""
        cfg = self.config
        chosen_rewards, rejected_rewards = cfg.beta * ratios[:n], cfg.beta * ratios[n:]
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        mark_step(self.device)
        margin = (chosen_rewards - rejected_rewards).detach()
        return {
            "loss": float(loss.detach()),
            "rewards/chosen": float(chosen_rewards.detach().mean()),
            "rewards/rejected": float(rejected_rewards.detach().mean()),
            "rewards/margin": float(margin.mean()),
            "rewards/accuracy": float((margin > 0).float().mean()),
            "grad_norm": float(grad_norm),
        }

    def step(self) -> dict[str, float]:
        cfg = self.config
        batch = self._batch(self.global_step)
        if self.is_policy:
            return self._policy_step(batch)
        n = len(batch)
        cond = torch.from_numpy(np.asarray(self.embed([p.prompt for p in batch]), dtype=np.float32)).to(self.device)
        cond = torch.cat([cond, cond])
        tokens, mask = _pad([p.chosen for p in batch] + [p.rejected for p in batch], 0, torch.long)
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        temperatures = torch.tensor([p.temperature for p in batch] * 2, dtype=torch.float32, device=self.device)
        top_ks = torch.tensor([p.top_k for p in batch] * 2, dtype=torch.long, device=self.device)

        self.policy.train()
        with autocast(self.device, cfg.mixed_precision):
            logits = self.policy(cond, tokens).float()
            with torch.no_grad():
                ref_logits = self.ref_model(cond, tokens).float()
        policy_logp = self._sequence_logprobs(logits, tokens, mask, temperatures, top_ks)
        if cfg.use_stored_logprobs:
            stored, _ = _pad(
                [p.chosen_logprobs for p in batch] + [p.rejected_logprobs for p in batch], 0.0, torch.float32
            )
            ref_logp = (stored.to(self.device) * mask).sum(1)
        else:
            ref_logp = self._sequence_logprobs(ref_logits, tokens, mask, temperatures, top_ks)
        metrics = self._update(policy_logp - ref_logp, n)
        with torch.no_grad():  # the logits before the step, as before
            kl = (token_kl(logits, ref_logits) * mask).sum(1)
            logp_all = F.log_softmax(logits, dim=-1)
            entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum()
        return metrics | {"kl": float(kl.mean()), "entropy": float(entropy)}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
