"""KL-regularised REINFORCE with a learned value baseline (MusicRL, section 3.2).

The policy objective, maximised, for a trajectory a_0..a_T with s_t = (a_0..a_{t-1}):

    J(theta) = (1 - alpha) * sum_t log pi_theta(a_t|s_t) * (sum_{i>=t} r(s_i) - V_phi(s_t))
               - alpha * sum_t KL(pi_theta(.|s_t) || pi_theta0(.|s_t))

and the baseline, minimised:

    L(phi) = sum_t (sum_{k>=t} r(s_k) - V_phi(s_t))^2

The reward is sequence-level and given at the last token, so the return
sum_{i>=t} r(s_i) is the clip's reward R for every t. The KL is exact (a sum over
the whole codebook at every step), as the paper writes it, not a sampled estimate.
pi_theta0 is the reference policy: the starting checkpoint for the R and U stages,
the R policy for RU. Both the policy and the value model start from the initial
checkpoint; the value model is the generator trunk with a scalar head.

Rollouts are sampled from the policy itself at the serving temperature and scored
in one batch per step by the reward function (the reward service over HTTP in
production). Under ``torchrun`` every process samples its own rollouts and DDP
averages the gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune_worker.trainers.base import (
    DistributedContext,
    OnlineTrainer,
    RewardFunction,
    TrainerArgs,
    autocast,
    combine_rewards,
    mark_step,
    rollout_seed,
    unwrap,
    wrap_ddp,
)
from musicrl.device import resolve_device
from musicrl.models.generator import Generator

# Reward stages of the paper as reward weights over the reward service's components.
STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "R": {"text_adherence": 1.0, "quality": 1.0},  # MuLan-like + quality normalised to 0..1
    "U": {"preference": 1.0},
    "RU": {"preference": 1.0},  # U reward, KL against the R policy (the caller passes it as ref_model)
}


@dataclass
class ReinforceConfig(TrainerArgs):
    """Defaults are the paper's (alpha, learning rates, Adafactor, temperature 0.99)."""

    stage: str = "R"
    reward_weights: dict[str, float] | None = None  # None: the stage's weights
    alpha: float = 0.001  # KL regularisation strength
    policy_lr: float = 1e-5
    value_lr: float = 1e-4
    optimizer: str = "adafactor"  # or "adamw"
    temperature: float = 0.99
    n_frames: int = 80  # clip length of a rollout in token frames (10 s at 8 frames/s)
    # Divide the advantages by their batch standard deviation (as PPO implementations do): a Bradley-Terry
    # model's scale is arbitrary and changes every time it is retrained, and without this the policy's step
    # size and the weight of the KL term against the reward would change with it.
    normalize_advantages: bool = False
    extra_metrics: list[str] = field(default_factory=lambda: ["text_adherence", "quality", "preference"])

    def __post_init__(self) -> None:
        if self.stage not in STAGE_WEIGHTS:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {sorted(STAGE_WEIGHTS)}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError("alpha must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.reward_weights or STAGE_WEIGHTS[self.stage])


class ValueModel(nn.Module):
    """V_phi(s_t): the generator trunk (initialised from the policy's weights) and a scalar head."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.trunk = copy.deepcopy(generator)
        self.head = nn.Linear(generator.config.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # hidden()[:, t] has seen the caption and tokens[:, :t], i.e. exactly s_t.
        return self.head(self.trunk.hidden(cond, tokens)).squeeze(-1)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adafactor' or 'adamw'")


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi(.|s_t) || pi_0(.|s_t)) per position [B, T], summed over the whole codebook."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


class ReinforceTrainer(OnlineTrainer):
    """Trains ``model`` (a Generator) in place; ``ref_model`` stays frozen."""

    def __init__(
        self,
        config: ReinforceConfig,
        model: Generator,
        ref_model: Generator,
        reward_fn: RewardFunction,
        prompts: Callable[[int, int, int], list[str]],
        embed: Callable[[list[str]], np.ndarray],
        checkpoint_dir: str | Path | None = None,
        dist_ctx: DistributedContext | None = None,
    ):
        super().__init__(config, checkpoint_dir, dist_ctx)
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.policy = wrap_ddp(model.to(self.device), self.dist, self.device)
        self.value = wrap_ddp(ValueModel(model).to(self.device), self.dist, self.device)
        self.ref_model = ref_model.to(self.device).eval().requires_grad_(False)
        self.reward_fn = reward_fn
        self.prompts = prompts  # (step, rank, batch_size) -> prompts: deterministic, so resume is exact
        self.embed = embed
        self.policy_optimizer = make_optimizer(config.optimizer, self.policy.parameters(), config.policy_lr)
        self.value_optimizer = make_optimizer(config.optimizer, self.value.parameters(), config.value_lr)

    @property
    def model(self) -> Generator:
        return unwrap(self.policy)

    def rollout(self, step: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Sample one batch from the current policy; returns prompts, cond and tokens."""
        cfg = self.config
        prompts = self.prompts(step, self.dist.rank, cfg.batch_size)
        cond = torch.from_numpy(np.asarray(self.embed(prompts), dtype=np.float32)).to(self.device)
        seeds = [rollout_seed(cfg.seed, step, self.dist.rank, i) for i in range(len(prompts))]
        self.model.eval()
        tokens, _ = self.model.sample(cond, cfg.n_frames, cfg.temperature, 0, seeds)
        return prompts, cond, tokens.clone()  # out of inference mode, so autograd may use it

    def step(self) -> dict[str, float]:
        cfg = self.config
        prompts, cond, tokens = self.rollout(self.global_step)
        components = self.reward_fn(prompts, tokens.cpu().numpy())
        reward = torch.as_tensor(combine_rewards(components, cfg.weights), dtype=torch.float32, device=self.device)

        self.policy.train()
        self.value.train()
        with autocast(self.device, cfg.mixed_precision):
            logits = self.policy(cond, tokens)
            with torch.no_grad():
                ref_logits = self.ref_model(cond, tokens)
            values = self.value(cond, tokens).float()
        # The sampling distribution is the temperature-scaled policy; the KL compares the models themselves.
        logprobs = F.log_softmax(logits.float() / cfg.temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        kl = token_kl(logits, ref_logits)  # [B, T]
        returns = reward.unsqueeze(1).expand_as(logprobs)  # sequence reward at the last token: sum_{i>=t} r_i = R
        advantages = (returns - values).detach()
        if cfg.normalize_advantages and advantages.shape[0] > 1:
            advantages = advantages / (advantages.std() + 1e-6)

        objective = (1 - cfg.alpha) * (logprobs * advantages).sum(1) - cfg.alpha * kl.sum(1)
        policy_loss = -objective.mean()
        value_loss = ((returns - values) ** 2).sum(1).mean()

        self.policy_optimizer.zero_grad(set_to_none=True)
        self.value_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward()
        value_loss.backward()
        policy_grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        torch.nn.utils.clip_grad_norm_(self.value.parameters(), cfg.max_grad_norm)
        self.policy_optimizer.step()
        self.value_optimizer.step()
        mark_step(self.device)

        with torch.no_grad():
            logp_all = F.log_softmax(logits.float(), dim=-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        metrics = {
            "reward": float(reward.mean()),
            "kl": float(kl.detach().sum(1).mean()),
            "kl_per_token": float(kl.detach().mean()),
            "policy_loss": float(policy_loss.detach()),
            "value_loss": float(value_loss.detach()),
            "value": float(values.detach().mean()),
            "entropy": float(entropy),
            "advantage": float(advantages.mean()),
            "grad_norm": float(policy_grad_norm),
        }
        for name in cfg.extra_metrics:
            if name in components:
                metrics[f"reward/{name}"] = float(np.mean(components[name]))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.model.state_dict(),
            "value": unwrap(self.value).state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["policy"])
        unwrap(self.value).load_state_dict(state["value"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
