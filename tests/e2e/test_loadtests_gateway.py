"""The locust users against the real gateway: Triton generates, SeaweedFS stores, Tansu takes the votes.

A short headless run of the apps + listeners mix; every request must succeed and
every vote the listeners cast must arrive in the preferences topic, pseudonymised.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from kafka import KafkaConsumer
from servers import serve_in_thread

from loadtests.locust_runner import LocustRun, run_locust
from musicrl.models.generator import Generator, GeneratorConfig, save_generator
from musicrl.schemas.preference import PreferenceEvent
from serving.app import create_app
from serving.model_repository import BatchingConfig, install_version, load
from serving.settings import GatewaySettings

pytestmark = pytest.mark.e2e

MODEL_NAME = "loadtests_e2e_generator"


@pytest.fixture(scope="module")
def gateway(stack, object_store, tmp_path_factory):
    torch.manual_seed(0)
    checkpoint = save_generator(
        Generator(GeneratorConfig(n_layers=2, n_heads=2, d_model=64, max_frames=256)),
        tmp_path_factory.mktemp("generator"),
        {"note": "random init, load test"},
    )
    batching = BatchingConfig(
        max_batch_size=8, preferred_batch_sizes=[4, 8], max_queue_delay_us=20_000, instance_count=1
    )
    install_version(stack.triton_repo, 1, checkpoint, MODEL_NAME, batching)
    load(stack.triton_http_url, MODEL_NAME)
    settings = stack.settings_for(GatewaySettings, triton_model_name=MODEL_NAME)
    with serve_in_thread(create_app(settings)) as url:
        yield url, settings


def test_listeners_vote_through_the_real_gateway_into_kafka(gateway, stack, tmp_path):
    url, settings = gateway
    app_id = f"loadtest-{uuid.uuid4().hex[:8]}"
    env = {
        "MUSICRL_API_KEY": stack.api_key,  # the gateway has the stack's key (stack.settings_for)
        "LOADTEST_DURATION_S": "2",
        "LOADTEST_LISTEN_SPEED": "10",
        "LOADTEST_LISTENER_RATE": "1",
        "LOADTEST_APP_RATE": "0.5",
        "LOADTEST_APP_ID": app_id,
    }
    run = LocustRun("mix", url, users=4, spawn_rate=2, run_time_s=20, out_dir=tmp_path, env=env)
    code, summary = run_locust(run, timeout_s=180)
    assert code == 0, (tmp_path / "mix_locust.log").read_text()[-3000:]
    assert summary["failures"] == 0
    assert summary["endpoints"]["POST /v1/generations"]["requests"] >= 4
    votes = sum(summary["votes"].values())
    assert votes >= 1

    consumer = KafkaConsumer(
        settings.topic_preferences,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=5000,
    )
    try:
        events = [PreferenceEvent.model_validate(json.loads(m.value)) for m in consumer]
    finally:
        consumer.close()
    ours = [event for event in events if event.app_id == app_id]
    assert votes <= len(ours) <= votes + run.users  # a vote in flight at the stop may miss the count
    assert len({event.event_id for event in ours}) == len(ours)
    assert all(len(event.user_pseudonym) == 64 and "listener" not in event.user_pseudonym for event in ours)
