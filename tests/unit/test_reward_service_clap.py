"""The reward service with CLAP as its text-adherence model, chosen by settings (tiny random CLAP,
fake registry for the other components, in-memory object store; no servers)."""

from __future__ import annotations

import base64
import json
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from feedback_helpers import InMemoryStore
from pretrained_helpers import (
    one_thread_per_module,  # noqa: F401 - autouse fixture
    tiny_clap,
)

from musicrl.audio import codec, formats
from musicrl.registry import sha256_file
from musicrl.rewards.clap import ClapTextAdherence
from musicrl.text import HashingTextEncoder
from musicrl.weights import directory_digest
from reward_service.app import Dependencies, create_app
from reward_service.services.inputs import InputResolver, Limits
from reward_service.services.models import ModelHolder, RegistrySource
from reward_service.services.runtime import component_loader, pinned_models
from reward_service.services.scorer import CachedTextEncoder, score_batch
from reward_service.settings import RewardSettings

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return tiny_clap(tmp_path_factory.mktemp("clap"))


class QualityOnlyRegistry:
    """A registry whose only current reward model is reward/quality (text adherence comes from the settings)."""

    def current(self, kind):
        return "5" if kind == "reward/quality" else None

    def download(self, kind, version, dest):
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "model.onnx").write_bytes(b"tiny quality needs no weights")
        manifest = {"kind": kind, "version": version, "files": {"model.onnx": sha256_file(dest / "model.onnx")}}
        (dest / "manifest.json").write_text(json.dumps(manifest))
        return dest


def clap_settings(path, **overrides) -> RewardSettings:
    return RewardSettings(
        reward_impl="tiny",
        reward_text_adherence_impl="clap",
        reward_clap_path=str(path),
        reward_poll_interval_s=0,
        **overrides,
    )


def test_settings_choose_clap_over_the_text_encoder_check(clap_dir, tmp_path):
    settings = clap_settings(clap_dir, reward_text_encoder="minilm")
    directory = shutil.copytree(clap_dir, tmp_path / "clap")
    (directory / "meta.json").write_text(
        json.dumps({"training": {"text_encoder": "hashing"}})
    )  # ignored: CLAP has its own
    model = component_loader(settings)("text_adherence", directory, "clap-x")
    assert isinstance(model, ClapTextAdherence) and model.version == "clap-x"
    default = component_loader(RewardSettings(reward_impl="tiny"))("text_adherence", tmp_path / "none", "1")
    assert not isinstance(default, ClapTextAdherence)


def test_clap_weights_are_pinned_from_a_path_or_the_object_store(clap_dir, tmp_path):
    store = InMemoryStore()
    version, directory = pinned_models(clap_settings(clap_dir), store)["text_adherence"]
    assert directory == clap_dir and version == f"clap-{directory_digest(clap_dir)}"
    for path in clap_dir.iterdir():
        store.put_bytes("weights", f"clap/htsat/{path.name}", path.read_bytes())
    settings = clap_settings("s3://weights/clap/htsat", reward_model_cache_dir=tmp_path / "cache")
    s3_version, fetched = pinned_models(settings, store)["text_adherence"]
    assert s3_version == version and fetched.is_relative_to(tmp_path / "cache")
    assert pinned_models(RewardSettings(), store) == {}  # the default model comes from the registry

    source = RegistrySource(QualityOnlyRegistry(), tmp_path / "registry", {"text_adherence": (version, directory)})
    assert source.current_versions() == {"text_adherence": version, "quality": "5"}
    assert source.fetch("text_adherence", version) == clap_dir


def test_the_service_scores_text_adherence_with_clap_and_reports_its_version(clap_dir, tmp_path):
    settings = clap_settings(clap_dir, reward_model_cache_dir=tmp_path, reward_max_wait_ms=2.0)
    store = InMemoryStore()
    source = RegistrySource(QualityOnlyRegistry(), tmp_path, pinned_models(settings, store))
    holder = ModelHolder(source, component_loader(settings))
    resolver = InputResolver(None, Limits.from_settings(settings), codec, formats)
    app = create_app(
        settings,
        Dependencies(holder, resolver, partial(score_batch, text_encoder=CachedTextEncoder(HashingTextEncoder()))),
    )

    wave48 = (0.1 * np.random.default_rng(0).standard_normal(12 * 48_000)).astype(np.float32)
    wav = formats.encode_audio(wave48, 48_000, "wav")
    tokens = np.random.default_rng(1).integers(codec.NOTE_OFFSET, codec.VOCAB_SIZE, codec.frames_for(6.0)).tolist()
    body = {
        "items": [
            {"prompt": "calm piano", "audio_b64": base64.b64encode(wav).decode()},
            {"prompt": "fast drums", "tokens": tokens},
        ],
        "components": ["text_adherence", "quality"],
    }
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.05)
        response = client.post("/v1/scores", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model_versions"] == {"text_adherence": f"clap-{directory_digest(clap_dir)}", "quality": "5"}

    # The 48 kHz upload reached CLAP unresampled: 12 s is one 10 s window (a 2 s remainder is dropped).
    clap = holder.snapshot().models["text_adherence"]
    decoded, rate = formats.decode_audio(wav)
    expected = float((clap.embed_waves(decoded[None, :480_000]) @ clap.embed_text(["calm piano"])[0])[0])
    first, second = out["scores"]
    assert rate == 48_000 and first["text_adherence"] == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= second["text_adherence"] <= 1.0 and second["quality"] is not None
