"""Model holder, registry source and loader of the reward service (no servers)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from musicrl.registry import sha256_file
from reward_service.services.models import ModelHolder, ModelsNotReady, RegistrySource
from reward_service.services.runtime import IncompatibleModel, component_loader
from reward_service.settings import RewardSettings

pytestmark = pytest.mark.unit


class FakeRegistry:
    def __init__(self, current: dict[str, str]):
        self.current_versions = current
        self.downloads: list[tuple[str, str]] = []

    def current(self, kind):
        return self.current_versions.get(kind)

    def download(self, kind, version, dest):
        self.downloads.append((kind, version))
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "model.onnx").write_bytes(b"weights")
        manifest = {"kind": kind, "version": version, "files": {"model.onnx": sha256_file(dest / "model.onnx")}}
        (dest / "manifest.json").write_text(json.dumps(manifest))
        return dest


def test_registry_source_needs_text_adherence_and_quality_but_not_preference(tmp_path):
    registry = FakeRegistry({"reward/text_adherence": "2", "reward/quality": "5"})
    source = RegistrySource(registry, tmp_path)
    assert source.current_versions() == {"text_adherence": "2", "quality": "5"}
    del registry.current_versions["reward/quality"]
    with pytest.raises(ModelsNotReady, match="reward/quality"):
        source.current_versions()


def test_registry_source_downloads_a_version_once_and_again_if_the_cache_is_damaged(tmp_path):
    registry = FakeRegistry({})
    source = RegistrySource(registry, tmp_path)
    first = source.fetch("quality", "3")
    second = source.fetch("quality", "3")
    assert first == second == tmp_path / "reward/quality/3"
    assert registry.downloads == [("reward/quality", "3")]
    (first / "model.onnx").write_bytes(b"tampered")
    source.fetch("quality", "3")
    assert registry.downloads == [("reward/quality", "3")] * 2
    assert (first / "model.onnx").read_bytes() == b"weights"


class Source:
    def __init__(self):
        self.versions = {"text_adherence": "1", "quality": "1"}

    def current_versions(self):
        return dict(self.versions)

    def fetch(self, component, version):
        return Path(component) / version


def test_holder_swaps_whole_snapshots_and_keeps_unchanged_models():
    loads = []

    def load(component, directory, version):
        loads.append((component, version))
        return object()

    source = Source()
    holder = ModelHolder(source, load)
    with pytest.raises(ModelsNotReady):
        holder.snapshot()
    first = holder.reload()
    assert first.changed == {"text_adherence": (None, "1"), "quality": (None, "1")}
    old = holder.snapshot()
    assert holder.reload().changed == {}
    assert holder.snapshot() is old
    source.versions["quality"] = "2"
    holder.reload()
    new = holder.snapshot()
    assert new is not old and old.versions["quality"] == "1"  # a pinned snapshot never changes
    assert new.models["text_adherence"] is old.models["text_adherence"]
    assert new.models["quality"] is not old.models["quality"]
    assert loads == [("text_adherence", "1"), ("quality", "1"), ("quality", "2")]


def test_a_failed_reload_keeps_the_snapshot_in_use():
    source = Source()
    broken = threading.Event()

    def load(component, directory, version):
        if broken.is_set():
            raise RuntimeError("corrupt download")
        return object()

    holder = ModelHolder(source, load)
    holder.reload()
    in_use = holder.snapshot()
    source.versions["quality"] = "2"
    broken.set()
    with pytest.raises(RuntimeError, match="corrupt"):
        holder.reload()
    assert holder.snapshot() is in_use
    assert "corrupt download" in holder.last_error


def test_loader_refuses_a_text_adherence_model_trained_against_another_encoder(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"training": {"text_encoder": "hashing"}}))
    load = component_loader(RewardSettings(reward_text_encoder="minilm", reward_impl="tiny"))
    with pytest.raises(IncompatibleModel, match="'hashing' text encoder"):
        load("text_adherence", tmp_path, "4")
    matching = component_loader(RewardSettings(reward_text_encoder="hashing", reward_impl="tiny"))
    assert hasattr(matching("text_adherence", tmp_path, "4"), "embed_audio")
