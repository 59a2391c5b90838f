"""Gateway logic with a fake Triton client and an in-memory object store: validation, errors, records."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from minio.error import S3Error
from prometheus_client import REGISTRY
from urllib3.exceptions import MaxRetryError

from musicrl.audio.formats import decode_audio
from musicrl.schemas.generation import GenerationRecord
from musicrl.storage import ObjectStore
from serving.app import create_app
from serving.errors import UpstreamFailed, UpstreamUnavailable
from serving.schemas import GenerationRequest
from serving.services.embedding import PromptEmbedder
from serving.services.generations import GenerationService, candidate_models, candidate_seeds
from serving.services.triton import Candidate, FramesOutOfRange, ModelSpec
from serving.settings import GatewaySettings

pytestmark = pytest.mark.unit

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 2000
# The write routes need an API key (serving.services.auth); every client here presents this one.
API_KEY = "unit-test-api-key"
API_KEY_ENTRY = f"tests:{hashlib.sha256(API_KEY.encode()).hexdigest()}"


class FakeTextEncoder:
    dim = 384

    def embed(self, texts):
        rows = [np.frombuffer(hashlib.sha512(t.encode()).digest() * 6, dtype=np.uint8)[: self.dim] for t in texts]
        emb = np.stack(rows).astype(np.float32) - 127.5
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


class FakeTriton:
    """Answers like the Triton model, recording calls and how many were in flight at once."""

    def __init__(self, versions=None, failure: Exception | None = None, delay_s: float = 0.01, musicgen=()):
        self.versions = versions or {"generator": "3"}
        self.failure = failure
        self.delay_s = delay_s
        self.calls = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.musicgen = set(musicgen)  # models serving a MusicGen-like policy: text prompt, 4 x 50 frames/s, 32 kHz
        self.max_frames = {}  # model -> longest clip in frames (FramesOutOfRange above)
        self.spec_lookups = []

    def _spec(self, model_name):
        if model_name in self.musicgen:
            return ModelSpec("PROMPT", frame_rate=50.0, sample_rate=32000, num_codebooks=4)
        return ModelSpec(
            "PROMPT_EMBEDDING", frame_rate=SAMPLE_RATE / SAMPLES_PER_FRAME, sample_rate=SAMPLE_RATE, num_codebooks=1
        )

    async def model_spec(self, model_name):
        if self.failure is not None:
            raise self.failure
        if model_name not in self.versions:
            raise UpstreamUnavailable("triton", f"unknown model {model_name}")
        self.spec_lookups.append(model_name)
        return self._spec(model_name)

    def forget(self, model_name):
        pass

    async def generate(self, model_name, prompt, seed, n_frames, temperature, top_k):
        self.calls.append(
            dict(model=model_name, seed=seed, n_frames=n_frames, temperature=temperature, top_k=top_k, prompt=prompt)
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if self.failure is not None:
            raise self.failure
        if model_name not in self.versions:
            raise UpstreamUnavailable("triton", f"unknown model {model_name}")
        if (model_name in self.musicgen) != isinstance(prompt, str):
            raise UpstreamFailed(f"triton {model_name}: wrong prompt input")
        if n_frames > self.max_frames.get(model_name, 10**6):
            raise FramesOutOfRange(model_name, self.max_frames[model_name])
        rng = np.random.default_rng(seed)
        if model_name in self.musicgen:
            return Candidate(
                tokens=rng.integers(0, 2048, (4, n_frames)).astype(np.int64),
                logprobs=-rng.random((4, n_frames)).astype(np.float32),
                audio=(0.3 * np.sin(2 * np.pi * 440 * np.arange(n_frames * 640) / 32000)).astype(np.float32),
                sample_rate=32000,
                policy_version=self.versions[model_name],
                model_name=model_name,
            )
        t = np.arange(n_frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
        return Candidate(
            tokens=rng.integers(0, 100, n_frames).astype(np.int64),
            logprobs=-rng.random(n_frames).astype(np.float32),
            audio=(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
            sample_rate=SAMPLE_RATE,
            policy_version=self.versions[model_name],
            model_name=model_name,
        )

    async def is_ready(self, model_name):
        return self.failure is None

    async def close(self):
        pass


class FakeMinio:
    """The few minio calls the gateway makes, in memory; ``down`` simulates an unreachable store."""

    def __init__(self):
        self.objects: dict[tuple[str, str], tuple[bytes, dict]] = {}
        self.down = False

    def _check(self):
        if self.down:
            raise MaxRetryError(None, "/", "connection refused")

    def put_object(self, bucket, key, data, length, content_type=None, metadata=None):
        self._check()
        self.objects[(bucket, key)] = (data.read(length), {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()})

    def _get(self, bucket, key):
        self._check()
        if (bucket, key) not in self.objects:
            raise S3Error(None, "NoSuchKey", "missing", key, "req", "host")
        return self.objects[(bucket, key)]

    def get_object(self, bucket, key):
        data, headers = self._get(bucket, key)
        return SimpleNamespace(read=lambda: data, headers=headers, close=lambda: None, release_conn=lambda: None)

    def stat_object(self, bucket, key):
        data, headers = self._get(bucket, key)
        return SimpleNamespace(size=len(data), etag='"etag"', content_type="audio/wav", metadata=headers)

    def bucket_exists(self, bucket):
        self._check()
        return True

    def presigned_get_object(self, bucket, key, expires):
        return f"http://store.test/{bucket}/{key}?X-Amz-Expires={int(expires.total_seconds())}"


def make_store() -> ObjectStore:
    store = ObjectStore(GatewaySettings())
    store.client = FakeMinio()
    return store


def make_client(triton=None, store=None, headers=None, **settings) -> TestClient:
    settings.setdefault("gateway_api_keys", API_KEY_ENTRY)
    app = create_app(
        GatewaySettings(gateway_store_timeout_s=2, **settings),
        triton=triton or FakeTriton(),
        store=store or make_store(),
        text_encoder=FakeTextEncoder(),
    )
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"} if headers is None else headers)


@pytest.fixture()
def client():
    with make_client() as c:
        yield c


def test_generation_returns_two_clips_and_stores_audio_and_record(client):
    response = client.post("/v1/generations", json={"prompt": "calm piano", "duration_s": 2, "seed": 7})
    assert response.status_code == 201, response.text
    assert len(response.headers["X-Request-ID"]) == 32
    body = response.json()
    assert len(body["clips"]) == 2
    assert {c["policy_version"] for c in body["clips"]} == {"3"}
    assert len({c["seed"] for c in body["clips"]}) == 2
    for clip in body["clips"]:
        assert clip["duration_s"] == pytest.approx(2.0)
        assert clip["sample_rate"] == SAMPLE_RATE and clip["format"] == "wav"
        assert clip["audio_url"].startswith("http://store.test/musicrl-clips/clips/")

    store: ObjectStore = client.app.state.store
    raw = json.loads(store.client.objects[("musicrl-generations", f"generations/{body['generation_id']}.json")][0])
    assert raw["schema"] == "generation.v1"
    record = GenerationRecord.model_validate(raw)
    assert record.prompt == "calm piano" and record.params.temperature == 0.99 and record.params.seed == 7
    assert [c.seed for c in record.clips] == candidate_seeds(7, 2)
    assert all(len(c.tokens) == len(c.logprobs) == 16 for c in record.clips)
    wave, sr = decode_audio(store.client.objects[("musicrl-clips", record.clips[0].audio_key)][0])
    assert sr == SAMPLE_RATE and len(wave) == 2 * SAMPLE_RATE


def test_records_and_clips_can_be_read_back_in_every_format(client):
    body = client.post("/v1/generations", json={"prompt": 'jazz «trio» "live"', "n": 3, "duration_s": 1.5}).json()
    record = client.get(f"/v1/generations/{body['generation_id']}").json()
    assert record["schema"] == "generation.v1" and len(record["clips"]) == 3
    clip_id = body["clips"][1]["clip_id"]
    info = client.get(f"/v1/clips/{clip_id}").json()
    assert info["generation_id"] == body["generation_id"] and info["index"] == 1
    assert info["prompt"] == 'jazz «trio» "live"'
    for fmt, media in [("wav", "audio/wav"), ("flac", "audio/flac"), ("ogg", "audio/ogg"), ("mp3", "audio/mpeg")]:
        audio = client.get(f"/v1/clips/{clip_id}/audio", params={"format": fmt})
        assert audio.status_code == 200 and audio.headers["content-type"] == media
        wave, sr = decode_audio(audio.content)
        assert sr == SAMPLE_RATE
        assert abs(len(wave) / sr - 1.5) < 0.1  # mp3 and ogg pad a little


def test_seed_makes_candidates_reproducible_and_distinct():
    assert candidate_seeds(42, 4) == candidate_seeds(42, 4)
    assert len(set(candidate_seeds(42, 4))) == 4
    assert candidate_seeds(42, 2) != candidate_seeds(43, 2)
    assert all(0 <= s < 2**31 for s in candidate_seeds(2**61, 4))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n\t"}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": "ok", "n": 0}, "n"),
        ({"prompt": "ok", "n": 5}, "n"),
        ({"prompt": "ok", "duration_s": 0}, "duration_s"),
        ({"prompt": "ok", "duration_s": 0.5}, "duration_s"),
        ({"prompt": "ok", "duration_s": 31}, "duration_s"),
        ({"prompt": "ok", "temperature": 0}, "temperature"),
        ({"prompt": "ok", "temperature": -1}, "temperature"),
        ({"prompt": "ok", "temperature": 1.1754943508222875e-38}, "temperature"),  # NaN log-probs in float32
        ({"prompt": "ok", "temperature": 0.009}, "temperature"),
        ({"prompt": "ok", "temperature": 2.5}, "temperature"),
        ({"prompt": "ok", "top_k": -1}, "top_k"),
        ({"prompt": "ok", "seed": -3}, "seed"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "ok", "colour": "blue"}, "colour"),
        ({}, "prompt"),
    ],
)
def test_bad_requests_get_422_with_the_field_and_a_message(client, body, field):
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in [str(part) for part in d["loc"]] and d["msg"] for d in detail), detail
    assert response.json()["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"prompt": "ok", "duration_s": NaN}', "duration_s"),
        (b'{"prompt": "ok", "duration_s": Infinity}', "duration_s"),
        (b'{"prompt": "ok", "temperature": Infinity}', "temperature"),
        (b'{"prompt": "ok", "temperature": NaN}', "temperature"),
        (b'{"prompt": "ok", "seed": 1.5}', "seed"),
        (b'{"prompt": "ok", "n": "many"}', "n"),
    ],
)
def test_non_finite_and_mistyped_numbers_get_422(client, raw, field):
    response = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert any(field in [str(part) for part in d["loc"]] for d in response.json()["detail"])


def test_unparseable_bodies_get_422(client):
    assert (
        client.post("/v1/generations", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert (
        client.post("/v1/generations", content=b"\xff\xfe", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.post("/v1/generations", json=["prompt"]).status_code == 422


def test_the_500_character_prompt_is_accepted(client):
    assert client.post("/v1/generations", json={"prompt": "é" * 500, "duration_s": 1}).status_code == 201


def chunked(data: bytes, size: int = 1024):
    """A body sent without Content-Length (the test client streams it in chunks)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_body_over_the_limit_is_413_before_it_is_parsed_with_or_without_content_length():
    triton = FakeTriton()
    with make_client(triton=triton, gateway_max_body_bytes=4096) as c:
        big = json.dumps({"prompt": "x" * 5000, "duration_s": 1}).encode()
        for content, detail in [
            (big, f"request body of {len(big)} bytes is above the limit of 4096 bytes"),  # Content-Length
            (chunked(big), "request body is above the limit of 4096 bytes"),  # counted while it is read
        ]:
            response = c.post("/v1/generations", content=content, headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
            assert response.json() == {"detail": detail, "request_id": response.headers["X-Request-ID"]}
            assert response.headers["connection"] == "close"
        # Not JSON at all: the limit answers before the body is parsed.
        assert c.post("/v1/generations", content=b"\xff" * 5000).status_code == 413
        assert triton.calls == []
        # Under the limit, in one piece or in chunks, the request is served as before.
        ok = json.dumps({"prompt": "y" * 1000, "duration_s": 1}).encode()
        for content in (ok, chunked(ok, 100)):
            response = c.post("/v1/generations", content=content, headers={"content-type": "application/json"})
            assert response.status_code == 201, response.text
        assert c.get("/healthz").status_code == 200


def test_the_default_body_limit_leaves_room_for_the_longest_prompt(client):
    assert GatewaySettings().gateway_max_body_bytes == 65536
    # 1,000 characters outside the BMP, each sent as a \u surrogate pair: the largest legitimate body, 12 KB.
    body = json.dumps({"prompt": "\U0001f3b5" * 1000, "duration_s": 1}).encode()
    assert 12_000 < len(body) < 13_000
    response = client.post("/v1/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text
    assert client.post("/v1/generations", json={"prompt": "x" * 70_000}).status_code == 413
    operations = client.get("/openapi.json").json()["paths"]
    assert "413" in operations["/v1/generations"]["post"]["responses"]


def test_unknown_and_malformed_ids(client):
    missing = "0" * 32
    assert client.get(f"/v1/generations/{missing}").status_code == 404
    assert client.get(f"/v1/clips/{missing}").status_code == 404
    assert client.get(f"/v1/clips/{missing}/audio").status_code == 404
    assert client.get("/v1/generations/not-an-id").status_code == 422
    assert client.get("/v1/clips/../etc").status_code in (404, 422)
    body = client.post("/v1/generations", json={"prompt": "x", "duration_s": 1}).json()
    assert client.get(f"/v1/clips/{body['clips'][0]['clip_id']}/audio", params={"format": "aiff"}).status_code == 422


def test_triton_unavailable_gives_503_with_retry_after():
    with make_client(triton=FakeTriton(failure=UpstreamUnavailable("triton", "connection refused"))) as c:
        response = c.post("/v1/generations", json={"prompt": "x"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert "triton" in response.json()["detail"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["triton"] is False


def test_triton_error_gives_502():
    with make_client(triton=FakeTriton(failure=UpstreamFailed("sampling failed: boom"))) as c:
        response = c.post("/v1/generations", json={"prompt": "x"})
        assert response.status_code == 502 and "boom" in response.json()["detail"]


def test_object_store_unreachable_gives_503():
    store = make_store()
    with make_client(store=store) as c:
        generation = c.post("/v1/generations", json={"prompt": "x", "duration_s": 1}).json()
        store.client.down = True
        for response in (
            c.post("/v1/generations", json={"prompt": "x", "duration_s": 1}),
            c.get(f"/v1/generations/{generation['generation_id']}"),
            c.get(f"/v1/clips/{generation['clips'][0]['clip_id']}/audio"),
            c.get("/readyz"),
        ):
            assert response.status_code == 503 and response.headers["Retry-After"] == "5", response.text


def test_health_readiness_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "triton": True, "object_store": True}
    labels = {"service": "gateway", "method": "POST", "route": "/v1/generations"}
    before = REGISTRY.get_sample_value("musicrl_http_request_duration_seconds_count", labels) or 0
    client.post("/v1/generations", json={"prompt": "x", "duration_s": 1})
    assert REGISTRY.get_sample_value("musicrl_http_request_duration_seconds_count", labels) == before + 1
    text = client.get("/metrics").text
    assert "musicrl_gateway_clips_total" in text and "musicrl_gateway_store_seconds" in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/generations",
        "/v1/generations/{generation_id}",
        "/v1/clips/{clip_id}",
        "/v1/clips/{clip_id}/audio",
    } <= set(paths)


def test_openapi_states_the_configured_limits_and_the_gateway_keeps_them():
    limits = dict(
        gateway_max_duration_s=3.0,
        gateway_min_duration_s=0.5,
        gateway_max_prompt_chars=20,
        gateway_max_candidates=3,
        gateway_max_temperature=1.5,
    )
    with make_client(**limits) as c:
        request = c.get("/openapi.json").json()["components"]["schemas"]["GenerationRequest"]["properties"]
        number = {
            field: next(b for b in request[field]["anyOf"] if b["type"] in ("number", "integer"))
            for field in ("duration_s", "n", "temperature")
        }
        assert (number["duration_s"]["minimum"], number["duration_s"]["maximum"]) == (0.5, 3.0)
        assert number["n"]["maximum"] == 3 and number["temperature"]["maximum"] == 1.5
        assert request["prompt"]["maxLength"] == 20 and request["prompt"]["pattern"] == r"\S"
        # What the document allows is served; one step beyond each bound is a 422 naming the field.
        edge = {"prompt": "x" * 20, "duration_s": 3.0, "n": 3, "temperature": 1.5}
        assert c.post("/v1/generations", json=edge).status_code == 201
        for field, value in (
            ("prompt", "x" * 21),
            ("prompt", "   "),
            ("duration_s", 3.01),
            ("duration_s", 0.49),
            ("n", 4),
            ("temperature", 1.51),
        ):
            response = c.post("/v1/generations", json={**edge, field: value})
            assert response.status_code == 422 and field in response.text, (field, value, response.text)


@pytest.mark.parametrize(
    ("seed", "status"), [(7.0, 201), (True, 422), ("7", 422), (7.5, 422), ((1 << 53) - 1, 201), (1 << 53, 422)]
)
def test_integers_are_json_integers(client, seed, status):
    # A JSON Schema integer may be written 7.0; a boolean or a string is not one (pydantic's lax mode takes both).
    response = client.post("/v1/generations", json={"prompt": "x", "duration_s": 1, "seed": seed})
    assert response.status_code == status, response.text


def test_request_id_is_propagated(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


def test_listening_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "trophy-a" in page.text and "/static/page.js" in page.text
    assert "/v1/feedback" in client.get("/static/page.js").text


def _service(triton, **settings) -> GenerationService:
    return GenerationService(GatewaySettings(**settings), triton, make_store(), FakeTextEncoder())


def test_candidates_reach_triton_concurrently():
    triton = FakeTriton(delay_s=0.05)
    response = asyncio.run(_service(triton).create(GenerationRequest(prompt="x", n=4, duration_s=1)))
    assert triton.max_in_flight == 4 and len(response.clips) == 4
    assert {c["n_frames"] for c in triton.calls} == {8}


def test_experiment_splits_candidates_between_current_and_challenger():
    triton = FakeTriton(versions={"generator": "3", "generator_challenger": "4"})
    service = _service(triton, gateway_experiment_name="v4-vs-v3")
    response = asyncio.run(service.create(GenerationRequest(prompt="x", duration_s=1, seed=1)))
    assert response.experiment == "v4-vs-v3"
    assert sorted(c.policy_version for c in response.clips) == ["3", "4"]
    # Positions of the arms vary with the seed, so neither arm always plays first.
    firsts = {candidate_models(service.settings, seed, 2)[1][0] for seed in range(20)}
    assert firsts == {"generator", "generator_challenger"}


def test_experiment_share_zero_and_missing_challenger_fall_back_to_current():
    assert candidate_models(GatewaySettings(gateway_experiment_name="e", gateway_experiment_share=0.0), 5, 2) == (
        None,
        ["generator", "generator"],
    )
    triton = FakeTriton(versions={"generator": "3"})
    service = _service(triton, gateway_experiment_name="e")
    before = REGISTRY.get_sample_value("musicrl_gateway_challenger_fallbacks_total")
    response = asyncio.run(service.create(GenerationRequest(prompt="x", duration_s=1)))
    assert response.experiment is None and [c.policy_version for c in response.clips] == ["3", "3"]
    assert REGISTRY.get_sample_value("musicrl_gateway_challenger_fallbacks_total") == before + 1


class CountingEncoder(FakeTextEncoder):
    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    def embed(self, texts):
        self.batches.append(len(texts))
        if self.fail:
            raise RuntimeError("encoder broke")
        time.sleep(0.02)
        return super().embed(texts)


def test_prompts_of_concurrent_requests_are_embedded_together():
    encoder = CountingEncoder()
    embedder = PromptEmbedder(encoder)

    async def many():
        return await asyncio.gather(*(embedder.embed(f"prompt {i}") for i in range(10)))

    vectors = asyncio.run(many())
    assert sum(encoder.batches) == 10 and max(encoder.batches) > 1
    np.testing.assert_allclose(vectors[3], FakeTextEncoder().embed(["prompt 3"])[0])
    assert asyncio.run(embedder.embed("alone")).shape == (384,)


def test_an_encoder_error_reaches_every_waiting_request():
    embedder = PromptEmbedder(CountingEncoder(fail=True))

    async def many():
        return await asyncio.gather(*(embedder.embed("x") for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(many()))
