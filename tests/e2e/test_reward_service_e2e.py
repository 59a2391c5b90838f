"""The reward service on the real stack: models from the registry in SeaweedFS,
clips from the object store, ONNX Runtime sessions, real HTTP (uvicorn).

Small randomly initialised reward models (the default architectures, exported
to ONNX exactly as training exports them) are published into a models bucket
of this module's own, so other tests publishing reward models change nothing
here. Prompts are embedded with the hashing text encoder to keep start-up fast.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from servers import serve_in_thread

from musicrl.audio import codec, formats
from musicrl.corpus.dataset import make_corpus
from musicrl.models.audio_encoder import AudioEncoderConfig, AudioTextEncoder
from musicrl.models.audio_export import write_checkpoint
from musicrl.models.generator import GeneratorConfig
from musicrl.models.preference import PreferenceRewardModel, save_preference_model
from musicrl.models.quality import MosRegressor
from musicrl.registry import Registry
from musicrl.schemas.generation import CLIP_GENERATION_ID_METADATA, GenerationRecord, clip_audio_key
from musicrl.storage import ObjectStore
from reward_service.app import create_app
from reward_service.settings import RewardSettings

pytestmark = pytest.mark.e2e

TOKEN = "e2e-admin-token"
SMALL_AUDIO = AudioEncoderConfig(channels=(32, 48, 64), width=64)
SMALL_PREFERENCE = GeneratorConfig(n_layers=2, n_heads=2, d_model=64, max_frames=256)


def _checkpoint(root: Path, component: str, seed: int) -> Path:
    torch.manual_seed(seed)
    directory = root / f"{component}-{seed}"
    training = {"text_encoder": "hashing", "note": "random init, e2e tests"}
    if component == "preference":
        return save_preference_model(PreferenceRewardModel(SMALL_PREFERENCE), directory, {"training": training})
    model, output = (AudioTextEncoder, "embedding") if component == "text_adherence" else (MosRegressor, "mos")
    return write_checkpoint(model(SMALL_AUDIO).eval(), directory, component, output, training, {}, "tests")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-checkpoints")
    return {
        "text_adherence": _checkpoint(root, "text_adherence", 0),
        "quality": _checkpoint(root, "quality", 1),
        "quality_v2": _checkpoint(root, "quality", 2),
        "preference": _checkpoint(root, "preference", 3),
    }


@pytest.fixture(scope="module")
def registry(object_store: ObjectStore, checkpoints) -> Registry:
    bucket = f"reward-e2e-{uuid.uuid4().hex[:12]}"
    object_store.client.make_bucket(bucket)
    registry = Registry(object_store, bucket=bucket)
    for component in ("text_adherence", "quality", "preference"):
        kind = f"reward/{component}"
        registry.set_current(kind, registry.publish(kind, checkpoints[component], lineage={"source": "e2e"}))
    return registry


@pytest.fixture(scope="module")
def service_url(stack, registry, tmp_path_factory):
    settings = stack.settings_for(
        RewardSettings,
        bucket_models=registry.bucket,
        reward_text_encoder="hashing",
        reward_admin_token=TOKEN,
        reward_poll_interval_s=1.0,
        reward_model_cache_dir=tmp_path_factory.mktemp("reward-cache"),
        reward_max_batch_size=16,
    )
    with serve_in_thread(create_app(settings), ready_path="/readyz") as url:
        yield url


@pytest.fixture()
def http(service_url):
    with httpx.Client(base_url=service_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stored_clip(object_store: ObjectStore) -> dict:
    """A clip stored as the gateway stores it: WAV with the generation id stamped on it, plus the record."""
    record = make_corpus(1, seed=11, split="test", duration_s=24.0)[0]
    generation_id, clip_id = uuid.uuid4().hex, uuid.uuid4().hex
    wav = formats.encode_audio(record.render(), codec.SAMPLE_RATE, "wav")
    cfg = object_store.config
    object_store.put_bytes(
        cfg.bucket_clips,
        clip_audio_key(clip_id),
        wav,
        "audio/wav",
        metadata={CLIP_GENERATION_ID_METADATA: generation_id},
    )
    generation = GenerationRecord(
        generation_id=generation_id,
        prompt=record.caption,
        params={"duration_s": 24.0, "temperature": 0.99},
        clips=[
            {
                "clip_id": clip_id,
                "index": 0,
                "seed": 1,
                "policy_version": "1",
                "tokens": record.tokens.tolist(),
                "logprobs": [-1.0] * len(record.tokens),
                "duration_s": 24.0,
                "sample_rate": codec.SAMPLE_RATE,
                "audio_key": f"clips/{clip_id}.wav",
            }
        ],
    )
    object_store.put_json(cfg.bucket_generations, f"generations/{generation_id}.json", generation.to_json())
    return {
        "clip_id": clip_id,
        "generation_id": generation_id,
        "prompt": record.caption,
        "tokens": record.tokens.tolist(),
        "wav": wav,
        "wave": record.render(),
    }


def _score(http: httpx.Client, items: list[dict], **extra) -> dict:
    response = http.post("/v1/scores", json={"items": items, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_clip_id_inline_audio_and_tokens_score_the_same_clip_alike(http, stored_clip):
    prompt = stored_clip["prompt"]
    flac = formats.encode_audio(stored_clip["wave"], codec.SAMPLE_RATE, "flac")
    out = _score(
        http,
        [
            {"prompt": prompt, "clip_id": stored_clip["clip_id"]},
            {"prompt": prompt, "audio_b64": base64.b64encode(stored_clip["wav"]).decode()},
            {"prompt": prompt, "audio_b64": base64.b64encode(flac).decode()},
            {"prompt": prompt, "tokens": stored_clip["tokens"]},
        ],
    )
    assert set(out["model_versions"]) == {"text_adherence", "quality", "preference"}
    by_id, wav, flac_, tokens = out["scores"]
    for name in ("text_adherence", "quality_mos"):
        # WAV and FLAC carry the same 16-bit samples; tokens render the float waveform before rounding.
        assert by_id[name] == pytest.approx(wav[name], abs=1e-5)
        assert by_id[name] == pytest.approx(flac_[name], abs=1e-5)
        assert by_id[name] == pytest.approx(tokens[name], abs=1e-2)
    # The stored clip's tokens come from its generation record, exactly as the tokens item.
    assert by_id["preference"] == pytest.approx(tokens["preference"], abs=1e-5)
    for s in out["scores"]:
        assert -1.0 <= s["text_adherence"] <= 1.0 and 1.0 <= s["quality_mos"] <= 5.0
        assert s["combined"] == pytest.approx(s["text_adherence"] + s["quality"] + s["preference"], abs=1e-9)


def test_same_input_and_versions_give_the_same_scores(http, stored_clip):
    items = [
        {"prompt": stored_clip["prompt"], "clip_id": stored_clip["clip_id"]},
        {"prompt": "a different prompt", "tokens": stored_clip["tokens"][:80]},
    ]
    first, second = _score(http, items), _score(http, items)
    assert first["model_versions"] == second["model_versions"]  # nothing is published before the reload tests
    assert first["scores"] == second["scores"]
    alone = _score(http, items[:1])  # another batch composition
    assert alone["model_versions"] == first["model_versions"]
    for name in ("text_adherence", "quality_mos", "preference"):
        assert alone["scores"][0][name] == pytest.approx(first["scores"][0][name], rel=1e-5)


def test_missing_and_corrupt_stored_clips_are_4xx(http, object_store):
    missing = http.post("/v1/scores", json={"items": [{"prompt": "x", "clip_id": uuid.uuid4().hex}]})
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]
    corrupt_id = uuid.uuid4().hex
    object_store.put_bytes(object_store.config.bucket_clips, f"clips/{corrupt_id}.wav", b"RIFF\x00\x00garbage")
    corrupt = http.post("/v1/scores", json={"items": [{"prompt": "x", "clip_id": corrupt_id}]})
    assert corrupt.status_code == 422 and "not a readable" in corrupt.json()["detail"]


def test_reload_under_concurrent_load_fails_no_request(http, service_url, registry, checkpoints, stored_clip):
    item = {"prompt": stored_clip["prompt"], "clip_id": stored_clip["clip_id"]}
    before = _score(http, [item])
    old_version = before["model_versions"]["quality"]
    outcomes: list[tuple[int, dict | str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=service_url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/scores", json={"items": [item, item]})
                outcomes.append((r.status_code, r.json() if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        new_version = registry.publish("reward/quality", checkpoints["quality_v2"], lineage={"parent": old_version})
        registry.set_current("reward/quality", new_version)
        reload = http.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert reload.status_code == 200, reload.text
        assert reload.json()["model_versions"]["quality"] == new_version  # by this call or by the poller
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    failures = [o for o in outcomes if o[0] != 200]
    assert not failures, failures[:3]
    assert len(outcomes) >= 12, "too little load to say anything"
    versions = [body["model_versions"]["quality"] for _, body in outcomes]
    assert old_version in versions and new_version in versions
    assert versions.index(new_version) > 0 and versions[-1] == new_version
    # Clips of concurrent requests shared batches (each request alone brings 2).
    metrics = http.get("/metrics").text
    small = next(line for line in metrics.splitlines() if line.startswith('musicrl_reward_batch_size_bucket{le="2.0"}'))
    total = next(line for line in metrics.splitlines() if line.startswith("musicrl_reward_batch_size_count"))
    assert float(small.split()[-1]) < float(total.split()[-1])
    after = _score(http, [item])
    reference = {old_version: before["scores"][0]["quality_mos"], new_version: after["scores"][0]["quality_mos"]}
    assert reference[old_version] != reference[new_version]
    for _, body in outcomes:
        # Every response is internally consistent: one version per request, and that version's scores.
        expected = reference[body["model_versions"]["quality"]]
        assert [s["quality_mos"] for s in body["scores"]] == pytest.approx([expected, expected], rel=1e-5)
        assert body["model_versions"]["text_adherence"] == before["model_versions"]["text_adherence"]


def test_polling_follows_the_registry_current_pointer(http, registry, checkpoints):
    new = registry.publish("reward/preference", checkpoints["preference"], lineage={"note": "republished"})
    registry.set_current("reward/preference", new)
    deadline = time.monotonic() + 20
    while http.get("/readyz").json()["model_versions"]["preference"] != new:
        assert time.monotonic() < deadline, "the poller never picked up the new preference version"
        time.sleep(0.2)
    metrics = http.get("/metrics").text
    assert 'musicrl_reward_model_reloads_total{result="changed",trigger="poll"}' in metrics
    assert f'musicrl_reward_model_version{{component="preference",version="{new}"}} 1.0' in metrics


def test_clap_scores_text_adherence_in_the_served_service_with_weights_from_the_object_store(
    stack, registry, object_store, stored_clip, tmp_path
):
    """Issue 15: `MUSICRL_REWARD_TEXT_ADHERENCE_IMPL=clap` with a tiny random CLAP whose `save_pretrained` directory
    sits under an `s3://` prefix of the real object store; the service downloads it, serves it over real HTTP and
    scores a 48 kHz upload and a stored clip with it, reporting the weights' digest as the component's version."""
    from pretrained_helpers import tiny_clap

    from musicrl.rewards.clap import ClapTextAdherence
    from musicrl.weights import directory_digest

    torch.set_num_threads(1)
    clap_dir = tiny_clap(tmp_path / "clap")
    bucket = registry.bucket
    for path in clap_dir.iterdir():
        object_store.put_bytes(bucket, f"weights/clap-tiny/{path.name}", path.read_bytes())
    settings = stack.settings_for(
        RewardSettings,
        bucket_models=bucket,
        reward_text_encoder="hashing",
        reward_text_adherence_impl="clap",
        reward_clap_path=f"s3://{bucket}/weights/clap-tiny",
        reward_poll_interval_s=0,
        reward_model_cache_dir=tmp_path / "cache",
    )
    wave48 = (0.1 * np.random.default_rng(0).standard_normal(3 * 48_000)).astype(np.float32)
    body = {
        "items": [
            {
                "prompt": "calm piano",
                "audio_b64": base64.b64encode(formats.encode_audio(wave48, 48_000, "wav")).decode(),
            },
            {"prompt": stored_clip["prompt"], "clip_id": stored_clip["clip_id"]},
        ],
        "components": ["text_adherence"],
    }
    with serve_in_thread(create_app(settings), ready_path="/readyz") as url:
        response = httpx.post(f"{url}/v1/scores", json=body, timeout=120)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model_versions"]["text_adherence"] == f"clap-{directory_digest(clap_dir)}"
    scores = [item["text_adherence"] for item in out["scores"]]
    # The same cosine in process: the 48 kHz upload reached CLAP unresampled (3 s: one window).
    clap = ClapTextAdherence.load(clap_dir, version="local")
    expected = float((clap.embed_waves(wave48[None, :]) @ clap.embed_text(["calm piano"])[0])[0])
    assert scores[0] == pytest.approx(expected, abs=1e-4)
    assert -1.0 <= scores[1] <= 1.0
