"""The reward service's HTTP API with fake reward models: validation, limits,
combination of rewards, backpressure, readiness and the admin reload.

The real codec, audio formats and log-mel are used; only the models, the
prompt encoder and the object store are replaced by small fakes here (the
e2e tests run the real ones)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile
from audio_headers import flac_header, wav_header
from fastapi.testclient import TestClient
from feedback_helpers import InMemoryStore
from pydantic import ValidationError

from musicrl.audio import codec, features, formats
from musicrl.rewards.tiny import TinyPreference, TinyQuality
from musicrl.schemas.generation import CLIP_GENERATION_ID_METADATA
from musicrl.schemas.scores import ScoreRequest
from musicrl.stack.processes import wait_until_healthy
from musicrl.text import TEXT_DIM, HashingTextEncoder
from reward_service.app import Dependencies, create_app
from reward_service.services.inputs import InputResolver, Limits
from reward_service.services.models import ModelHolder
from reward_service.services.scorer import CachedTextEncoder, score_batch
from reward_service.settings import RewardSettings

pytestmark = pytest.mark.unit

TOKEN = "s3cret"
SR = codec.SAMPLE_RATE


# ----------------------------------------------------------------------------- fakes


class FakeTextAdherence:
    """A fixed random projection of the mel statistics per version (so a reload changes the scores)."""

    text_dim = TEXT_DIM

    def __init__(self, version: str):
        self.version = version
        self.projection = (
            np.random.default_rng(int(version)).standard_normal((features.N_MELS, TEXT_DIM)).astype(np.float32)
        )

    def embed_audio(self, mels: np.ndarray) -> np.ndarray:
        e = mels.mean(axis=2) @ self.projection
        return e / np.linalg.norm(e, axis=1, keepdims=True)


class FakeQuality(TinyQuality):
    def __init__(self, version: str):
        self.version = version

    def mos(self, mels: np.ndarray) -> np.ndarray:
        return np.clip(super().mos(mels) - 0.25 * (int(self.version) - 1), 1.0, 5.0)


class FakePreference(TinyPreference):
    def __init__(self, version: str):
        self.version = version

    def score(self, cond, tokens) -> np.ndarray:
        return super().score(cond, tokens) + int(self.version)


FAKES = {"text_adherence": FakeTextAdherence, "quality": FakeQuality, "preference": FakePreference}


class FakeSource:
    def __init__(self):
        self.versions = {"text_adherence": "1", "quality": "1", "preference": "1"}
        self.fail: str | None = None
        self.loads: list[tuple[str, str]] = []

    def current_versions(self):
        if self.fail:
            raise RuntimeError(self.fail)
        return dict(self.versions)

    def fetch(self, component, version):
        return Path("/fake") / component / version


def load_fake(source: FakeSource, component: str, path: Path, version: str):
    source.loads.append((component, version))
    return FAKES[component](version)


def tone(seconds: float, hz: float = 440.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tokens(seconds: float, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(codec.NOTE_OFFSET, codec.VOCAB_SIZE, codec.frames_for(seconds)).tolist()


def build(source=None, store=None, score=None, **overrides):
    defaults = dict(
        reward_admin_token=TOKEN,
        reward_poll_interval_s=0,
        reward_max_items=8,
        reward_max_audio_s=30.0,
        reward_max_body_bytes=2_000_000,
        reward_max_wait_ms=2.0,
    )
    settings = RewardSettings(**(defaults | overrides))
    source = source or FakeSource()
    store = store or InMemoryStore()
    holder = ModelHolder(source, partial(load_fake, source))
    resolver = InputResolver(store, Limits.from_settings(settings), codec, formats)
    score = score or partial(score_batch, text_encoder=CachedTextEncoder(HashingTextEncoder()))
    return create_app(settings, Dependencies(holder, resolver, score)), source, store


@pytest.fixture()
def api():
    app, source, store = build()
    with TestClient(app) as client:
        wait_ready(client)
        yield client, source, store


def wait_ready(client: TestClient) -> None:
    wait_until_healthy(lambda: client.get("/readyz").status_code == 200, 10, name="reward service", interval_s=0.01)


# ----------------------------------------------------------------------------- scoring


def test_scores_every_kind_of_input_and_combines_them(api):
    client, _, store = api
    clip_id, generation_id = "a" * 32, "b" * 32
    wave = tone(12.0)
    store.objects["musicrl-clips", f"clips/{clip_id}.wav"] = formats.encode_audio(wave, SR, "wav")
    recorded = tokens(12.0, seed=3)
    store.objects["musicrl-generations", f"generations/{generation_id}.json"] = json.dumps(
        {"clips": [{"clip_id": clip_id, "tokens": recorded}]}
    ).encode()
    body = {
        "items": [
            {"prompt": "calm piano", "clip_id": clip_id},
            {"prompt": "calm piano", "clip_id": clip_id, "generation_id": generation_id},
            {"prompt": "calm piano", "audio_b64": b64(formats.encode_audio(wave, SR, "flac"))},
            {"prompt": "calm piano", "tokens": recorded},
        ]
    }
    r = client.post("/v1/scores", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_versions"] == {"text_adherence": "1", "quality": "1", "preference": "1"}
    assert out["weights"] == {"text_adherence": 1.0, "quality": 1.0, "preference": 1.0}
    s = out["scores"]
    # Same audio whether fetched by id or sent inline as FLAC (16-bit both ways).
    assert s[0]["text_adherence"] == pytest.approx(s[2]["text_adherence"], abs=1e-5)
    assert s[0]["quality_mos"] == pytest.approx(s[2]["quality_mos"], abs=1e-5)
    # The generation record's tokens, not the re-analysed ones, feed the preference model.
    assert s[1]["preference"] == pytest.approx(s[3]["preference"], abs=1e-6)
    for item in s:
        assert 1.0 <= item["quality_mos"] <= 5.0
        assert item["quality"] == pytest.approx((item["quality_mos"] - 1) / 4)
        assert item["combined"] == pytest.approx(item["text_adherence"] + item["quality"] + item["preference"])


def test_clip_tokens_come_from_the_generation_stamped_on_the_stored_wav(api):
    client, _, store = api
    stamped, unstamped, dangling, generation_id = "1" * 32, "2" * 32, "3" * 32, "4" * 32
    recorded = tokens(6.0, seed=5)
    # The stored audio is of other tokens, so scores show which tokens the preference model saw.
    wav = formats.encode_audio(codec.decode(np.asarray(tokens(6.0, seed=6))), SR)
    for clip_id in (stamped, unstamped, dangling):
        store.objects["musicrl-clips", f"clips/{clip_id}.wav"] = wav
    store.metadata["musicrl-clips", f"clips/{stamped}.wav"] = {CLIP_GENERATION_ID_METADATA: generation_id}
    store.metadata["musicrl-clips", f"clips/{dangling}.wav"] = {CLIP_GENERATION_ID_METADATA: "9" * 32}
    store.objects["musicrl-generations", f"generations/{generation_id}.json"] = json.dumps(
        {"clips": [{"clip_id": stamped, "tokens": recorded}]}
    ).encode()
    items = [{"prompt": "p", "clip_id": c} for c in (stamped, unstamped, dangling)] + [
        {"prompt": "p", "tokens": recorded}
    ]
    r = client.post("/v1/scores", json={"items": items, "components": ["preference"]})
    assert r.status_code == 200, r.text
    from_record, analysed, fallback, direct = (s["preference"] for s in r.json()["scores"])
    assert from_record == direct != analysed
    assert analysed == fallback  # a stamp that points nowhere falls back to analysing the audio


def test_components_and_weights_select_what_is_computed(api):
    client, _, _ = api
    item = {"prompt": "fast drums", "audio_b64": b64(formats.encode_audio(tone(3.0), SR))}
    r = client.post("/v1/scores", json={"items": [item], "components": ["quality"], "weights": {"quality": 2.0}})
    assert r.status_code == 200, r.text
    out = r.json()
    (s,) = out["scores"]
    assert s["text_adherence"] is None and s["preference"] is None
    assert s["combined"] == pytest.approx(2.0 * s["quality"])
    assert out["model_versions"] == {"quality": "1"}


def test_other_sample_rates_and_stereo_are_converted():
    app, _, _ = build()
    with TestClient(app) as client:
        wait_ready(client)
        mono = tone(2.0, sr=16_000)
        stereo44 = np.stack([tone(2.0, sr=44_100)] * 2, axis=1)
        buf = io.BytesIO()
        soundfile.write(buf, stereo44, 44_100, format="WAV", subtype="PCM_16")
        items = [
            {"prompt": "x", "audio_b64": b64(formats.encode_audio(mono, 16_000))},
            {"prompt": "x", "audio_b64": b64(buf.getvalue())},
        ]
        r = client.post("/v1/scores", json={"items": items, "components": ["quality"]})
        assert r.status_code == 200, r.text
        a, b = (s["quality_mos"] for s in r.json()["scores"])
        assert a == pytest.approx(b, abs=0.05)


def test_same_input_gives_the_same_scores(api):
    client, _, _ = api
    body = {"items": [{"prompt": "warm strings", "tokens": tokens(25.0, seed=9)}]}
    first = client.post("/v1/scores", json=body).json()
    second = client.post("/v1/scores", json=body).json()
    assert first == second


# ----------------------------------------------------------------------------- bad input


AUDIO = b64(formats.encode_audio(tone(1.0), SR))


def float_wav(wave: np.ndarray) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, SR, format="WAV", subtype="FLOAT")
    return b64(buffer.getvalue())


NAN_WAV = float_wav(np.where(np.arange(SR) == 100, np.nan, tone(1.0)).astype(np.float32))


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"items": []}, 422, "items"),
        ({"items": [{"prompt": "x"}]}, 422, "exactly one of"),
        ({"items": [{"prompt": "x", "tokens": [10] * 16, "audio_b64": AUDIO}]}, 422, "exactly one of"),
        ({"items": [{"prompt": "", "tokens": [10] * 16}]}, 422, "prompt"),
        ({"items": [{"prompt": "x", "clip_id": "../etc/passwd"}]}, 422, "hex id"),
        ({"items": [{"prompt": "x", "tokens": [10] * 16, "generation_id": "c" * 32}]}, 422, "only meaningful"),
        ({"items": [{"prompt": "x", "tokens": [10] * 16, "color": "red"}]}, 422, "color"),
        ({"items": [{"prompt": "x", "tokens": [10] * 16}], "components": ["loudness"]}, 422, "components"),
        ({"items": [{"prompt": "x", "tokens": [10] * 16}], "components": []}, 422, "must not be empty"),
        (
            {"items": [{"prompt": "x", "tokens": [10] * 16}], "components": ["quality"], "weights": {"preference": 1}},
            422,
            "not computed",
        ),
        ({"items": [{"prompt": "x", "tokens": [codec.VOCAB_SIZE]}]}, 422, "tokens must lie in"),
        ({"items": [{"prompt": "x", "tokens": [-1] * 16}]}, 422, "tokens must lie in"),
        ({"items": [{"prompt": "x", "tokens": ["a"]}]}, 422, "tokens"),
        ({"items": [{"prompt": "x", "tokens": [10]}]}, 422, "at least"),
        ({"items": [{"prompt": "x", "tokens": [10] * codec.frames_for(31)}]}, 413, "limit is 30"),
        ({"items": [{"prompt": "x", "audio_b64": "not base64!"}]}, 422, "base64"),
        ({"items": [{"prompt": "x", "audio_b64": b64(b"OggS" + b"\0" * 100)}]}, 422, "WAV or FLAC"),
        ({"items": [{"prompt": "x", "audio_b64": b64(b"RIFF" + b"\0" * 100)}]}, 422, "not a readable"),
        (
            {"items": [{"prompt": "x", "audio_b64": b64(formats.encode_audio(tone(31.0), SR, "flac"))}]},
            413,
            "limit is 30",
        ),
        ({"items": [{"prompt": "x", "audio_b64": b64(formats.encode_audio(tone(0.05), SR))}]}, 422, "at least"),
        ({"items": [{"prompt": "x", "audio_b64": NAN_WAV}]}, 422, "NaN"),
        ({"items": [{"prompt": "x", "audio_b64": ""}]}, 422, "WAV or FLAC"),
        ({"items": [{"prompt": "x", "clip_id": "d" * 32}]}, 404, "not found"),
        ({"items": [{"prompt": "x", "tokens": [10] * 16}] * 9}, 413, "limit is 8"),
    ],
)
def test_bad_input_gets_a_clear_4xx(api, body, status, message):
    client, _, _ = api
    r = client.post("/v1/scores", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_the_openapi_document_states_the_item_and_weight_rules(api):
    # What the validators refuse, the published schema refuses too (no schema-valid body gets 422 for them).
    import jsonschema

    client, _, _ = api
    document = client.get("/openapi.json").json()
    schema = {**document["components"]["schemas"]["ScoreRequest"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)  # its $refs point into "components"
    h = "c" * 32
    items = [
        {"prompt": "x"},
        {"prompt": "x", "clip_id": h},
        {"prompt": "x", "clip_id": h, "tokens": [10] * 16},
        {"prompt": "x", "tokens": [10] * 16, "generation_id": h},
        {"prompt": "x", "clip_id": None, "tokens": [10] * 16},
        {"prompt": "x", "clip_id": h, "generation_id": h},
        {"prompt": "x", "audio_b64": "AA", "tokens": None},
        {"prompt": "x", "clip_id": None},
    ]
    extras = [
        {},
        {"components": ["quality"], "weights": {"text_adherence": 1.0}},
        {"weights": {"quality": 2.0}},
        {"components": ["quality"], "weights": {"quality": 1.0}},
    ]
    verdicts = set()
    for item in items:
        for extra in extras:
            body = {"items": [item], **extra}
            try:
                ScoreRequest.model_validate(body)
                accepted = True
            except ValidationError:
                accepted = False
            assert validator.is_valid(body) == accepted, body
            verdicts.add(accepted)
    assert verdicts == {True, False}


def test_the_openapi_document_states_the_configured_limits(api):
    client, _, _ = api
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    tokens = next(b for b in schemas["ScoreItem"]["properties"]["tokens"]["anyOf"] if b["type"] == "array")
    assert tokens["items"] == {"type": "integer", "minimum": 0, "maximum": codec.VOCAB_SIZE - 1}
    assert schemas["ScoreRequest"]["properties"]["items"]["maxItems"] == 8
    # The longest and shortest token lists the document allows are scored; one token beyond either is refused.
    for n, status in (
        (tokens["maxItems"], 200),
        (tokens["maxItems"] + 1, 413),
        (tokens["minItems"], 200),
        (tokens["minItems"] - 1, 422),
    ):
        r = client.post("/v1/scores", json={"items": [{"prompt": "x", "tokens": [10] * n}], "components": ["quality"]})
        assert r.status_code == status, (n, r.text)


@pytest.fixture()
def decoded(monkeypatch):
    """The sample counts libsndfile was asked to decode during the test (soundfile.read is spied on)."""
    calls: list[int] = []
    read = soundfile.read

    def spy(*args, **kwargs):
        calls.append(1)
        return read(*args, **kwargs)

    monkeypatch.setattr(soundfile, "read", spy)
    return calls


@pytest.mark.parametrize(
    "data, status, message",
    [
        # Decoded, these would be 0.0005 s of audio ("at least 0.25 s"), no audio at all, or unreadable.
        (
            wav_header(1_000_000, 1, data=bytes(1000)),
            422,
            "sample rate 1000000 Hz is outside the accepted 8000..48000 Hz",
        ),
        (wav_header(16_000, 64), 422, "64 channels, at most 2 accepted"),
        (flac_header(1_000_000, 1), 422, "sample rate 1000000 Hz is outside"),
        (flac_header(655_350, 8, seconds=3600), 422, "sample rate 655350 Hz"),
        (flac_header(16_000, 8), 422, "8 channels, at most 2 accepted"),
        (wav_header(4_000, 1, data=bytes(16_000)), 422, "sample rate 4000 Hz is outside"),
        # 42 bytes claiming an hour: refused on the header, never decompressed.
        (flac_header(48_000, 2, seconds=3600), 413, "3600.0 s of audio, the limit is 30 s"),
    ],
    ids=[
        "wav-1MHz-truncated",
        "wav-64ch-header-only",
        "flac-1MHz",
        "flac-655kHz-8ch-1h",
        "flac-8ch",
        "wav-4kHz",
        "flac-1h",
    ],
)
def test_audio_headers_outside_the_limits_are_refused_before_decoding(api, decoded, data, status, message):
    client, _, store = api
    r = client.post("/v1/scores", json={"items": [{"prompt": "x", "audio_b64": b64(data)}]})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail.startswith("items[0].audio_b64: ") and message in detail, detail
    # The same file stored as a clip: refused the same way.
    clip_id = "c" * 32
    store.objects["musicrl-clips", f"clips/{clip_id}.wav"] = data
    r = client.post("/v1/scores", json={"items": [{"prompt": "x", "clip_id": clip_id}]})
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert decoded == []


def test_audio_at_the_edges_of_the_accepted_range_still_scores(decoded):
    app, _, _ = build()
    stereo48 = io.BytesIO()
    soundfile.write(stereo48, np.stack([tone(2.0, sr=48_000)] * 2, axis=1), 48_000, format="FLAC", subtype="PCM_16")
    items = [
        {"prompt": "x", "audio_b64": b64(formats.encode_audio(tone(2.0, sr=8_000), 8_000))},
        {"prompt": "x", "audio_b64": b64(stereo48.getvalue())},
    ]
    with TestClient(app) as client:
        wait_ready(client)
        r = client.post("/v1/scores", json={"items": items, "components": ["quality"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 2 and len(decoded) == 2


def test_sample_rate_and_channel_limits_are_settings():
    app, _, _ = build(reward_max_sample_rate=16_000, reward_max_channels=1)
    stereo = io.BytesIO()
    soundfile.write(stereo, np.stack([tone(1.0)] * 2, axis=1), SR, format="WAV", subtype="PCM_16")
    with TestClient(app) as client:
        wait_ready(client)
        audio22 = b64(formats.encode_audio(tone(1.0, sr=22_050), 22_050))
        r = client.post("/v1/scores", json={"items": [{"prompt": "x", "audio_b64": audio22}]})
        assert r.status_code == 422 and "outside the accepted 8000..16000 Hz" in r.json()["detail"], r.text
        r = client.post("/v1/scores", json={"items": [{"prompt": "x", "audio_b64": b64(stereo.getvalue())}]})
        assert r.status_code == 422 and "2 channels, at most 1 accepted" in r.json()["detail"], r.text
        assert client.post("/v1/scores", json={"items": [{"prompt": "x", "audio_b64": AUDIO}]}).status_code == 200
    with pytest.raises(ValueError, match="must not exceed"):
        RewardSettings(reward_min_sample_rate=48_001)


def test_malformed_json_and_non_finite_weights_are_422(api):
    client, _, _ = api
    r = client.post("/v1/scores", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    body = b'{"items": [{"prompt": "x", "tokens": [10, 10, 10, 10]}], "weights": {"quality": NaN}}'
    r = client.post("/v1/scores", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_clip_in_a_generation_it_does_not_belong_to_is_422(api):
    client, _, store = api
    clip_id, generation_id = "e" * 32, "f" * 32
    store.objects["musicrl-clips", f"clips/{clip_id}.wav"] = formats.encode_audio(tone(1.0), SR)
    store.objects["musicrl-generations", f"generations/{generation_id}.json"] = b'{"clips": []}'
    r = client.post("/v1/scores", json={"items": [{"prompt": "x", "clip_id": clip_id, "generation_id": generation_id}]})
    assert r.status_code == 422 and "not part of generation" in r.json()["detail"]
    store.objects["musicrl-generations", f"generations/{generation_id}.json"] = b"garbage"
    r = client.post("/v1/scores", json={"items": [{"prompt": "x", "clip_id": clip_id, "generation_id": generation_id}]})
    assert r.status_code == 422 and "not a readable record" in r.json()["detail"]


def test_body_over_the_limit_is_413_with_or_without_content_length(api):
    client, _, _ = api
    big = json.dumps({"items": [{"prompt": "x", "audio_b64": "A" * 2_100_000}]}).encode()
    r = client.post("/v1/scores", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "Too Large" in r.text

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = client.post("/v1/scores", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "Too Large" in r.text


# ----------------------------------------------------------------------------- backpressure, readiness


def test_full_queue_answers_429_with_retry_after():
    gate = threading.Event()
    inner = partial(score_batch, text_encoder=CachedTextEncoder(HashingTextEncoder()))

    def blocked(snapshot, tasks):
        gate.wait(10)
        return inner(snapshot, tasks)

    app, _, _ = build(score=blocked, reward_queue_max_items=3, reward_max_batch_size=1, reward_max_wait_ms=0)
    body = {"items": [{"prompt": "x", "tokens": [10] * 16}] * 2}
    with TestClient(app) as client:
        wait_ready(client)
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(client.post("/v1/scores", json=body))) for _ in range(2)
        ]
        for t in threads:
            t.start()
            time.sleep(0.3)  # the worker holds one clip; three wait: the queue is full
        r = client.post("/v1/scores", json=body)
        gate.set()
        for t in threads:
            t.join(10)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert [x.status_code for x in results] == [200, 200]
        assert 'musicrl_reward_requests_rejected_total{reason="queue_full"} 1.0' in client.get("/metrics").text


def test_not_ready_until_models_load_then_ready():
    source = FakeSource()
    source.fail = "registry has no reward/quality"
    app, _, _ = build(source=source)
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "registry has no reward/quality" in r.json()["reason"]
        r = client.post("/v1/scores", json={"items": [{"prompt": "x", "tokens": [10] * 16}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
        source.fail = None
        wait_ready(client)
        assert client.get("/readyz").json()["model_versions"]["quality"] == "1"


def test_without_a_published_preference_model_the_other_rewards_still_serve():
    source = FakeSource()
    del source.versions["preference"]
    app, _, _ = build(source=source)
    item = {"prompt": "x", "tokens": tokens(3.0)}
    with TestClient(app) as client:
        wait_ready(client)
        r = client.post("/v1/scores", json={"items": [item], "components": ["text_adherence", "quality"]})
        assert r.status_code == 200 and r.json()["model_versions"] == {"text_adherence": "1", "quality": "1"}
        r = client.post("/v1/scores", json={"items": [item]})
        assert r.status_code == 503 and "no preference model" in r.json()["detail"]


# ----------------------------------------------------------------------------- reload


def test_admin_reload_needs_the_token_and_swaps_only_changed_models(api):
    client, source, _ = api
    assert client.post("/v1/admin/reload").status_code == 401
    assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    body = {"items": [{"prompt": "x", "tokens": tokens(5.0)}]}
    before = client.post("/v1/scores", json=body).json()

    source.versions["quality"] = "2"
    r = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.json()["changed"] == {"quality": {"from": "1", "to": "2"}}
    assert source.loads.count(("quality", "2")) == 1 and source.loads.count(("text_adherence", "1")) == 1

    after = client.post("/v1/scores", json=body).json()
    assert after["model_versions"]["quality"] == "2"
    assert after["scores"][0]["quality_mos"] != before["scores"][0]["quality_mos"]
    assert after["scores"][0]["text_adherence"] == before["scores"][0]["text_adherence"]
    metrics = client.get("/metrics").text
    assert 'musicrl_reward_model_version{component="quality",version="2"} 1.0' in metrics
    assert 'component="quality",version="1"' not in metrics


def test_failed_reload_keeps_serving_the_old_models(api):
    client, source, _ = api
    source.fail = "registry unreachable"
    r = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 503 and "registry unreachable" in r.json()["detail"]
    r = client.post("/v1/scores", json={"items": [{"prompt": "x", "tokens": [10] * 16}]})
    assert r.status_code == 200 and r.json()["model_versions"]["quality"] == "1"


def test_admin_route_is_disabled_without_a_token():
    app, _, _ = build()
    app.state.settings = app.state.settings.model_copy(update={"reward_admin_token": None})
    with TestClient(app) as client:
        r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_polling_picks_up_a_new_current_version():
    app, source, _ = build(reward_poll_interval_s=0.05)
    with TestClient(app) as client:
        wait_ready(client)
        source.versions["preference"] = "7"
        deadline = time.monotonic() + 5
        while client.get("/readyz").json()["model_versions"]["preference"] != "7":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = client.post("/v1/scores", json={"items": [{"prompt": "x", "tokens": [10] * 16}]})
        assert r.json()["model_versions"]["preference"] == "7"


def test_metrics_expose_batches_queue_and_latency(api):
    client, _, _ = api
    client.post("/v1/scores", json={"items": [{"prompt": "x", "tokens": [10] * 16}] * 3})
    text = client.get("/metrics").text
    assert "musicrl_reward_batch_size_count" in text
    assert "musicrl_reward_queue_depth" in text
    assert 'musicrl_reward_request_seconds_count{route="/v1/scores",status="200"} 1.0' in text
    assert 'musicrl_reward_clips_scored_total{source="tokens"} 3.0' in text
    assert "process_cpu_seconds_total" in text  # the benchmark's CPU cost per clip
