"""KL-regularised REINFORCE (MusicRL, section 3.2) kept inside a per-cycle KL budget.

The policy objective, maximised over rollouts a_0..a_T of a prompt x:

    J(theta) = (1 - alpha) * sum_t log pi_theta(a_t|s_t) * A(x, a)
               - alpha * sum_t KL(pi_theta(.|s_t) || pi_theta0(.|s_t))

as the paper writes it, with three changes that keep one cycle from overshooting
(docs/finetune.md says why each is there):

- **Group baseline (RLOO, Ahmadian et al. 2024).** Each prompt is sampled
  ``group_size`` times; a rollout's advantage is its reward minus the mean reward of
  the same prompt's other rollouts, divided by the batch's standard deviation. This
  replaces the paper's learned value baseline: it is unbiased, needs no second model,
  and does not depend on the reward model's scale, which changes every time it is retrained.
- **Adaptive KL coefficient and early stop (Ziegler et al. 2019).** pi_theta0 is the
  policy the cycle started from. After every step ``alpha`` is multiplied by
  ``1 + gain * clip(KL / target_t - 1, -0.5, 0.5)``, with ``target_t`` rising linearly to
  ``kl_target`` at the last step; training stops at the first step whose rollouts are
  more than ``kl_budget`` nats per clip from pi_theta0.
- **The other rewards are constraints (Lagrangian relaxation).** The gate refuses a
  candidate whose text adherence or quality fell, so the trainer maximises the target
  reward subject to ``E[c] >= c_start - slack`` for each such component c: the advantage
  is ``(A_target + sum_c lambda_c A_c) / (1 + sum_c lambda_c)`` and each multiplier rises
  while its constraint is violated (dual ascent) and falls back to zero when it is not.

The KL is exact (a sum over the whole codebook at every step), not a sampled
estimate. Rollouts are sampled from the policy itself at the serving temperature and
scored in one batch per step by the reward function (the reward service over HTTP in
production). Under ``torchrun`` every process samples its own rollouts, DDP averages
the gradients and the controller acts on metrics averaged over processes.

The policy is anything behind ``musicrl.models.policy.Policy`` (the default generator,
given as a ``Generator``, or MusicGen): tokens are [B, K, T] and a clip's log-probability
and KL are sums over its frames and codebooks, so "per clip" means the same for both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune_worker.trainers.base import (
    DistributedContext,
    OnlineTrainer,
    RewardFunction,
    TrainerArgs,
    autocast,
    combine_rewards,
    mark_step,
    reward_input,
    rollout_seed,
    unwrap,
    wrap_ddp,
)
from musicrl.device import resolve_device
from musicrl.models.generator import Generator
from musicrl.models.policy import Policy, as_policy, token_logprobs

# Reward stages of the paper as reward weights over the reward service's components.
STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "R": {"text_adherence": 1.0, "quality": 1.0},  # MuLan-like + quality normalised to 0..1
    "U": {"preference": 1.0},
    "RU": {"preference": 1.0},  # U reward; the gate bounds the drift from the R policy
}
# Components the gate protects (no_collapse); those a stage does not optimise are its constraints.
PROTECTED = ("text_adherence", "quality", "preference")


def constraints_of(stage: str) -> tuple[str, ...]:
    return tuple(c for c in PROTECTED if c not in STAGE_WEIGHTS[stage])


@dataclass(kw_only=True)
class ReinforceConfig(TrainerArgs):
    """Built from ``FinetuneSettings`` by ``finetune_worker.configs``; no defaults of its own."""

    stage: str
    alpha: float  # initial KL coefficient; adapted by the controller
    kl_target: float  # nats per clip to the starting policy, reached by the last step
    kl_budget: float  # early stop, nats per clip
    kl_gain: float
    group_size: int  # rollouts per prompt
    constraint_slack: float
    lagrange_lr: float
    policy_lr: float
    optimizer: str  # "adafactor" or "adamw"
    temperature: float
    n_frames: int  # clip length of a rollout in token frames
    extra_metrics: list[str] = field(default_factory=lambda: ["text_adherence", "quality", "preference"])

    def __post_init__(self) -> None:
        if self.stage not in STAGE_WEIGHTS:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {sorted(STAGE_WEIGHTS)}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.group_size < 2 or self.batch_size % self.group_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size}) >= 2"
            )
        if not 0 < self.kl_target < self.kl_budget:
            raise ValueError("need 0 < kl_target < kl_budget")

    @property
    def weights(self) -> dict[str, float]:
        return dict(STAGE_WEIGHTS[self.stage])


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adafactor' or 'adamw'")


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi(.|s_t) || pi_0(.|s_t)) per position ([B, T] or [B, K, T]), summed over the whole vocabulary."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def leave_one_out(values: np.ndarray, group_size: int) -> np.ndarray:
    """Each value minus the mean of the other values of its group (consecutive rows of ``group_size``)."""
    groups = np.asarray(values, dtype=np.float64).reshape(-1, group_size)
    others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def standardized(values: np.ndarray) -> np.ndarray:
    return values / (values.std() + 1e-8)


class KLController:
    """Adaptive KL coefficient (Ziegler et al. 2019) toward a target that rises linearly over the cycle."""

    def __init__(self, alpha: float, target: float, steps: int, gain: float):
        self.alpha, self.target, self.steps, self.gain = alpha, target, steps, gain

    def target_at(self, step: int) -> float:
        return self.target * min(1.0, step / self.steps)

    def update(self, kl: float, step: int) -> float:
        error = float(np.clip(kl / max(self.target_at(step), 1e-6) - 1.0, -0.5, 0.5))
        self.alpha = float(np.clip(self.alpha * (1.0 + self.gain * error), 1e-4, 0.9))
        return self.alpha


class Constraints:
    """Lagrange multipliers for ``E[c] >= start_c - slack``, updated by dual ascent on a smoothed estimate.

    A batch of 16 clips measures a component's mean to a few hundredths, as much as the slack, so the
    starting level is the mean of the first ``warmup`` batches (the policy has barely moved yet) and the
    current level an exponential average over about three batches; multipliers stay at zero during warm-up.
    """

    def __init__(self, names: tuple[str, ...], slack: float, lr: float, warmup: int = 3, smoothing: float = 0.6):
        self.names, self.slack, self.lr, self.warmup, self.smoothing = names, slack, lr, warmup, smoothing
        self.multipliers = dict.fromkeys(names, 0.0)
        self.start: dict[str, float] = {}  # the starting policy's level
        self.scale: dict[str, float] = {}  # the spread over clips: violations are measured in these units
        self.level: dict[str, float] = {}  # exponential average of the batch means
        self.seen = 0

    def update(self, means: dict[str, float], stds: dict[str, float]) -> None:
        self.seen += 1
        for name in self.names:
            if name not in means:
                continue
            if self.seen <= self.warmup:
                weight = 1.0 / self.seen
                self.start[name] = (1 - weight) * self.start.get(name, 0.0) + weight * means[name]
                self.scale[name] = (1 - weight) * self.scale.get(name, 0.0) + weight * max(stds[name], 1e-6)
                self.level[name] = self.start[name]
                continue
            self.level[name] = self.smoothing * self.level[name] + (1 - self.smoothing) * means[name]
            violation = (self.start[name] - self.slack - self.level[name]) / self.scale[name]
            self.multipliers[name] = max(0.0, self.multipliers[name] + self.lr * violation)

    def state_dict(self) -> dict[str, Any]:
        return {
            "multipliers": self.multipliers,
            "start": self.start,
            "scale": self.scale,
            "level": self.level,
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("multipliers", "start", "scale", "level"):
            setattr(self, key, dict(state[key]))
        self.seen = int(state["seen"])


class ReinforceTrainer(OnlineTrainer):
    """Trains ``model`` (a Generator or any Policy) in place; a frozen copy of its starting weights is pi_theta0.

    ``embed`` is the default generator's prompt encoder (a Policy such as MusicGen conditions itself)."""

    def __init__(
        self,
        config: ReinforceConfig,
        model: Generator | Policy,
        reward_fn: RewardFunction,
        prompts: Callable[[int, int, int], list[str]],
        embed: Callable[[list[str]], np.ndarray] | None,
        checkpoint_dir: str | Path | None = None,
        dist_ctx: DistributedContext | None = None,
        candidates_dir: str | Path | None = None,
    ):
        super().__init__(config, checkpoint_dir, dist_ctx, candidates_dir)
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self._model = model
        # the copy is of the model, not of its wrapper: the prompt encoder is shared, never copied
        self.start_model = as_policy(copy.deepcopy(model), embed).to(self.device).eval().requires_grad_(False)
        self.policy = wrap_ddp(as_policy(model, embed).to(self.device), self.dist, self.device)
        self.reward_fn = reward_fn
        self.prompts = prompts  # (step, rank, n_prompts) -> prompts: deterministic, so resume is exact
        self.policy_optimizer = make_optimizer(config.optimizer, self.policy.parameters(), config.policy_lr)
        self.kl_control = KLController(config.alpha, config.kl_target, config.steps, config.kl_gain)
        self.constraints = Constraints(constraints_of(config.stage), config.constraint_slack, config.lagrange_lr)

    @property
    def model(self) -> Generator | Policy:
        """The model as it was handed over (trained in place): what is saved and checkpointed."""
        return self._model

    def rollout(self, step: int) -> tuple[list[str], Any, torch.Tensor]:
        """``batch_size`` rollouts: ``group_size`` consecutive ones per prompt, each with its own seed.
        Returns the prompts, their conditioning and the tokens [B, K, T]."""
        cfg = self.config
        prompts = [
            p
            for p in self.prompts(step, self.dist.rank, cfg.batch_size // cfg.group_size)
            for _ in range(cfg.group_size)
        ]
        policy = unwrap(self.policy)
        cond = policy.condition(prompts)
        seeds = [rollout_seed(cfg.seed, step, self.dist.rank, i) for i in range(len(prompts))]
        policy.eval()
        tokens, _ = policy.sample(cond, cfg.n_frames, cfg.temperature, 0, seeds)
        return prompts, cond, tokens.clone()  # out of inference mode, so autograd may use it

    def advantages(self, reward: np.ndarray, components: dict[str, np.ndarray]) -> np.ndarray:
        """(A_target + sum_c lambda_c A_c) / (1 + sum_c lambda_c), every A a standardised leave-one-out advantage;
        ``reward`` is the target reward (``combine_rewards`` of the stage's components)."""
        group = self.config.group_size
        total = standardized(leave_one_out(reward, group))
        weight = 1.0
        for name, multiplier in self.constraints.multipliers.items():
            if multiplier > 0 and name in components:
                total = total + multiplier * standardized(leave_one_out(components[name], group))
                weight += multiplier
        return total / weight

    def step(self) -> dict[str, float]:
        cfg = self.config
        prompts, cond, tokens = self.rollout(self.global_step)
        components = self.reward_fn(prompts, reward_input(tokens))
        reward = combine_rewards(components, cfg.weights)
        advantages = torch.as_tensor(self.advantages(reward, components), dtype=torch.float32, device=self.device)

        self.policy.train()
        with autocast(self.device, cfg.mixed_precision):
            logits = self.policy(cond, tokens)
            with torch.no_grad():
                start_logits = self.start_model(cond, tokens)
        # The sampling distribution is the temperature-scaled policy; the KL compares the models themselves.
        logprobs = token_logprobs(logits.float(), tokens, cfg.temperature)  # [B, K, T]
        kl = token_kl(logits, start_logits)  # [B, K, T]
        alpha = self.kl_control.alpha
        objective = (1 - alpha) * (logprobs.sum((1, 2)) * advantages) - alpha * kl.sum((1, 2))
        policy_loss = -objective.mean()

        self.policy_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.policy_optimizer.step()
        mark_step(self.device)

        with torch.no_grad():
            logp_all = F.log_softmax(logits.float(), dim=-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        metrics = {
            "reward": float(np.mean(reward)),
            "kl": float(kl.detach().sum((1, 2)).mean()),  # of the policy that sampled this batch, to pi_theta0
            "kl_per_token": float(kl.detach().mean()),
            "kl_target": self.kl_control.target_at(self.global_step),
            "kl_budget": cfg.kl_budget,
            "alpha": alpha,
            "policy_loss": float(policy_loss.detach()),
            "entropy": float(entropy),
            "advantage_std": float(advantages.std()),
            "grad_norm": float(grad_norm),
        }
        for name in cfg.extra_metrics:
            if name in components:
                metrics[f"reward/{name}"] = float(np.mean(components[name]))
                metrics[f"reward_std/{name}"] = float(np.std(components[name]))
        for name, multiplier in self.constraints.multipliers.items():
            metrics[f"lambda/{name}"] = multiplier
        return metrics

    def on_step_end(self, metrics: dict[str, float]) -> bool:
        """Controller and multipliers act on the (process-averaged) metrics; True stops training."""
        means = {n: metrics[f"reward/{n}"] for n in self.constraints.names if f"reward/{n}" in metrics}
        stds = {n: metrics[f"reward_std/{n}"] for n in means}
        self.constraints.update(means, stds)
        self.kl_control.update(metrics["kl"], self.global_step)
        return metrics["kl"] > self.config.kl_budget

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.model.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "alpha": self.kl_control.alpha,
            "constraints": self.constraints.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["policy"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.kl_control.alpha = float(state["alpha"])
        self.constraints.load_state_dict(state["constraints"])
