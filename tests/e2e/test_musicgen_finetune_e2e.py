"""A finetune cycle on a MusicGen policy against the real servers, hot-swapped under traffic (issue 15).

A tiny random MusicGen is version 1 of the generator in the stack's object store (buckets and a Triton model
name of this test's own) and serves through the real gateway. The finetune worker's cycle reads votes on its
four-codebook clips from the buffer, fits the preference model on the MusicGen decoder, runs REINFORCE, gates,
publishes version 2 and deploys it into the real Triton while listeners keep asking the gateway for pairs:
no request may fail, and the answers move from version 1 to version 2.
"""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
import tritonclient.http as httpclient
from finetune_helpers import FRAMES, MUSICGEN_CYCLE, musicgen_buffer_rows
from pretrained_helpers import one_thread_per_module, tiny_musicgen  # noqa: F401 - the fixture is autouse here
from servers import serve_in_thread

from finetune_worker.cycle import GENERATOR, FinetuneCycle
from finetune_worker.settings import FinetuneSettings
from musicrl.buffer import rows_to_parquet, segment_key
from musicrl.models.policy import load_policy
from musicrl.registry import Registry
from serving.app import create_app
from serving.client import api_key_headers
from serving.settings import GatewaySettings

pytestmark = pytest.mark.e2e


@pytest.fixture()
def musicgen_stack(stack, object_store, tmp_path):
    """Buckets and a Triton model of this test's own; MusicGen version 1 published, current and served."""
    suffix = uuid.uuid4().hex[:8]
    models, buffer = f"mg-models-{suffix}", f"mg-buffer-{suffix}"
    for bucket in (models, buffer):
        object_store.ensure_bucket(bucket)
    settings = stack.settings_for(
        FinetuneSettings,
        bucket_models=models,
        bucket_buffer=buffer,
        triton_model_name=f"mg_finetune_{suffix}",
        finetune_triton_repo=stack.triton_repo,
        finetune_work_dir=tmp_path / "work",
        finetune_deploy_timeout_s=120.0,
        finetune_torch_threads=1,
        **MUSICGEN_CYCLE,
    )
    base = tiny_musicgen(tmp_path / "base", guidance_scale=3.0)
    registry = Registry(object_store, bucket=models)
    registry.set_current(GENERATOR, registry.publish(GENERATOR, base))
    cycle = FinetuneCycle(settings)
    cycle.deployer().deploy("1")  # Triton serves version 1, as `stack up` serves the base
    rows = musicgen_buffer_rows(load_policy(base), 64)
    object_store.put_bytes(buffer, segment_key("1", 0, 0, len(rows) - 1), rows_to_parquet(rows))
    yield settings, registry, cycle
    client = httpclient.InferenceServerClient(stack.triton_http_url)
    try:
        client.unload_model(settings.triton_model_name)
    finally:
        client.close()


def test_a_musicgen_cycle_publishes_and_hot_swaps_under_traffic_with_no_failed_request(stack, musicgen_stack):
    settings, registry, cycle = musicgen_stack
    gateway = stack.settings_for(
        GatewaySettings,
        triton_model_name=settings.triton_model_name,
        gateway_store_timeout_s=5,
        gateway_min_duration_s=0.2,  # the clips the rows were sampled at (FRAMES at 50 frames/s)
    )
    versions: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def listen(http: httpx.Client) -> None:
        seed = 0
        while not stop.is_set():
            seed += 1
            try:
                body = {"prompt": "calm piano", "duration_s": FRAMES / 50, "seed": seed}
                response = http.post("/v1/generations", json=body)
                if response.status_code != 201:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                versions.extend(clip["policy_version"] for clip in response.json()["clips"])
            except httpx.HTTPError as err:
                failures.append(f"{type(err).__name__}: {err}")

    with (
        serve_in_thread(create_app(gateway)) as url,
        httpx.Client(base_url=url, timeout=120, headers=api_key_headers(stack.api_key)) as http,
    ):
        listener = threading.Thread(target=listen, args=(http,), daemon=True)
        listener.start()
        try:
            record = cycle.run_once()
            served_after = len(versions)
            stop.wait(3.0)  # a few requests after the swap
        finally:
            stop.set()
            listener.join(timeout=120)

    assert record["status"] == "deployed", record.get("reason")
    assert record["reward_model"]["kind"] == "reward/preference-musicgen" and record["reward_model"]["published"]
    assert registry.current(GENERATOR) == "2" and (stack.triton_repo / settings.triton_model_name / "2").is_dir()
    assert failures == []
    assert versions[0] == "1" and versions[-1] == "2" and len(versions) > served_after, versions[-6:]
    assert set(versions) == {"1", "2"}
