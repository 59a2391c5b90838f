"""Choose reward-model implementations by configuration.

`load_reward_models(source, impl)`: `source` is a directory holding
`text_adherence/`, `quality/` and optionally `preference/` checkpoints (the
committed defaults live in `checkpoints/`), or a `musicrl.registry.Registry`
(the `current` version of each `reward/*` kind is downloaded, sha256-checked;
kinds with nothing published fall back to `fallback_dir`). `impl` is "onnx"
(serving), "torch" (training, evaluation) or "tiny" (no weights: the seam
proof), or a dict naming one per component; text adherence may also be
"clap" (a ``save_pretrained`` LAION-CLAP directory, `musicrl.rewards.clap`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musicrl.rewards.interfaces import PreferenceModel, QualityModel, TextAdherenceModel
from musicrl.text import TextEncoder, load_text_encoder

IMPLEMENTATIONS = ("onnx", "torch", "tiny", "clap")
# Implementations of one component only: CLAP is a text-audio model, nothing else.
ONLY_FOR = {"clap": "text_adherence"}
COMPONENT_KINDS = {
    "text_adherence": "reward/text_adherence",
    "quality": "reward/quality",
    "preference": "reward/preference",
}
DEFAULT_DIR = Path("checkpoints")
log = logging.getLogger(__name__)


@dataclass
class RewardModels:
    text_adherence: TextAdherenceModel
    quality: QualityModel
    preference: PreferenceModel | None
    text_encoder: TextEncoder

    @property
    def versions(self) -> dict[str, str]:
        versions = {
            "text_adherence": self.text_adherence.version,
            "quality": self.quality.version,
            "text_encoder": self.text_encoder.name,
        }
        if self.preference is not None:
            versions["preference"] = self.preference.version
        return versions


def _impls(impl: str | dict[str, str]) -> dict[str, str]:
    chosen = (
        {c: impl for c in COMPONENT_KINDS}
        if isinstance(impl, str)
        else {c: impl.get(c, "onnx") for c in COMPONENT_KINDS}
    )
    bad = {v for v in chosen.values() if v not in IMPLEMENTATIONS}
    if bad:
        raise ValueError(f"unknown reward implementation(s) {sorted(bad)}; choose from {IMPLEMENTATIONS}")
    for component, name in chosen.items():
        _check_scope(component, name)
    return chosen


def _check_scope(component: str, impl: str) -> None:
    if ONLY_FOR.get(impl, component) != component:
        raise ValueError(f"the {impl!r} implementation is a {ONLY_FOR[impl]} model, not a {component} model")


def load_component(
    component: str, directory: Path | None, impl: str = "onnx", version: str | None = None, threads: int = 1
):
    """One reward model from its checkpoint directory (None for a missing preference checkpoint)."""
    if component not in COMPONENT_KINDS:
        raise ValueError(f"unknown reward component {component!r}; choose from {tuple(COMPONENT_KINDS)}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown reward implementation {impl!r}; choose from {IMPLEMENTATIONS}")
    _check_scope(component, impl)
    directory = Path(directory) if directory is not None else None
    if impl == "tiny":
        from musicrl.rewards import tiny

        return {
            "text_adherence": tiny.TinyTextAdherence,
            "quality": tiny.TinyQuality,
            "preference": tiny.TinyPreference,
        }[component]()
    if directory is None or not directory.is_dir():
        if component == "preference":
            return None
        raise FileNotFoundError(f"no {component} checkpoint at {directory}")
    if impl == "clap":
        from musicrl.rewards.clap import ClapTextAdherence

        return ClapTextAdherence.load(directory, version)
    if component == "preference":
        from musicrl.models.preference import OnnxPreferenceModel, TorchPreferenceModel

        return (
            OnnxPreferenceModel.load(directory, version, threads)
            if impl == "onnx"
            else TorchPreferenceModel.load(directory, version)
        )
    if impl == "onnx":
        from musicrl.rewards.onnx_impl import OnnxQuality, OnnxTextAdherence

        cls = OnnxTextAdherence if component == "text_adherence" else OnnxQuality
        return cls.load(directory, version, threads)
    from musicrl.rewards.torch_impl import TorchQuality, TorchTextAdherence

    cls = TorchTextAdherence if component == "text_adherence" else TorchQuality
    return cls.load(directory, version)


def _resolve(source: Any, component: str, fallback_dir: Path, cache_dir: Path) -> tuple[Path | None, str | None]:
    """Local directory and (registry) version of a component's checkpoint."""
    if source is None or isinstance(source, str | Path):
        return Path(source or fallback_dir) / component, None
    kind = COMPONENT_KINDS[component]
    version = source.current(kind)
    if version is None:
        log.info("no %s published in the registry, using %s", kind, fallback_dir / component)
        return fallback_dir / component, None
    return source.download(kind, version, Path(cache_dir) / kind / version), version


def load_reward_models(
    source: Any = DEFAULT_DIR,
    impl: str | dict[str, str] = "onnx",
    text_encoder: str | None = None,
    threads: int = 1,
    fallback_dir: Path = DEFAULT_DIR,
    cache_dir: Path = Path(".data/reward_models"),
) -> RewardModels:
    impls = _impls(impl)
    models, directories = {}, {}
    for component, chosen in impls.items():
        directory, version = (
            (None, None) if chosen == "tiny" else _resolve(source, component, Path(fallback_dir), cache_dir)
        )
        models[component], directories[component] = (
            load_component(component, directory, chosen, version, threads),
            directory,
        )
    if text_encoder is None:
        text_encoder = (
            "hashing" if set(impls.values()) == {"tiny"} else _trained_text_encoder(directories["text_adherence"])
        )
    return RewardModels(text_encoder=load_text_encoder(text_encoder), **models)


def _trained_text_encoder(directory: Path | None) -> str:
    """The text encoder a trained text-adherence model was trained against (from its meta.json)."""
    if directory is not None and (directory / "meta.json").is_file():
        return json.loads((directory / "meta.json").read_text()).get("training", {}).get("text_encoder", "minilm")
    return "minilm"
