"""MusicGen served end to end (issue 15): a tiny random MusicGen installed into the real Triton, the gateway on
real HTTP in front of it, SeaweedFS storing 32 kHz clips and Kafka taking the vote.

The gateway is given nothing about MusicGen: it learns from Triton that the model takes the prompt text and
counts 50 frames a second (serving.services.triton.ModelSpec). The model is installed under its own Triton
name, so other tests deploying ``generator`` cannot change what this module sees.
"""

from __future__ import annotations

import json
import uuid

import httpx
import numpy as np
import pytest
from kafka import KafkaConsumer
from pretrained_helpers import one_thread_per_module, tiny_musicgen  # noqa: F401 - the fixture is autouse here
from servers import serve_in_thread

from feedback_consumer.processing import Message, process_chunk
from musicrl.audio.formats import decode_audio
from musicrl.buffer import clip_codes, parquet_to_table, rows_to_parquet
from musicrl.models.musicgen import MusicgenPolicy
from musicrl.schemas.generation import GenerationRecord, generation_key
from serving.app import create_app
from serving.client import api_key_headers
from serving.model_repository import BatchingConfig, install_version, load
from serving.services.generations import candidate_seeds
from serving.settings import GatewaySettings

pytestmark = pytest.mark.e2e

MODEL_NAME = "musicgen_e2e_generator"
DURATION_S = 1.0
PROMPT = "calm piano melody with soft drums"


@pytest.fixture(scope="module")
def musicgen_checkpoint(tmp_path_factory):
    return tiny_musicgen(tmp_path_factory.mktemp("musicgen"), guidance_scale=3.0)


@pytest.fixture(scope="module")
def served_model(stack, musicgen_checkpoint) -> str:
    batching = BatchingConfig(
        max_batch_size=8, preferred_batch_sizes=[2, 4, 8], max_queue_delay_us=5_000, instance_count=1
    )
    install_version(stack.triton_repo, 1, musicgen_checkpoint, MODEL_NAME, batching)
    load(stack.triton_http_url, MODEL_NAME)
    return MODEL_NAME


@pytest.fixture(scope="module")
def gateway_settings(stack, served_model, object_store) -> GatewaySettings:
    return stack.settings_for(GatewaySettings, triton_model_name=served_model, gateway_store_timeout_s=5)


@pytest.fixture(scope="module")
def http(gateway_settings, stack):
    with (
        serve_in_thread(create_app(gateway_settings)) as url,
        httpx.Client(base_url=url, timeout=120, headers=api_key_headers(stack.api_key)) as client,
    ):
        yield client


def test_a_pair_of_32_khz_musicgen_clips_with_k_by_t_tokens_downloads_and_takes_a_vote(
    http, object_store, gateway_settings, musicgen_checkpoint
):
    response = http.post(
        "/v1/generations", json={"prompt": PROMPT, "duration_s": DURATION_S, "seed": 5, "user_id": "e2e-listener"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert len(body["clips"]) == 2 and body["vote_token"]
    for clip in body["clips"]:
        assert (clip["sample_rate"], clip["num_codebooks"], clip["policy_version"]) == (32000, 4, "1")
        assert clip["duration_s"] == pytest.approx(DURATION_S)

    record = GenerationRecord.model_validate(
        object_store.get_json(gateway_settings.bucket_generations, generation_key(body["generation_id"]))
    )
    for clip in record.clips:
        assert clip.codes().shape == clip.code_logprobs().shape == (4, 50)  # [K, T] at 50 frames/s
        assert np.all(clip.code_logprobs() <= 0) and clip.sample_rate == 32000

    # What Triton served is what the checkpoint samples in-process for the same prompt and seeds.
    policy = MusicgenPolicy.load(musicgen_checkpoint)
    cond = policy.condition([PROMPT])
    local = [
        policy.sample(cond, 50, temperature=0.99, top_k=0, seeds=[seed])[0][0].tolist()
        for seed in candidate_seeds(5, 2)
    ]
    assert [clip.tokens for clip in record.clips] == local

    for fmt in ("wav", "flac", "ogg", "mp3"):
        audio = http.get(body["clips"][0]["download_url"], params={"format": fmt})
        assert audio.status_code == 200, (fmt, audio.text)
        wave, rate = decode_audio(audio.content)
        assert rate == 32000, fmt
        assert abs(len(wave) / rate - DURATION_S) < (1e-9 if fmt in ("wav", "flac") else 0.1), fmt
        assert np.abs(wave).max() > 0, fmt
    presigned = httpx.get(body["clips"][1]["audio_url"], timeout=30)
    assert presigned.status_code == 200 and decode_audio(presigned.content)[1] == 32000

    # The vote lands on the preferences topic and joins into a buffer row of [K, T] tokens.
    clip_a, clip_b = body["clips"]
    vote = {
        "event_id": uuid.uuid4().hex,
        "generation_id": body["generation_id"],
        "clip_a_id": clip_a["clip_id"],
        "clip_b_id": clip_b["clip_id"],
        "choice": "b",
        "listen_a_s": DURATION_S,
        "listen_b_s": DURATION_S,
        "user_id": "e2e-listener",
        "vote_token": body["vote_token"],
    }
    accepted = http.post("/v1/feedback", json=vote)
    assert accepted.status_code == 202, accepted.text
    consumer = KafkaConsumer(
        gateway_settings.topic_preferences,
        bootstrap_servers=gateway_settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
        enable_auto_commit=False,
    )
    try:
        messages = [
            Message(m.partition, m.offset, m.key, m.value)
            for m in consumer
            if json.loads(m.value)["event_id"] == vote["event_id"]
        ]
    finally:
        consumer.close()
    assert len(messages) == 1, "the vote never reached the preferences topic"
    rows = process_chunk(messages, set(), lambda ids: {g: record for g in ids}, 0.0).rows
    row = parquet_to_table(rows_to_parquet(rows)).to_pylist()[0]
    assert row["choice"] == "b" and (row["codebooks_a"], row["codebooks_b"]) == (4, 4)
    assert clip_codes(row["tokens_b"], row["codebooks_b"]).tolist() == record.clips[1].tokens


def test_a_clip_longer_than_the_model_makes_is_refused_with_422(http):
    # The tiny decoder has 128 positions: 124 frames (2.48 s) at most, below the gateway's own 30 s limit.
    response = http.post("/v1/generations", json={"prompt": PROMPT, "duration_s": 3.0})
    assert response.status_code == 422, response.text
    assert "duration_s" in response.text and "2.48 s at most" in response.text
