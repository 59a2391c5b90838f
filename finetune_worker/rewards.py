"""Reward functions the trainers accept, chosen by a spec string.

- ``http://host:port``: the reward service (production; ``reward_client.HttpRewardFunction``);
- ``local:onnx|torch|tiny``: an in-process ``musicrl.rewards.RewardSuite`` (no service; tests, notebooks);
- ``python:module:attr``: any callable ``(prompts, tokens) -> {component: scores}`` (a class is instantiated).

A policy with its own codec (MusicGen: ``[B, K, T]`` EnCodec codes the service's codec cannot decode) is
scored through :class:`PolicyRewardFunction` (:func:`for_policy`): the rollouts' audio, decoded by the
policy, goes to the reward function (``score_audio``), and the preference component comes from the
policy's own preference model in this process (``musicrl.models.preference_musicgen``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

NAMES = ("text_adherence", "quality", "quality_mos", "preference", "combined")


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

        rows = self.suite.score(
            [Clip(prompt=p, tokens=np.asarray(t)) for p, t in zip(prompts, tokens)], self.components
        )
        names = [n for n in NAMES if rows and rows[0].get(n) is not None]
        return {name: np.array([row[name] for row in rows], dtype=np.float64) for name in names}

    def score_audio(
        self, prompts: list[str], waves: Sequence[np.ndarray], sample_rate: int, components: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Score waveforms at ``sample_rate`` (each model resamples to its own rate, as in the service)."""
        from musicrl.rewards.suite import Clip  # noqa: PLC0415

        clips = [
            Clip(prompt=p, wave=np.asarray(w, dtype=np.float32), sample_rate=int(sample_rate))
            for p, w in zip(prompts, waves)
        ]
        rows = self.suite.score(clips, tuple(components) if components is not None else self.components)
        names = [n for n in NAMES if rows and rows[0].get(n) is not None]
        return {name: np.array([row[name] for row in rows], dtype=np.float64) for name in names}


class PolicyRewardFunction:
    """A reward function for a policy with its own codec (MusicGen), wrapping one that scores audio.

    Called with the rollouts' codes ``[B, K, T]``: when ``inner`` has ``score_audio`` (the reward service,
    the in-process suite) it gets ``policy.decode(codes)`` at ``policy.sample_rate`` (the service would
    decode tokens with the default codec); a reward function without it (``python:`` fakes over codes)
    gets the codes. ``preference`` (a ``MusicgenPreferenceModel``), when given, scores the preference
    component on the codes in this process, replacing whatever ``inner`` returned for it: the reward
    service's preference model reads the default codec's tokens, not this policy's. Without it, the
    service is not asked for preference (stage R needs none; a U cycle without a vote-trained model skips).
    """

    def __init__(
        self,
        inner,
        policy,
        preference=None,
        preference_version: str | None = None,
        preference_dir: str | Path | None = None,
    ):
        self.inner, self.policy, self._preference = inner, policy, preference
        self.preference_version, self.preference_dir = preference_version, preference_dir

    @property
    def preference(self):
        """The preference model, loaded from ``preference_dir`` on first use."""
        if self._preference is None and self.preference_dir is not None:
            from musicrl.models.preference_musicgen import load_musicgen_preference_model  # noqa: PLC0415 - transformers

            self._preference, _ = load_musicgen_preference_model(self.preference_dir)
        return self._preference

    @property
    def versions(self) -> dict[str, str]:
        versions = dict(getattr(self.inner, "versions", {}) or {})
        if self._preference is not None or self.preference_dir is not None:
            versions["preference"] = self.preference_version or "local"
        else:
            versions.pop("preference", None)
        return versions

    def __getattr__(self, name: str):  # reload(), close(), ... of the wrapped function
        if name.startswith("_") or name in ("inner", "policy", "preference_version", "preference_dir"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, prompts: list[str], tokens: np.ndarray) -> dict[str, np.ndarray]:
        codes = np.asarray(tokens)
        if codes.ndim == 2:  # one codebook: [B, T] as reward_input gives it
            codes = codes[:, None]
        if len(prompts) != len(codes):
            raise ValueError(f"{len(prompts)} prompts for {len(codes)} clips")
        if hasattr(self.inner, "score_audio"):
            components = [
                c for c in getattr(self.inner, "components", ("text_adherence", "quality")) if c != "preference"
            ]
            scores = dict(
                self.inner.score_audio(
                    list(prompts), list(self.policy.decode(codes)), self.policy.sample_rate, components
                )
            )
        else:
            scores = dict(self.inner(list(prompts), np.asarray(tokens)))
        if self.preference is not None:
            scores["preference"] = np.asarray(self.preference.score(list(prompts), list(codes)), dtype=np.float64)
        return scores


def for_policy(reward_fn, policy, preference_dir: str | Path | None = None, preference_version: str | None = None):
    """The reward function to train and evaluate ``policy`` with: ``reward_fn`` itself for the default generator
    (one codebook, scored by tokens, exactly as before), else a :class:`PolicyRewardFunction` (with the preference
    model in ``preference_dir``, a ``MusicgenPreferenceModel`` directory, when given)."""
    if getattr(policy, "kind", "default") == "default":
        return reward_fn
    return PolicyRewardFunction(reward_fn, policy, preference_version=preference_version, preference_dir=preference_dir)


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
