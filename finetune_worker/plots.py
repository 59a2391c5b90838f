"""The paper's two views of RL finetuning: reward against training step, and reward against KL to the reference."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend


def plot_training(history: list[dict[str, float]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``reward_vs_step.png`` and ``reward_vs_kl.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history]
    target = "reward" if "reward" in history[0] else "rewards/margin"  # DPO has implicit rewards only
    components = sorted({k for h in history for k in h if k.startswith("reward/")})
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    values = np.array([h[target] for h in history], dtype=float)
    ax.plot(steps, values, label=target, linewidth=1, alpha=0.5)
    window = max(1, len(values) // 8)  # rollout batches are small: show the trend under the noise
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, label=f"{target} ({window}-step mean)", linewidth=2.5, color="C0")
    for name in components:
        ax.plot(steps, [h.get(name, float("nan")) for h in history], label=name, alpha=0.7)
    ax.set(xlabel="training step", ylabel="reward (mean over rollouts)", title=title or "reward vs step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(out_dir / "reward_vs_step.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    scatter = ax.scatter([h["kl"] for h in history], [h[target] for h in history], c=steps, cmap="viridis", s=14)
    fig.colorbar(scatter, ax=ax, label="step")
    ax.set(xlabel="KL(policy || starting policy), nats per clip", ylabel=target, title=title or "reward vs KL")
    ax.grid(alpha=0.3)
    paths.append(out_dir / "reward_vs_kl.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
