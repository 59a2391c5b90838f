"""Reward functions the trainers accept, chosen by a spec string.

- ``http://host:port``: the reward service (production; ``reward_client.HttpRewardFunction``);
- ``local:onnx|torch|tiny``: an in-process ``musicrl.rewards.RewardSuite`` (no service; tests, notebooks);
- ``python:module:attr``: any callable ``(prompts, tokens) -> {component: scores}`` (a class is instantiated).
"""

from __future__ import annotations

import importlib

import numpy as np


def load_object(spec: str):
    """``python:package.module:attr`` -> the attribute; a class is instantiated with no arguments."""
    module_name, _, attr = spec.removeprefix("python:").partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected python:module:attr, got {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if isinstance(obj, type) else obj


class SuiteRewardFunction:
    """The reward models in this process, through ``musicrl.rewards.RewardSuite``."""

    def __init__(self, suite, components: tuple[str, ...] | None = None):
        self.suite = suite
        self.components = components or suite.available()

    @property
    def versions(self) -> dict[str, str]:
        return dict(self.suite.versions)

    def __call__(self, prompts: list[str], tokens: np.ndarray) -> dict[str, np.ndarray]:
        from musicrl.rewards.suite import Clip  # noqa: PLC0415

        rows = self.suite.score([Clip(prompt=p, tokens=np.asarray(t)) for p, t in zip(prompts, tokens)], self.components)
        names = [n for n in ("text_adherence", "quality", "quality_mos", "preference", "combined") if rows and rows[0].get(n) is not None]
        return {name: np.array([row[name] for row in rows], dtype=np.float64) for name in names}


def make_reward_fn(spec: str, admin_token: str | None = None):
    if spec.startswith("python:"):
        return load_object(spec)
    if spec.startswith("local:"):
        from musicrl.rewards.loader import load_reward_models  # noqa: PLC0415
        from musicrl.rewards.suite import RewardSuite  # noqa: PLC0415

        return SuiteRewardFunction(RewardSuite(load_reward_models(impl=spec.removeprefix("local:"))))
    if spec.startswith(("http://", "https://")):
        from finetune_worker.reward_client import HttpRewardFunction  # noqa: PLC0415

        return HttpRewardFunction(spec, admin_token=admin_token)
    raise ValueError(f"unknown reward function {spec!r}: expected http(s)://..., local:IMPL or python:module:attr")
