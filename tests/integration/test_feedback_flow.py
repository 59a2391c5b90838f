"""POST /v1/feedback -> Tansu -> feedback consumer -> Parquet buffer, on the real servers.

The records are written straight into the store, so the votes carry vote tokens issued
here with the gateway's key, as ``POST /v1/generations`` would have for the stack's API key.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition

from feedback_consumer.consumer import FeedbackConsumer
from feedback_consumer.settings import ConsumerSettings
from feedback_consumer.workload import make_records, store_records
from musicrl.buffer import PreferenceBuffer
from musicrl.kafka import ensure_topics
from musicrl.schemas.preference import PreferenceEvent
from musicrl.stack.processes import free_port
from musicrl.stack.stack import STACK_KEY_NAME
from serving.app import create_app
from serving.client import api_key_headers
from serving.services.vote_tokens import VoteTokens
from serving.settings import GatewaySettings

pytestmark = pytest.mark.integration


@pytest.fixture()
def topics(stack):
    tag = uuid.uuid4().hex[:8]
    return {
        "topic_preferences": f"feedback-{tag}",
        "topic_dead_letter": f"feedback-{tag}.dlq",
        "bucket_buffer": f"buffer-{tag}",
    }


def gateway_client(stack, topics, **overrides) -> TestClient:
    settings = stack.settings_for(
        GatewaySettings,
        gateway_text_encoder="hashing",
        gateway_kafka_timeout_s=3,
        gateway_retry_after_s=2,
        topic_preferences=topics["topic_preferences"],
        topic_dead_letter=topics["topic_dead_letter"],
        **overrides,
    )
    return TestClient(create_app(settings), headers=api_key_headers(stack.api_key))


def vote(record, **overrides) -> dict:
    body = {
        "event_id": uuid.uuid4().hex,
        "generation_id": record.generation_id,
        "clip_a_id": record.clips[0].clip_id,
        "clip_b_id": record.clips[1].clip_id,
        "choice": "b",
        "listen_a_s": 10.0,
        "listen_b_s": 8.0,
        "user_id": "carol",
    }
    body.update(overrides)
    clips = [(clip.clip_id, clip.duration_s) for clip in record.clips]
    body["vote_token"] = VoteTokens.from_settings(GatewaySettings()).issue(
        record.generation_id, clips, STACK_KEY_NAME, body["user_id"]
    )[0]
    return body


def test_vote_is_acknowledged_by_the_broker_and_lands_in_the_buffer(stack, object_store, topics):
    records = make_records(2, random.Random(5), policy_versions=("4",))
    store_records(object_store, records)
    consumer_settings = stack.settings_for(
        ConsumerSettings,
        **topics,
        consumer_group_id=f"group-{topics['bucket_buffer']}",
        consumer_session_timeout_ms=3000,
        consumer_heartbeat_interval_ms=1000,
        consumer_segment_max_age_s=0.2,
        consumer_metrics_port=-1,
    )
    ensure_topics(consumer_settings)
    with gateway_client(stack, topics) as client:
        bodies = [vote(records[0]), vote(records[1], choice="tie"), vote(records[0], choice="none", user_id="dave")]
        answers = [client.post("/v1/feedback", json=b) for b in bodies]
        retry = client.post("/v1/feedback", json=bodies[0])  # a client retry: same event id
    assert [a.status_code for a in answers] == [202, 202, 202] and retry.status_code == 202

    # The 202 means the broker has it: read it back at the offset the gateway returned.
    first = answers[0].json()
    reader = KafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topics["topic_preferences"], first["partition"])
    reader.assign([tp])
    reader.seek(tp, first["offset"])
    record = next(r for _ in range(20) for r in reader.poll(timeout_ms=500).get(tp, []))
    reader.close()
    event = PreferenceEvent.from_bytes(record.value)
    assert record.key == records[0].generation_id.encode()
    assert event.event_id == bodies[0]["event_id"] and len(event.user_pseudonym) == 64 and b"carol" not in record.value

    consumer = FeedbackConsumer(consumer_settings)
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while consumer.totals["events"] < 4:
            assert time.monotonic() < deadline and thread.is_alive(), consumer.health()
            time.sleep(0.1)
        assert consumer.lag() == 0
    finally:
        consumer.stop()
        thread.join(timeout=30)
    assert consumer.totals["duplicates"] == 1 and consumer.totals["filtered_no_choice"] == 1

    table = PreferenceBuffer(object_store, topics["bucket_buffer"]).read()
    assert sorted(table["event_id"].to_pylist()) == sorted([bodies[0]["event_id"], bodies[1]["event_id"]])
    rows = {r["event_id"]: r for r in table.to_pylist()}
    tie = rows[bodies[1]["event_id"]]
    assert tie["is_tie"] and tie["policy_version"] == "4" and tie["tokens_a"] == records[1].clips[0].tokens
    assert PreferenceBuffer(object_store, topics["bucket_buffer"]).counts_by_policy() == {"4": 2}


def test_unreachable_broker_answers_503_with_retry_after(stack, object_store, topics):
    records = make_records(1, random.Random(6))
    store_records(object_store, records)
    with gateway_client(stack, topics, kafka_bootstrap=f"127.0.0.1:{free_port()}") as client:
        body = vote(records[0])
        first = client.post("/v1/feedback", json=body)
        second = client.post("/v1/feedback", json=body)  # the client's retry, answered from the remembered failure
    for response in (first, second):
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "2" and "kafka" in response.json()["detail"]
