"""The gateway in front of a MusicGen model (issue 15), with the fake Triton of test_serving_gateway.

What a model takes comes from Triton (``ModelSpec``): the text instead of the embedding, N_FRAMES at the
model's own 50 frames/s, [K][T] tokens in the record, 32 kHz audio through the store and every format.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from test_serving_gateway import SAMPLE_RATE, FakeTriton, _service, make_client

from musicrl.audio.formats import decode_audio
from musicrl.schemas.generation import GenerationRecord
from serving.schemas import GenerationRequest
from serving.services.triton import ModelSpec

pytestmark = pytest.mark.unit


def test_musicgen_model_gets_the_text_and_its_own_frames_and_the_record_holds_k_by_t_tokens():
    triton = FakeTriton(musicgen={"generator"})
    with make_client(triton=triton) as client:
        response = client.post("/v1/generations", json={"prompt": "calm piano", "duration_s": 1.5, "seed": 3})
        assert response.status_code == 201, response.text
        body = response.json()
        assert [c["prompt"] for c in triton.calls] == ["calm piano", "calm piano"]
        assert {c["n_frames"] for c in triton.calls} == {75}  # 1.5 s at 50 frames/s
        for clip in body["clips"]:
            assert clip["sample_rate"] == 32000 and clip["num_codebooks"] == 4
            assert clip["duration_s"] == pytest.approx(1.5)

        store = client.app.state.store
        raw = json.loads(store.client.objects[("musicrl-generations", f"generations/{body['generation_id']}.json")][0])
        assert [len(row) for row in raw["clips"][0]["tokens"]] == [75] * 4  # nested [K][T] in the stored JSON
        record = GenerationRecord.model_validate(raw)
        for clip in record.clips:
            assert clip.num_codebooks == 4 and clip.codes().shape == clip.code_logprobs().shape == (4, 75)
        assert (
            client.get(f"/v1/generations/{body['generation_id']}").json()["clips"][1]["tokens"]
            == raw["clips"][1]["tokens"]
        )

        clip_id = body["clips"][0]["clip_id"]
        assert client.get(f"/v1/clips/{clip_id}").json()["num_codebooks"] == 4
        for fmt in ("wav", "flac", "ogg", "mp3"):
            audio = client.get(f"/v1/clips/{clip_id}/audio", params={"format": fmt})
            assert audio.status_code == 200, (fmt, audio.text)
            wave, rate = decode_audio(audio.content)
            assert rate == 32000, fmt
            assert abs(len(wave) / rate - 1.5) < (1e-9 if fmt in ("wav", "flac") else 0.1), fmt


def test_default_model_keeps_the_embedding_and_flat_tokens():
    triton = FakeTriton()
    with make_client(triton=triton) as client:
        body = client.post("/v1/generations", json={"prompt": "x", "duration_s": 2}).json()
        assert all(isinstance(c["prompt"], np.ndarray) and c["n_frames"] == 16 for c in triton.calls)
        record = client.get(f"/v1/generations/{body['generation_id']}").json()
        assert all(isinstance(t, int) for t in record["clips"][0]["tokens"])  # [T], as before issue 15
        assert body["clips"][0]["num_codebooks"] == 1 and body["clips"][0]["sample_rate"] == SAMPLE_RATE


def test_a_clip_longer_than_the_model_makes_is_a_422_naming_duration_s():
    triton = FakeTriton(musicgen={"generator"})
    triton.max_frames["generator"] = 124
    with make_client(triton=triton) as client:
        response = client.post("/v1/generations", json={"prompt": "x", "duration_s": 3})
        assert response.status_code == 422, response.text
        assert "duration_s" in response.text and "2.48 s at most" in response.text
        assert client.post("/v1/generations", json={"prompt": "x", "duration_s": 2}).status_code == 201


def test_experiment_arms_of_different_kinds_each_get_what_they_take():
    triton = FakeTriton(versions={"generator": "3", "generator_challenger": "4"}, musicgen={"generator_challenger"})
    service = _service(triton, gateway_experiment_name="musicgen-vs-default")
    response = asyncio.run(service.create(GenerationRequest(prompt="duel", duration_s=1, seed=1)))
    assert response.experiment == "musicgen-vs-default"
    by_model = {c["model"]: c for c in triton.calls}
    assert by_model["generator_challenger"]["prompt"] == "duel" and by_model["generator_challenger"]["n_frames"] == 50
    assert isinstance(by_model["generator"]["prompt"], np.ndarray) and by_model["generator"]["n_frames"] == 8
    assert sorted((c.sample_rate, c.num_codebooks) for c in response.clips) == [(SAMPLE_RATE, 1), (32000, 4)]


class CachingTriton(FakeTriton):
    """Caches specs like the real client, so a model that changes kind is first sent the wrong input."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cache: dict[str, ModelSpec] = {}

    async def model_spec(self, model_name):
        if model_name not in self.cache:
            self.cache[model_name] = await super().model_spec(model_name)
        return self.cache[model_name]

    def forget(self, model_name):
        self.cache.pop(model_name, None)


def test_a_model_that_changed_kind_is_asked_again_and_served():
    triton = CachingTriton()
    with make_client(triton=triton) as client:
        assert client.post("/v1/generations", json={"prompt": "x", "duration_s": 1}).status_code == 201
        triton.musicgen.add("generator")  # a MusicGen version and its config loaded under the same name
        response = client.post("/v1/generations", json={"prompt": "x", "duration_s": 1})
        assert response.status_code == 201, response.text
        assert {c["num_codebooks"] for c in response.json()["clips"]} == {4}
        assert triton.cache["generator"].takes_text
