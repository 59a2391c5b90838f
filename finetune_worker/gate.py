"""The evaluation gate: a candidate policy is published only if every check passes.

Checks, on held-out prompts with the same seeds for the candidate and its parent:

- ``finite``: no NaN or infinity in the weights or the metrics;
- ``reward_improved``: the target reward rose by at least ``min_reward_gain``;
- ``kl_bounded``: KL(candidate || reference), per clip, is at most ``max_kl``;
- ``no_collapse``: every other reward component (text adherence, quality; not their sum
  ``combined``) fell by at most ``max_other_drop`` (the paper saw over-optimising the user
  reward cost text adherence).

The cycle checks every snapshot of its training run this way and publishes the one
``choose`` picks: the highest target reward among those that pass. Only when none
passes is the cycle refused; its report goes to the registry's ``rejected/`` records
with the reason of every snapshot (``refusal_reason``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# Not rewards of their own: quality_mos is the un-normalised twin of quality, and combined is a weighted sum
# of the components (the target among them), so a quality drop counted there would be counted twice.
NOT_CONSTRAINTS = frozenset({"reward/quality_mos", "reward/combined"})


@dataclass
class GateConfig:
    """Built from ``FinetuneSettings`` by ``finetune_worker.configs``."""

    min_reward_gain: float
    max_kl: float
    max_other_drop: float


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GateReport:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    candidate: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        failed = [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]
        return "; ".join(failed) if failed else "all checks passed"

    def to_dict(self) -> dict:
        return {**asdict(self), "reason": self.reason}


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())


def evaluate_gate(
    candidate: dict[str, float],
    baseline: dict[str, float],
    target_components: list[str],
    config: GateConfig,
    candidate_weights_finite: bool = True,
) -> GateReport:
    checks = []
    bad = sorted(
        {
            f"{side}:{k}"
            for side, metrics in (("candidate", candidate), ("baseline", baseline))
            for k, v in metrics.items()
            if not math.isfinite(v)
        }
    )
    finite = candidate_weights_finite and not bad
    checks.append(Check("finite", finite, "ok" if finite else f"non-finite: {bad or 'weights'}"))

    gain = candidate["reward"] - baseline["reward"]
    checks.append(
        Check(
            "reward_improved",
            gain > config.min_reward_gain,
            f"target reward {baseline['reward']:.4f} -> {candidate['reward']:.4f} "
            f"(gain {gain:+.4f}, needs > {config.min_reward_gain})",
        )
    )
    checks.append(
        Check(
            "kl_bounded",
            candidate["kl"] <= config.max_kl,
            f"KL {candidate['kl']:.3f} nats/clip (bound {config.max_kl})",
        )
    )
    others = sorted(
        k
        for k in candidate
        if k.startswith("reward/")
        and k in baseline
        and k.split("/", 1)[1] not in target_components
        and k not in NOT_CONSTRAINTS
    )
    drops = {k: baseline[k] - candidate[k] for k in others}
    collapsed = {k: round(d, 4) for k, d in drops.items() if d > config.max_other_drop}
    checks.append(
        Check(
            "no_collapse",
            not collapsed,
            f"drops {collapsed} exceed {config.max_other_drop}"
            if collapsed
            else f"other rewards within {config.max_other_drop}: {sorted(others)}",
        )
    )
    return GateReport(passed=all(c.passed for c in checks), checks=checks, candidate=candidate, baseline=baseline)


def choose(reports: list[GateReport]) -> int | None:
    """Index of the passing report with the highest target reward (the earliest on a tie); None if none passes."""
    passing = [i for i, report in enumerate(reports) if report.passed]
    return max(passing, key=lambda i: (reports[i].candidate["reward"], -i)) if passing else None


def refusal_reason(steps: list[int | None], reports: list[GateReport]) -> str:
    return "no checkpoint passed the gate: " + " | ".join(
        f"step {step}: {report.reason}" for step, report in zip(steps, reports)
    )
