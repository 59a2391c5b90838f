"""Trust (issue 16): API keys, per-key limits, the page's tokens, vote tokens, production settings.

The real app with a fake Triton, an in-memory object store and a recording Kafka
producer: generations are created through ``POST /v1/generations`` and voted on
through ``POST /v1/feedback``, so each vote carries the token the gateway gave.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time

import pytest
from fastapi.testclient import TestClient
from test_feedback_gateway import RecordingProducer
from test_serving_gateway import FakeTextEncoder, FakeTriton, make_store
from typer.testing import CliRunner

from musicrl.schemas.preference import PreferenceEvent
from musicrl.stack import StackInfo, free_port_settings
from serving.app import InsecureSettings, create_app
from serving.cli import app as gateway_cli
from serving.services.auth import ApiKeys, hash_key
from serving.services.feedback import pseudonymise
from serving.services.limits import KeyedBuckets, Principal, PrincipalLimits, TokenBucket
from serving.services.vote_tokens import VoteClaims, VoteLedger, VoteTokens
from serving.settings import ApiKeySpec, GatewaySettings

pytestmark = pytest.mark.unit

APP_KEY, OTHER_KEY, SLOW_KEY = "mrl_app-key", "mrl_other-key", "mrl_slow-key"
KEYS = f"app:{hash_key(APP_KEY)},other:{hash_key(OTHER_KEY)},slow:{hash_key(SLOW_KEY)}:2:1"
USER_HASH_KEY = "unit-user-hash-key"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Gateway:
    """A gateway app with its fakes; ``client`` sends no credential unless told to."""

    def __init__(self, triton: FakeTriton | None = None, **settings):
        self.triton = triton or FakeTriton()
        self.producer = RecordingProducer()
        settings = {
            "gateway_api_keys": KEYS,
            "gateway_user_hash_key": USER_HASH_KEY,
            "gateway_store_timeout_s": 2,
        } | settings
        self.app = create_app(
            GatewaySettings(**settings), triton=self.triton, store=make_store(), text_encoder=FakeTextEncoder()
        )
        self.app.state.singletons["feedback_producer"] = self.producer
        self.client = TestClient(self.app)

    def generate(self, key: str = APP_KEY, **body) -> dict:
        response = self.client.post(
            "/v1/generations", json={"prompt": "x", "duration_s": 1} | body, headers=bearer(key)
        )
        assert response.status_code == 201, response.text
        return response.json()

    def vote(self, generation: dict, key: str = APP_KEY, **overrides):
        a, b = generation["clips"][:2]
        body = {
            "event_id": os.urandom(8).hex(),
            "generation_id": generation["generation_id"],
            "clip_a_id": a["clip_id"],
            "clip_b_id": b["clip_id"],
            "choice": "a",
            "listen_a_s": 0.8,
            "listen_b_s": 1.0,
            "user_id": "alice",
            "vote_token": generation["vote_token"],
        } | overrides
        return self.client.post(
            "/v1/feedback", json={k: v for k, v in body.items() if v is not None}, headers=bearer(key)
        )


@pytest.fixture()
def gateway():
    gateway = Gateway()
    with gateway.client:
        yield gateway


def refused(response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "request_id"} and body["request_id"] == response.headers["X-Request-ID"]
    assert needle in response.text, response.text


# ----------------------------------------------------------------------------- API keys


def test_write_routes_need_a_key_401_with_www_authenticate(gateway):
    generation = gateway.generate()
    for path, body in [
        ("/v1/generations", {"prompt": "x", "duration_s": 1}),
        ("/v1/feedback", {"generation_id": generation["generation_id"]}),
    ]:
        for headers, needle in [
            ({}, "an API key is required"),
            (bearer("mrl_wrong"), "unknown API key"),
            ({"X-API-Key": "mrl_wrong"}, "unknown API key"),
            ({"Authorization": "Basic eDp5"}, "required"),
            (bearer(hash_key(APP_KEY)), "unknown API key"),
        ]:  # the hash is not the key
            response = gateway.client.post(path, json=body, headers=headers)
            refused(response, 401, needle)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert len(gateway.triton.calls) == 2  # only the authenticated generation reached Triton
    assert gateway.producer.sent == []


def test_bearer_and_x_api_key_both_work_and_reads_stay_open(gateway):
    response = gateway.client.post(
        "/v1/generations", json={"prompt": "x", "duration_s": 1}, headers={"X-API-Key": APP_KEY}
    )
    assert response.status_code == 201, response.text
    generation = gateway.generate(OTHER_KEY)
    clip = generation["clips"][0]["clip_id"]
    for path in (
        f"/v1/generations/{generation['generation_id']}",
        f"/v1/clips/{clip}",
        f"/v1/clips/{clip}/audio",
        "/",
        "/healthz",
        "/readyz",
    ):
        assert gateway.client.get(path).status_code == 200, path


def test_rate_limit_per_key_answers_429_with_retry_after(gateway):
    gateway.generate(SLOW_KEY)
    gateway.generate(SLOW_KEY)
    calls = len(gateway.triton.calls)
    response = gateway.client.post("/v1/generations", json={"prompt": "x", "duration_s": 1}, headers=bearer(SLOW_KEY))
    refused(response, 429, "2 requests per minute")
    assert 25 <= int(response.headers["Retry-After"]) <= 30  # one token of 2 per minute
    assert len(gateway.triton.calls) == calls
    gateway.generate(APP_KEY)  # another key has its own bucket


def test_concurrency_cap_per_key_answers_429_while_a_request_is_in_flight():
    gateway = Gateway(triton=FakeTriton(delay_s=0.6), gateway_key_max_concurrency=1)
    with gateway.client:
        first: list = []
        worker = threading.Thread(target=lambda: first.append(gateway.generate(OTHER_KEY)))
        worker.start()
        deadline = time.monotonic() + 5
        while gateway.triton.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gateway.app.state.limits.in_flight("other") == 1
        response = gateway.client.post(
            "/v1/generations", json={"prompt": "y", "duration_s": 1}, headers=bearer(OTHER_KEY)
        )
        refused(response, 429, "requests in flight")
        assert response.headers["Retry-After"] == "1"
        gateway.generate(APP_KEY)  # other keys are not held up
        worker.join()
        assert first and gateway.app.state.limits.in_flight("other") == 0
        gateway.generate(OTHER_KEY)  # the slot was given back


def test_limits_and_buckets_on_a_fake_clock():
    now = [100.0]
    bucket = TokenBucket(6, clock=lambda: now[0])  # 6 per minute: one every 10 s, 6 saved up
    assert [bucket.take() for _ in range(6)] == [0.0] * 6
    assert bucket.take() == pytest.approx(10.0)
    now[0] += 5
    assert bucket.take() == pytest.approx(5.0)
    now[0] += 5
    assert bucket.take() == 0.0
    users = KeyedBuckets(1, max_keys=2, clock=lambda: now[0])
    assert users.take("a") == 0 and users.take("a") > 0 and users.take("b") == 0 and users.take("c") == 0
    assert len(users) == 2 and users.take("a") == 0  # "a" was forgotten first (a memory bound, not a limit)
    limits = PrincipalLimits(clock=lambda: now[0])
    with limits.admit(Principal("k", 60, 2)):
        assert limits.in_flight("k") == 1
    assert limits.in_flight("k") == 0


# ----------------------------------------------------------------------------- the listening page


def test_the_page_gets_a_token_that_generates_and_votes(gateway):
    token = gateway.client.get("/page-token")
    assert token.status_code == 200 and token.headers["Cache-Control"] == "no-store"
    page_key = token.json()["token"]
    assert page_key.startswith("p1.")
    generation = gateway.generate(page_key, user_id="page-user")
    assert gateway.vote(generation, key=page_key, user_id="page-user").status_code == 202
    # The page's principal has the page's own (low) limits, shared by all its visitors.
    assert gateway.app.state.auth.authenticate(page_key) == Principal("page", 60, 4)


def test_expired_forged_or_disabled_page_tokens_are_401(gateway):
    page_key = gateway.client.get("/page-token").json()["token"]
    head, payload, signature = page_key.split(".")
    forged = f"{head}.{payload}.{'A' * len(signature)}"
    refused(gateway.client.post("/v1/generations", json={"prompt": "x"}, headers=bearer(forged)), 401, "page token")
    gateway.app.state.auth.page_tokens.clock = lambda: time.time() + 3601
    refused(gateway.client.post("/v1/generations", json={"prompt": "x"}, headers=bearer(page_key)), 401, "expired")
    with Gateway(gateway_page_enabled=False).client as client:
        assert client.get("/page-token").status_code == 404
        refused(client.post("/v1/generations", json={"prompt": "x"}, headers=bearer(page_key)), 401, "unknown API key")


# ----------------------------------------------------------------------------- vote tokens


def test_a_valid_vote_token_is_accepted_and_the_event_keeps_no_token(gateway):
    generation = gateway.generate(user_id="alice")
    assert generation["vote_token"].startswith("v1.") and generation["vote_token_expires_at"]
    response = gateway.vote(generation)
    assert response.status_code == 202, response.text
    ((_, key, value),) = gateway.producer.sent
    event = PreferenceEvent.from_bytes(value)
    assert key == generation["generation_id"].encode() and event.listen_a_s == 0.8
    assert event.user_pseudonym == pseudonymise("alice", USER_HASH_KEY.encode())
    assert b"vote_token" not in value and b"alice" not in value


def test_a_single_clip_generation_has_no_vote_token(gateway):
    assert gateway.generate(n=1)["vote_token"] is None


@pytest.mark.parametrize(
    ("tamper", "status", "needle"),
    [
        ("forged signature", 403, "signature does not match"),
        ("forged payload", 403, "signature does not match"),
        ("another secret", 403, "signature does not match"),
        ("not a token", 403, "invalid vote token"),
        ("expired", 403, "expired"),
        ("other generation", 403, "another generation"),
        ("other user", 403, "another user"),
        ("other key", 403, "another API key"),
        ("clip not in the token", 403, "not one of the vote token's clips"),
        ("listened too long", 422, "listen_a_s"),
        ("no token", 422, "vote_token"),
    ],
)
def test_votes_the_token_does_not_allow_are_refused_and_not_produced(gateway, tamper, status, needle):
    generation = gateway.generate(user_id="alice")
    other = gateway.generate(user_id="alice")
    token = generation["vote_token"]
    head, payload, signature = token.split(".")
    overrides: dict = {}
    key = APP_KEY
    if tamper == "forged signature":
        overrides["vote_token"] = f"{head}.{payload}.{signature[::-1]}"
    elif tamper == "forged payload":  # a longer listen allowance written into the payload, old signature
        claims = json.loads(_unb64(payload))
        claims["c"] = [[clip, 3600.0] for clip, _ in claims["c"]]
        overrides |= {"vote_token": f"{head}.{_b64(json.dumps(claims).encode())}.{signature}", "listen_a_s": 100.0}
    elif tamper == "another secret":
        clips = [(c["clip_id"], c["duration_s"]) for c in generation["clips"]]
        overrides["vote_token"] = VoteTokens(b"guessed-secret", 3600).issue(
            generation["generation_id"], clips, "app", "alice"
        )[0]
    elif tamper == "not a token":
        overrides["vote_token"] = "v1.not-a-token"
    elif tamper == "expired":
        gateway.app.state.votes.tokens.clock = lambda: time.time() + 3601
    elif tamper == "other generation":
        overrides["vote_token"] = other["vote_token"]
    elif tamper == "other user":
        overrides["user_id"] = "mallory"
    elif tamper == "other key":
        key = OTHER_KEY
    elif tamper == "clip not in the token":
        overrides["clip_b_id"] = other["clips"][1]["clip_id"]
    elif tamper == "listened too long":
        overrides["listen_a_s"] = 1.0 + 0.6  # a 1 s clip, 0.5 s of tolerance
    elif tamper == "no token":
        overrides["vote_token"] = None
    refused(gateway.vote(generation, key=key, **overrides), status, needle)
    assert gateway.producer.sent == []
    assert gateway.app.state.limits.in_flight({APP_KEY: "app", OTHER_KEY: "other"}[key]) == 0  # the slot is back
    gateway.app.state.votes.tokens.clock = time.time
    assert gateway.vote(generation).status_code == 202  # the genuine vote (in time) still goes through


def test_listening_within_the_tolerance_is_accepted(gateway):
    generation = gateway.generate(user_id="alice")
    assert gateway.vote(generation, listen_a_s=1.4, listen_b_s=1.0).status_code == 202


def test_a_second_vote_is_refused_but_a_retry_of_the_first_passes(gateway):
    generation = gateway.generate(user_id="alice")
    first = gateway.vote(generation, event_id="first-vote-id")
    assert first.status_code == 202
    retry = gateway.vote(generation, event_id="first-vote-id")  # e.g. after a 503: the consumer drops the copy
    assert retry.status_code == 202
    refused(gateway.vote(generation, event_id="second-vote-id", choice="b"), 409, "already voted")
    assert len(gateway.producer.sent) == 2 and all(b"first-vote-id" in value for _, _, value in gateway.producer.sent)


def test_a_token_without_a_user_takes_one_vote_from_its_key(gateway):
    generation = gateway.generate()  # no user_id: bound to the key "app" only
    assert gateway.vote(generation, user_id="bob").status_code == 202
    refused(gateway.vote(generation, user_id="carol"), 409, "already voted")
    refused(gateway.vote(generation, key=OTHER_KEY, user_id="dave"), 403, "another API key")


def test_votes_per_user_are_limited_per_minute():
    gateway = Gateway(gateway_votes_per_user_per_min=2)
    with gateway.client:
        generations = [gateway.generate(user_id="alice") for _ in range(3)] + [gateway.generate(user_id="bob")]
        assert [gateway.vote(g).status_code for g in generations[:2]] == [202, 202]
        response = gateway.vote(generations[2])
        refused(response, 429, "2 votes per minute")
        assert 25 <= int(response.headers["Retry-After"]) <= 30
        assert gateway.vote(generations[3], user_id="bob").status_code == 202
        assert len(gateway.producer.sent) == 3


def test_the_ledger_forgets_expired_votes_and_stays_bounded():
    now = [1000.0]
    ledger = VoteLedger(max_entries=2, clock=lambda: now[0])

    def claims(generation: str, user: str | None = "u", expires: int = 1100) -> VoteClaims:
        return VoteClaims(generation, "app", user, {}, expires)

    assert (
        ledger.claim(claims("g1"), "e1") and ledger.claim(claims("g1"), "e1") and not ledger.claim(claims("g1"), "e2")
    )
    assert ledger.claim(claims("g1", user=None), "e3")  # the key's vote is another voter
    assert ledger.claim(claims("g2"), "e4") and len(ledger) == 2  # the oldest entry made room
    now[0] = 1200.0
    assert ledger.claim(claims("g2", expires=1300), "e5") and len(ledger) == 1  # expired entries are gone


# ----------------------------------------------------------------------------- settings, production, CLI, stack


def test_production_refuses_development_secrets_and_no_keys(monkeypatch):
    with pytest.raises(InsecureSettings) as refused_start:
        create_app(GatewaySettings(env="production"))
    message = str(refused_start.value)
    for needle in ("USER_HASH_KEY", "VOTE_TOKEN_KEY", "API_KEYS"):
        assert needle in message
    monkeypatch.setenv("MUSICRL_ENV", "production")
    monkeypatch.setenv("MUSICRL_GATEWAY_USER_HASH_KEY", "a-real-secret")
    monkeypatch.setenv("MUSICRL_GATEWAY_VOTE_TOKEN_KEY", "another-real-secret")
    with pytest.raises(InsecureSettings, match="API_KEYS"):
        create_app()
    monkeypatch.setattr("musicrl.logging.configure_logging", lambda *args, **kwargs: None)  # keep the test's logging
    refused_serve = CliRunner().invoke(gateway_cli, ["serve", "--port", "1"])  # exits before it binds anything
    assert refused_serve.exit_code == 1 and "MUSICRL_GATEWAY_API_KEYS configures no API key" in refused_serve.output
    monkeypatch.setenv("MUSICRL_GATEWAY_API_KEYS", KEYS)
    with pytest.raises(InsecureSettings, match="MUSICRL_S3_SECRET_KEY"):  # the object-store user's, too
        create_app()
    monkeypatch.setenv("MUSICRL_S3_ACCESS_KEY", "gateway-user")
    monkeypatch.setenv("MUSICRL_S3_SECRET_KEY", "a-real-s3-secret")
    assert create_app().state.settings.env == "production"
    monkeypatch.delenv("MUSICRL_ENV")
    assert GatewaySettings(gateway_api_keys="").production_problems()  # development: allowed, but listed


def test_api_key_entries_parse_from_lines_or_json():
    h = hash_key("k")
    assert GatewaySettings(gateway_api_keys=f"a:{h}, b:{h.upper()}:10:2").gateway_api_keys == [
        ApiKeySpec(name="a", sha256=h),
        ApiKeySpec(name="b", sha256=h, rate_per_min=10, max_concurrency=2),
    ]
    assert GatewaySettings(gateway_api_keys=json.dumps([{"name": "c", "sha256": h}, f"d:{h}::3"])).gateway_api_keys[
        1
    ] == ApiKeySpec(name="d", sha256=h, max_concurrency=3)
    for bad in ("a", f"page:{h}", f"a:{h},a:{h}", f"a:{h[:20]}", f"a:{h}:0", f"a b:{h}x"):
        with pytest.raises(ValueError):
            GatewaySettings(gateway_api_keys=bad)
    keys = ApiKeys(GatewaySettings(gateway_api_keys=f"a:{h}:5").gateway_api_keys, 600, 32)
    assert keys.principal("k") == Principal("a", 5, 32) and keys.principal("K") is None


def test_new_key_and_hash_key_commands_print_entries_the_gateway_accepts():
    runner = CliRunner()
    result = runner.invoke(gateway_cli, ["new-key", "--name", "mobile", "--rate-per-min", "120"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    key, entry = lines["key"].strip(), lines["entry"].strip()
    assert key.startswith("mrl_") and entry.startswith("mobile:") and entry.endswith(":120")
    gateway = Gateway(gateway_api_keys=entry)
    with gateway.client:
        assert gateway.app.state.auth.authenticate(key).name == "mobile"
        gateway.generate(key)
    hashed = runner.invoke(gateway_cli, ["hash-key", key, "--name", "mobile"])
    assert hashed.exit_code == 0 and hashed.stdout.strip() == entry.rsplit(":", 1)[0]
    assert runner.invoke(gateway_cli, ["new-key", "--name", "page"]).exit_code != 0


def test_openapi_declares_the_security_schemes_and_the_401_429_answers(gateway):
    document = gateway.client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKeyBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["ApiKeyBearer"]["description"],
    }
    assert schemes["ApiKeyHeader"] | {"description": ""} == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "",
    }
    for path in ("/v1/generations", "/v1/feedback"):
        operation = document["paths"][path]["post"]
        assert {"ApiKeyBearer": []} in operation["security"] and {"ApiKeyHeader": []} in operation["security"]
        assert {"401", "429"} <= set(operation["responses"])
        assert "Retry-After" in operation["responses"]["429"]["headers"]
    assert {"403", "409"} <= set(document["paths"]["/v1/feedback"]["post"]["responses"])
    assert "security" not in document["paths"]["/v1/generations/{generation_id}"]["get"]
    assert "vote_token" in document["components"]["schemas"]["FeedbackRequest"]["required"]


def test_the_stack_provisions_a_development_key_for_its_gateway_and_clients(tmp_path):
    info = StackInfo(free_port_settings(tmp_path / "stack"))
    env = info.env()
    key = env["MUSICRL_API_KEY"]
    assert key == info.api_key == StackInfo(free_port_settings(tmp_path / "stack")).api_key  # stable
    assert stat.S_IMODE(info.api_key_file.stat().st_mode) == 0o600
    settings = info.settings_for(GatewaySettings)
    assert [spec.name for spec in settings.gateway_api_keys] == ["stack"]
    assert ApiKeys(settings.gateway_api_keys, 600, 32).principal(key).name == "stack"
    assert hashlib.sha256(key.encode()).hexdigest() in env["MUSICRL_GATEWAY_API_KEYS"]
    assert StackInfo(free_port_settings(tmp_path / "other")).api_key != key


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
