"""The gateway on the real stack: Triton serving a generator, SeaweedFS storing clips, real HTTP.

A small randomly initialised generator is installed under its own Triton model
name so other tests deploying ``generator`` cannot change what this module sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from fastapi.testclient import TestClient
from kafka import KafkaConsumer
from ops_helpers import seed_ops_history
from servers import serve_in_thread
from tritonclient.utils import InferenceServerException

from musicrl.audio import codec
from musicrl.audio.formats import decode_audio
from musicrl.models.generator import Generator, GeneratorConfig, load_generator, save_generator
from musicrl.schemas.generation import GenerationRecord, generation_key
from musicrl.stack.processes import free_port
from musicrl.text import load_text_encoder
from serving.app import create_app
from serving.client import api_key_headers
from serving.model_repository import BatchingConfig, install_version, load
from serving.services.generations import candidate_seeds
from serving.settings import GatewaySettings

pytestmark = pytest.mark.e2e

MODEL_NAME = "serving_e2e_generator"
DURATION_S = 2.0
PROMPTS = [
    "calm lo-fi piano with soft drums",
    "UPBEAT JAZZ TRIO, WALKING BASS!!!",
    "a \"quoted\" ballad with 'single quotes' and a backslash \\",
    "música tranquila con guitarra española y cajón",
    "日本の伝統的な琴の音楽、ゆっくり",
    "موسيقى عربية هادئة مع عود",
    "🎹🥁 emoji groove 🎸🎺",
    "Ambient\nwith\nnewlines\tand\ttabs",
    "x",
    "techno 128 bpm, four on the floor; dark & driving <synth>",
    "Ünïcödé çhàrs: naïve café déjà vu",
    "string quartet in D minor, sad, slow (adagio)",
    '{"json": "like", "prompt": [1, 2]}',
    "heavy metal guitar riffs -- distorted -- fast",
    "lullaby for a baby, music box, very soft",
    "Ελληνική μουσική με μπουζούκι",
    "reggae with offbeat skank guitar and dub delay",
    "chiptune 8-bit video game theme",
    "orchestral film score, epic brass, timpani rolls, choir " * 1,
    ("a long prompt about an evolving cinematic soundscape with strings, " * 8)[:500],
]


@pytest.fixture(scope="module")
def generator_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = GeneratorConfig(n_layers=2, n_heads=2, d_model=64, max_frames=256)
    return str(save_generator(Generator(config), tmp_path_factory.mktemp("generator"), {"note": "random init, tests"}))


@pytest.fixture(scope="module")
def served_model(stack, generator_checkpoint) -> str:
    # One instance keeps (re)loads quick on a shared machine; one per core is the default (unit-tested).
    batching = BatchingConfig(
        max_batch_size=16, preferred_batch_sizes=[4, 8, 16], max_queue_delay_us=20_000, instance_count=1
    )
    install_version(stack.triton_repo, 1, generator_checkpoint, MODEL_NAME, batching)
    load(stack.triton_http_url, MODEL_NAME)
    return MODEL_NAME


@pytest.fixture(scope="module")
def gateway_settings(stack, served_model, object_store) -> GatewaySettings:
    return stack.settings_for(GatewaySettings, triton_model_name=served_model, gateway_store_timeout_s=5)


@pytest.fixture(scope="module")
def gateway_url(gateway_settings):
    """The gateway on uvicorn in a thread, on a free port: real HTTP for httpx and for Chromium."""
    with serve_in_thread(create_app(gateway_settings)) as url:
        yield url


@pytest.fixture(scope="module")
def auth(stack) -> dict[str, str]:
    """The stack's development API key (``stack.settings_for`` gives the gateway its hash)."""
    return api_key_headers(stack.api_key)


@pytest.fixture()
def http(gateway_url, auth):
    with httpx.Client(base_url=gateway_url, timeout=120, follow_redirects=True, headers=auth) as client:
        yield client


def test_ready_and_metrics(http):
    assert http.get("/readyz").json() == {"status": "ready", "triton": True, "object_store": True}
    assert "musicrl_http_request_duration_seconds" in http.get("/metrics").text


def test_pairs_for_varied_prompts_decode_in_every_format(http, object_store, gateway_settings):
    assert len(PROMPTS) == 20 and max(len(p) for p in PROMPTS) == 500
    for prompt in PROMPTS:
        response = http.post("/v1/generations", json={"prompt": prompt, "duration_s": DURATION_S})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["prompt"] == prompt and len(body["clips"]) == 2
        assert response.headers["x-request-id"]

        record = GenerationRecord.model_validate(
            object_store.get_json(gateway_settings.bucket_generations, generation_key(body["generation_id"]))
        )
        assert record.prompt == prompt and record.params.temperature == 0.99
        for clip, stored in zip(body["clips"], record.clips):
            assert clip["policy_version"] == stored.policy_version == "1"
            assert clip["sample_rate"] == codec.SAMPLE_RATE and clip["duration_s"] == pytest.approx(DURATION_S)
            assert len(stored.tokens) == len(stored.logprobs) == codec.frames_for(DURATION_S)
            assert all(lp <= 0 for lp in stored.logprobs)
            for fmt in ("wav", "flac", "ogg", "mp3"):
                audio = http.get(clip["download_url"], params={"format": fmt})
                assert audio.status_code == 200, (fmt, audio.text)
                wave, sample_rate = decode_audio(audio.content)
                assert sample_rate == codec.SAMPLE_RATE
                # Lossy codecs add a few ms of encoder delay and padding.
                assert abs(len(wave) / sample_rate - DURATION_S) < (1e-9 if fmt in ("wav", "flac") else 0.1), fmt
        assert {c.seed for c in record.clips} == {c["seed"] for c in body["clips"]} and len(record.clips) == 2

    # The presigned URL and the metadata routes point at the same audio.
    clip = body["clips"][0]
    presigned = httpx.get(clip["audio_url"], timeout=30)
    assert presigned.status_code == 200 and decode_audio(presigned.content)[1] == codec.SAMPLE_RATE
    info = http.get(f"/v1/clips/{clip['clip_id']}").json()
    assert info["generation_id"] == body["generation_id"] and info["prompt"] == PROMPTS[-1]
    assert http.get(f"/v1/generations/{body['generation_id']}").json()["schema"] == "generation.v1"


def test_triton_batches_concurrent_requests_and_rows_stay_independent(
    gateway_url, stack, served_model, generator_checkpoint, auth
):
    async def burst():
        async with httpx.AsyncClient(base_url=gateway_url, timeout=120, headers=auth) as client:
            solo = await client.post("/v1/generations", json={"prompt": "solo", "duration_s": DURATION_S, "seed": 11})
            bodies = [{"prompt": f"prompt {i}", "duration_s": DURATION_S, "seed": 100 + i} for i in range(15)]
            bodies.append({"prompt": "solo", "duration_s": DURATION_S, "seed": 11})
            return solo, await asyncio.gather(*(client.post("/v1/generations", json=b) for b in bodies))

    triton = triton_http.InferenceServerClient(stack.triton_http_url)
    before = _batch_counts(triton, served_model)
    solo, responses = asyncio.run(burst())
    after = _batch_counts(triton, served_model)
    triton.close()
    assert all(r.status_code == 201 for r in responses)
    formed = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert any(size > 1 and count > 0 for size, count in formed.items()), formed

    # A clip depends only on its own seed and prompt, not on the batch it was sampled in.
    def tokens(response):
        return [
            c["tokens"]
            for c in httpx.get(f"{gateway_url}/v1/generations/{response.json()['generation_id']}").json()["clips"]
        ]

    assert tokens(solo) == tokens(responses[-1])

    # And the served clip is what the checkpoint samples in-process for the same prompt and seed.
    model, _ = load_generator(generator_checkpoint)
    cond = torch.from_numpy(load_text_encoder("minilm").embed(["solo"]))
    local = [
        model.sample(cond, codec.frames_for(DURATION_S), temperature=0.99, seeds=[seed])[0][0].tolist()
        for seed in candidate_seeds(11, 2)
    ]
    assert tokens(solo) == local


def _batch_counts(client, model_name: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model_name)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_unreachable_triton_and_store_answer_503(gateway_settings, auth):
    dead = f"127.0.0.1:{free_port()}"
    no_triton = gateway_settings.model_copy(update={"triton_grpc_url": dead, "gateway_triton_timeout_s": 5})
    no_store = gateway_settings.model_copy(update={"s3_endpoint": dead, "gateway_store_timeout_s": 2})
    for settings in (no_triton, no_store):
        with TestClient(create_app(settings), headers=auth) as client:
            start = time.monotonic()
            response = client.post("/v1/generations", json={"prompt": "x", "duration_s": 1})
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
            assert time.monotonic() - start < 15
            assert client.get("/readyz").status_code == 503


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


DOCS = Path(__file__).resolve().parents[2] / "docs"
# Lit pixels of a canvas (alpha > 0): a drawn waveform has many, a flat line a few hundred.
LIT_PIXELS = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """docs/NAME with MUSICRL_UPDATE_SCREENSHOTS=1 (to refresh the documentation's pictures), else a temporary file."""
    return DOCS / name if os.environ.get("MUSICRL_UPDATE_SCREENSHOTS") == "1" else tmp_path / name


def test_listening_page_in_chromium(gateway_url, gateway_settings, tmp_path):
    """Type a prompt, see both waveforms, play A with its button, give the trophy to B: the page says what was
    recorded and the vote reaches Kafka."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(gateway_url)
            page.fill("#prompt", "gentle harp arpeggios «à la française»")
            page.fill("#duration", "2")
            with page.expect_response(lambda r: r.url.endswith("/v1/generations")) as generated:
                page.click("#generate")
            generation = generated.value.json()
            assert generated.value.status == 201, generation
            page.wait_for_selector("#pair:not([hidden])")
            for side in ("a", "b"):
                page.wait_for_function(f"document.querySelector('#audio-{side}').readyState >= 1")
                assert page.eval_on_selector(f"#audio-{side}", "a => a.duration") == pytest.approx(DURATION_S, abs=0.01)
                # The waveform is drawn from the decoded audio (Web Audio API), not a placeholder line.
                page.wait_for_selector(f"#wave-{side}[data-drawn='true']")
                assert page.eval_on_selector(f"#wave-{side}", LIT_PIXELS) > 2000
                assert page.is_enabled(f"#play-{side}")
            assert page.text_content("#time-a").strip() == "0:00 / 0:02"
            page.click("#play-a")
            page.wait_for_function("document.querySelector('#audio-a').currentTime > 0.2")
            assert "Pause" in page.text_content("#play-a")
            page.click("#play-b")  # one clip at a time: B starts, A pauses
            page.wait_for_function(
                "document.querySelector('#audio-a').paused && !document.querySelector('#audio-b').paused"
            )
            page.wait_for_function("document.querySelector('#audio-b').currentTime > 0.2")

            with page.expect_request(lambda r: r.url.endswith("/v1/feedback")) as voted:
                page.click("#trophy-b")
            page.wait_for_function("document.querySelector('#feedback-status').textContent.startsWith('Thanks')")
            vote = json.loads(voted.value.post_data)
            assert page.is_disabled("#trophy-a") and page.is_disabled("#tie")
            page.wait_for_selector("#result:not([hidden])")
            assert "trophy to clip B" in page.text_content("#result-text")
            assert page.eval_on_selector("#clip-b", "c => c.classList.contains('chosen')")
            assert not page.eval_on_selector("#clip-a", "c => c.classList.contains('chosen')")
            page.screenshot(path=str(screenshot_path(tmp_path, "listening_page.png")), full_page=True)
        finally:
            browser.close()

    assert vote["generation_id"] == generation["generation_id"] and vote["choice"] == "b"
    assert vote["vote_token"] == generation["vote_token"]  # the page signs in with a page token, not a key
    assert [vote["clip_a_id"], vote["clip_b_id"]] == [c["clip_id"] for c in generation["clips"]]
    assert vote["listen_a_s"] > 0

    consumer = KafkaConsumer(
        gateway_settings.topic_preferences,
        bootstrap_servers=gateway_settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
        enable_auto_commit=False,
    )
    try:
        produced = any(json.loads(message.value)["event_id"] == vote["event_id"] for message in consumer)
    finally:
        consumer.close()
    assert produced, "the vote never reached the preferences topic"


def test_dashboard_in_chromium(stack, gateway_settings, object_store, tmp_path):
    """The operator's view of a real gateway whose registry and buffer (buckets of their own in the stack's
    object store) hold three versions, a refused cycle and votes on three policies: the key is asked for,
    the summary loads, every table and chart is drawn."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    buckets = {"bucket_models": "dashboard-e2e-models", "bucket_buffer": "dashboard-e2e-buffer"}
    for bucket in buckets.values():
        if object_store.client.bucket_exists(bucket):
            for key in list(object_store.list_keys(bucket)):
                object_store.delete(bucket, key)
        else:
            object_store.client.make_bucket(bucket)
    seed_ops_history(object_store, buckets["bucket_models"], buckets["bucket_buffer"], datetime.now(UTC))

    with (
        serve_in_thread(create_app(gateway_settings.model_copy(update=buckets))) as url,
        playwright_api.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/dashboard")
            assert page.is_hidden("#content")
            page.fill("#api-key", "mrl_not-a-key")
            with page.expect_response(lambda r: "/v1/ops/summary" in r.url) as refused:
                page.click("#load")
            assert refused.value.status == 401
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('Refused')")

            page.fill("#api-key", stack.api_key)
            with page.expect_response(lambda r: "/v1/ops/summary" in r.url) as answered:
                page.click("#load")
            assert answered.value.status == 200, answered.value.text()
            page.wait_for_selector("body[data-loaded='true']")
            assert page.text_content("#served-version") == "version 3"
            assert page.locator("#cycles tbody tr").count() == 3
            refused_cycle = page.locator("#cycles tbody tr.outcome-rejected")
            assert refused_cycle.count() == 1 and "✗ reward_improved" in refused_cycle.inner_text()
            assert page.locator("#versions tbody tr").count() == 3
            assert page.locator("#canaries tbody tr").count() == 1 and "promoted" in page.inner_text(
                "#canaries tbody tr"
            )
            assert "promoted 66.7 %" in page.locator("#cycles tbody tr").first.inner_text()  # the newest cycle, r3
            assert page.locator("#versions tbody tr.current td").first.inner_text() == "3"
            assert page.locator("#reward-models tbody tr").count() == 3  # two versions and a refusal
            assert page.locator("#head-to-head tbody tr").count() == 2
            assert page.locator("#lineage-segments li").count() == 3
            for chart in ("votes", "buffer", "latency", "reward", "kl", "text", "quality"):
                assert page.get_attribute(f"#chart-{chart}", "data-rendered") == "true", chart
                assert int(page.get_attribute(f"#chart-{chart}", "data-marks")) > 0, chart
            assert page.locator("#chart-votes svg rect.bar").count() >= 15  # policy 3's votes, one a minute
            assert page.locator("#chart-reward svg circle.point").count() == 4  # versions 2 and 3, and their parents
            assert page.evaluate("sessionStorage.getItem('musicrl-ops-key')") == stack.api_key
            page.screenshot(path=str(screenshot_path(tmp_path, "dashboard.png")), full_page=True)

            page.reload()  # the key is kept for the tab: the summary loads again without asking
            page.wait_for_selector("body[data-loaded='true']")
            page.click("#forget")
            assert page.evaluate("sessionStorage.getItem('musicrl-ops-key')") is None and page.is_hidden("#content")
        finally:
            browser.close()


def test_experiment_pairs_current_and_challenger_versions(stack, gateway_settings, tmp_path, auth):
    """A challenger deployed as its own Triton model gives one clip of each pair."""
    torch.manual_seed(1)
    challenger_checkpoint = save_generator(
        Generator(GeneratorConfig(n_layers=2, n_heads=2, d_model=64, max_frames=256)), tmp_path / "challenger"
    )
    challenger = f"{MODEL_NAME}_challenger"
    install_version(stack.triton_repo, 2, challenger_checkpoint, challenger, BatchingConfig(instance_count=1))
    load(stack.triton_http_url, challenger)
    settings = gateway_settings.model_copy(
        update={"gateway_experiment_name": "v2-vs-v1", "gateway_challenger_model_name": challenger}
    )
    try:
        with TestClient(create_app(settings), headers=auth) as client:
            for seed in range(3):
                body = client.post("/v1/generations", json={"prompt": "duel", "duration_s": 1, "seed": seed}).json()
                assert body["experiment"] == "v2-vs-v1"
                assert sorted((c["model_name"], c["policy_version"]) for c in body["clips"]) == [
                    (MODEL_NAME, "1"),
                    (challenger, "2"),
                ]
                record = client.get(f"/v1/generations/{body['generation_id']}").json()
                assert record["experiment"] == "v2-vs-v1"
    finally:
        triton_http.InferenceServerClient(stack.triton_http_url).unload_model(challenger)


def test_triton_model_rejects_bad_rows_with_a_reason(stack, served_model):
    client = triton_grpc.InferenceServerClient(stack.triton_grpc_url)

    def infer(n_frames: int, temperature: float):
        arrays = {
            "PROMPT_EMBEDDING": (np.full((1, 384), 0.05, dtype=np.float32), "FP32"),
            "SEED": (np.array([[3]], dtype=np.int64), "INT64"),
            "N_FRAMES": (np.array([[n_frames]], dtype=np.int32), "INT32"),
            "TEMPERATURE": (np.array([[temperature]], dtype=np.float32), "FP32"),
            "TOP_K": (np.array([[0]], dtype=np.int32), "INT32"),
        }
        inputs = []
        for name, (array, datatype) in arrays.items():
            inputs.append(triton_grpc.InferInput(name, list(array.shape), datatype))
            inputs[-1].set_data_from_numpy(array)
        return client.infer(served_model, inputs)

    ok = infer(4, 1.0)
    assert ok.as_numpy("TOKENS").shape == (1, 4) and ok.as_numpy("AUDIO").shape == (1, 4 * codec.SAMPLES_PER_FRAME)
    for n_frames, temperature, reason in [(10_000, 1.0, "N_FRAMES"), (4, 0.0, "TEMPERATURE")]:
        with pytest.raises(InferenceServerException, match=reason):
            infer(n_frames, temperature)
    client.close()


def test_new_version_swaps_the_policy_under_traffic_without_failures(stack, served_model, generator_checkpoint, http):
    """Installing version 2 and loading it while requests flow: none fails, clips move to policy 2.

    Runs last in this module: it leaves version 2 serving.
    """
    results: list[tuple[int, set[str]]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            response = http.post("/v1/generations", json={"prompt": "during the swap", "duration_s": 1})
            versions = {c["policy_version"] for c in response.json().get("clips", [])}
            results.append((response.status_code, versions))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        while len(results) < 2:
            time.sleep(0.05)
        install_version(stack.triton_repo, 2, generator_checkpoint, served_model)
        load(stack.triton_http_url, served_model)
        swapped_at = len(results)
        while len(results) < swapped_at + 3:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert all(status == 201 for status, _ in results), results
    assert results[0][1] == {"1"} and results[-1][1] == {"2"}
