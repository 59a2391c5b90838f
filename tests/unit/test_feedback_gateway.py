"""POST /v1/feedback on the real app with an in-memory store and a recording producer.

The records are written straight into the store (no generation request), so the votes
carry vote tokens issued here with the gateway's key, as the generation route would.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import InMemoryStore, hex_id, make_record, store_record
from prometheus_client import REGISTRY

from musicrl.schemas.preference import PreferenceEvent
from musicrl.text import load_text_encoder
from serving.app import create_app
from serving.errors import UpstreamUnavailable
from serving.services.feedback import pseudonymise
from serving.services.vote_tokens import VoteTokens
from serving.settings import GatewaySettings

pytestmark = pytest.mark.unit

KEY = "unit-test-key"
API_KEY = "unit-test-api-key"
API_KEY_NAME = "tests"
VOTE_TOKEN_KEY = "unit-test-vote-token-key"
TOKENS = VoteTokens(VOTE_TOKEN_KEY.encode(), ttl_s=3600)


def vote_token(record, user_id="alice@example.com", key_name=API_KEY_NAME, clips=None) -> str:
    """The token the generation route would have given for ``record`` (its clips, or ``clips``)."""
    clips = clips if clips is not None else [(clip.clip_id, clip.duration_s) for clip in record.clips]
    return TOKENS.issue(record.generation_id, clips, key_name, user_id)[0]


class RecordingProducer:
    def __init__(self, failure: Exception | None = None):
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.failure = failure

    def send(self, topic, key, value):
        if self.failure is not None:
            raise self.failure
        self.sent.append((topic, key, value))
        return 1, len(self.sent) - 1

    def close(self):
        pass


class Unused:
    """Triton: the feedback route must not touch it."""

    def __getattr__(self, name):
        raise AssertionError(f"feedback must not use {name}")


@pytest.fixture()
def gateway():
    store = InMemoryStore()
    record = make_record()
    store_record(store, record)
    producer = RecordingProducer()
    settings = GatewaySettings(
        gateway_user_hash_key=KEY,
        gateway_store_timeout_s=2,
        gateway_vote_token_key=VOTE_TOKEN_KEY,
        gateway_api_keys=f"{API_KEY_NAME}:{hashlib.sha256(API_KEY.encode()).hexdigest()}",
    )
    app = create_app(settings, triton=Unused(), store=store, text_encoder=load_text_encoder("hashing"))
    app.state.singletons["feedback_producer"] = producer
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client, record, producer, store


def body_for(record, **overrides):
    body = {
        "event_id": hex_id(),
        "generation_id": record.generation_id,
        "clip_a_id": record.clips[0].clip_id,
        "clip_b_id": record.clips[1].clip_id,
        "choice": "a",
        "listen_a_s": 9.5,
        "listen_b_s": 10.0,
        "user_id": "alice@example.com",
        "client_ts": "2026-01-01T12:00:00+01:00",
    }
    body.update(overrides)
    body.setdefault("vote_token", vote_token(record, body["user_id"]))
    return body


def test_accepted_vote_is_produced_keyed_by_generation_with_a_pseudonym(gateway):
    client, record, producer, _ = gateway
    body = body_for(record, choice="tie")
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == 202, response.text
    assert response.json() == {"event_id": body["event_id"], "status": "accepted", "partition": 1, "offset": 0}
    topic, key, value = producer.sent[0]
    assert topic == "preferences.v1" and key == record.generation_id.encode()
    event = PreferenceEvent.from_bytes(value)
    assert event.choice == "tie" and event.listen_a_s == 9.5 and event.client_ts.utcoffset().total_seconds() == 3600
    assert event.user_pseudonym == hmac.new(KEY.encode(), b"alice@example.com", hashlib.sha256).hexdigest()
    assert b"alice" not in value and b"vote_token" not in value  # the token is the request's, not the event's
    assert event.received_at.tzinfo is not None


def test_pseudonym_is_stable_per_user_and_depends_on_the_key():
    assert pseudonymise("bob", b"k1") == pseudonymise("bob", b"k1")
    assert pseudonymise("bob", b"k1") != pseudonymise("bob", b"k2")
    assert pseudonymise("bob", b"k1") != pseudonymise("bobby", b"k1")


@pytest.mark.parametrize(
    ("mutate", "status", "needle"),
    [
        # A token signed for a generation that has no record, and for a clip that is not in the record.
        (
            lambda r, b: {
                **b,
                "generation_id": (g := hex_id()),
                "vote_token": TOKENS.issue(
                    g, [(b["clip_a_id"], 10.0), (b["clip_b_id"], 10.0)], API_KEY_NAME, b["user_id"]
                )[0],
            },
            404,
            "not found",
        ),
        (
            lambda r, b: {
                **b,
                "clip_b_id": (c := hex_id()),
                "vote_token": vote_token(r, clips=[(b["clip_a_id"], 10.0), (c, 10.0)]),
            },
            422,
            "is not a clip of generation",
        ),
        (lambda r, b: {**b, "clip_b_id": b["clip_a_id"]}, 422, "two different clips"),
        (lambda r, b: {**b, "choice": "both"}, 422, "choice"),
        (lambda r, b: {**b, "listen_a_s": -3}, 422, "listen_a_s"),
        (lambda r, b: {**b, "event_id": "x"}, 422, "event_id"),
        (lambda r, b: {**b, "generation_id": "../../etc/passwd"}, 422, "generation_id"),
        (lambda r, b: {k: v for k, v in b.items() if k != "user_id"}, 422, "user_id"),
        (lambda r, b: {k: v for k, v in b.items() if k != "vote_token"}, 422, "vote_token"),
        (lambda r, b: {**b, "user_pseudonym": "0" * 64}, 422, "user_pseudonym"),
        (lambda r, b: {**b, "client_ts": "yesterday"}, 422, "client_ts"),
    ],
)
def test_bad_votes_get_a_4xx_with_a_message_and_are_not_produced(gateway, mutate, status, needle):
    client, record, producer, _ = gateway
    response = client.post("/v1/feedback", json=mutate(record, body_for(record)))
    assert response.status_code == status, response.text
    assert needle in response.text
    assert producer.sent == []


def test_a_forged_vote_gets_403_before_its_body_is_judged(gateway):
    # Same clip twice with a token that does not verify: the token is checked first (schemathesis: a
    # schema-valid body is refused for its credential, not for a rule the schema cannot state).
    client, record, producer, _ = gateway
    body = body_for(record)
    response = client.post(
        "/v1/feedback", json={**body, "clip_b_id": body["clip_a_id"], "vote_token": "v1.forged.token"}
    )
    assert response.status_code == 403, response.text
    assert producer.sent == []


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[]", b"null", json.dumps({"choice": "a"}).encode(), b"\xff\xfe"])
def test_malformed_bodies_are_422_not_500(gateway, raw):
    client, _, producer, _ = gateway
    response = client.post("/v1/feedback", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert producer.sent == []


def test_body_over_the_limit_is_413_and_not_produced(gateway):
    client, record, producer, _ = gateway
    body = json.dumps(body_for(record, user_id="u" * 70_000)).encode()

    def chunks():
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    for content in (body, chunks()):
        response = client.post("/v1/feedback", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text
        assert "above the limit of 65536 bytes" in response.json()["detail"]
    assert producer.sent == []
    assert client.post("/v1/feedback", json=body_for(record)).status_code == 202
    assert "413" in client.get("/openapi.json").json()["paths"]["/v1/feedback"]["post"]["responses"]


def test_unreachable_broker_is_503_with_retry_after(gateway):
    client, record, _, _ = gateway
    client.app.state.singletons["feedback_producer"] = RecordingProducer(UpstreamUnavailable("kafka", "no ack"))
    response = client.post("/v1/feedback", json=body_for(record))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "kafka" in response.json()["detail"]


def test_unreachable_store_is_503(gateway):
    client, record, producer, store = gateway
    store.down = True
    response = client.post("/v1/feedback", json=body_for(record))
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert producer.sent == []


def test_feedback_is_counted_in_the_gateway_metrics(gateway):
    client, record, _, _ = gateway

    def counts():
        return {
            o: REGISTRY.get_sample_value("musicrl_gateway_feedback_total", {"outcome": o}) or 0.0
            for o in ("accepted", "rejected")
        }

    before = counts()
    client.post("/v1/feedback", json=body_for(record))
    client.post("/v1/feedback", json=body_for(record, clip_b_id=hex_id()))  # 403: not a clip of the token
    after = counts()
    assert after["accepted"] - before["accepted"] == 1 and after["rejected"] - before["rejected"] == 1
    assert "musicrl_gateway_feedback_total" in client.get("/metrics").text
