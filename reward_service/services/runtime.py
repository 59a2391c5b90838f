"""The real collaborators of the app, built from the settings: the object store,
the model registry as the source of reward models (CLAP from its configured
weights when ``reward_text_adherence_impl=clap``), ONNX Runtime sessions
(``musicrl.rewards``), the frozen prompt encoder, the audio codec."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from musicrl.audio import codec, formats
from musicrl.registry import Registry
from musicrl.rewards import load_component
from musicrl.schemas.scores import Component
from musicrl.storage import ObjectStore
from musicrl.text import load_text_encoder
from musicrl.weights import directory_digest, fetch_weights
from reward_service.app import Dependencies
from reward_service.services.inputs import InputResolver, Limits
from reward_service.services.models import ModelHolder, RegistrySource
from reward_service.services.scorer import CachedTextEncoder, score_batch
from reward_service.settings import RewardSettings


class IncompatibleModel(ValueError):
    """A model that cannot be served with this service's configuration."""


def component_loader(settings: RewardSettings):
    clap = settings.reward_text_adherence_impl == "clap"

    def load(component: Component, directory: Path, version: str):
        if component == "text_adherence" and clap:  # CLAP embeds prompts with its own text tower
            return load_component(component, directory, "clap", version)
        if component == "text_adherence":
            # Its audio embeddings only mean something next to the text encoder it was trained against.
            meta_path = directory / "meta.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            trained_with = meta.get("training", {}).get("text_encoder", settings.reward_text_encoder)
            if trained_with != settings.reward_text_encoder:
                raise IncompatibleModel(
                    f"text_adherence {version} was trained against the {trained_with!r} text encoder, "
                    f"this service embeds prompts with {settings.reward_text_encoder!r}"
                )
        model = load_component(component, directory, settings.reward_impl, version, settings.reward_intra_op_threads)
        if model is None:
            raise IncompatibleModel(f"{component} {version}: no checkpoint in {directory}")
        return model

    return load


def pinned_models(settings: RewardSettings, store: ObjectStore) -> dict[Component, tuple[str, Path]]:
    """Components served from configured weights rather than the registry: CLAP from ``reward_clap_path``,
    versioned by the content of its directory."""
    if settings.reward_text_adherence_impl != "clap" or settings.reward_clap_path is None:
        return {}
    directory = fetch_weights(settings.reward_clap_path, store, settings.reward_model_cache_dir / "clap")
    return {"text_adherence": (f"clap-{directory_digest(directory)}", directory)}


def default_dependencies(settings: RewardSettings) -> Dependencies:
    store = ObjectStore(settings)
    source = RegistrySource(Registry(store), settings.reward_model_cache_dir, pinned_models(settings, store))
    holder = ModelHolder(source, component_loader(settings))
    resolver = InputResolver(store, Limits.from_settings(settings), codec, formats)
    encoder = CachedTextEncoder(load_text_encoder(settings.reward_text_encoder))
    encoder.embed(["warm-up"])  # load the encoder now: a lazy load would stall the first batch for seconds
    return Dependencies(holder, resolver, partial(score_batch, text_encoder=encoder))
