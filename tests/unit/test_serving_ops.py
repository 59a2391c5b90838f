"""The operator's view (issue 18): the summary service on an in-memory registry and buffer, and its routes.

``tests/ops_helpers.seed_ops_history`` writes three generator versions (one base, two
from cycles), a refused cycle, two reward models and a refused one, and votes on three
policy versions; the tests check what ``OpsService.summary`` derives from them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import InMemoryStore
from ops_helpers import _reject, _segment, seed_ops_history
from test_serving_gateway import FakeTextEncoder, FakeTriton

from musicrl.buffer import segment_key
from musicrl.registry import Registry
from serving.app import create_app
from serving.services.auth import hash_key
from serving.services.ops import OpsService
from serving.settings import GatewaySettings

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 2, 15, 0, 30, tzinfo=UTC)
KEY = "mrl_ops-test-key"


class Store(InMemoryStore):
    """InMemoryStore with the conditional PUT the registry reserves versions with; counts reads."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def get_bytes(self, bucket, key):
        self.reads.append(key)
        return super().get_bytes(bucket, key)


@pytest.fixture()
def seeded():
    store = Store()
    config = store.config
    seeded = seed_ops_history(store, config.bucket_models, config.bucket_buffer, NOW)
    return store, seeded


def service(store, clock=NOW.timestamp, **kwargs) -> OpsService:
    config = store.config
    return OpsService(
        store, bucket_models=config.bucket_models, bucket_buffer=config.bucket_buffer, clock=clock, **kwargs
    )


def test_served_version_and_its_lineage(seeded):
    store, seed = seeded
    summary = service(store).summary()
    assert summary["errors"] == []
    served = summary["served"]
    assert (served["version"], served["previous"]) == ("3", "2")
    details = served["details"]
    assert details["status"] == "serving" and details["parent_version"] == "2" and details["run_id"] == "r3"
    assert details["reward_model_versions"] == {"preference": "2"}
    assert details["reward_model"]["kept"] == "2" and details["reward_model"]["published"] is None
    training = details["training"]
    assert training["segment_keys"] == seed["segments"]["1"] + seed["segments"]["2"]
    assert training["segments"] == training["segments_in_buffer"] == 3
    assert training["policy_versions"] == ["1", "2"] and training["votes"] == 90
    # Deployed when the pointer moved (+151 min); the newest vote it trained on arrived at +99 min.
    assert details["latency"]["deployed_at_basis"] == "pointer"
    assert details["latency"]["newest_vote_to_deploy_s"] == pytest.approx((151 - 99) * 60, abs=1)


def test_every_version_with_gate_metrics_status_and_latency(seeded):
    store, seed = seeded
    versions = {v["version"]: v for v in service(store).summary()["versions"]}
    assert list(versions) == ["1", "2", "3"]
    assert versions["1"]["status"] == "retired" and versions["1"]["run_id"] is None
    assert all(value is None for value in versions["1"]["metrics"].values())  # the base was never gated
    v2 = versions["2"]
    assert v2["status"] == "retired" and v2["stage"] == "U" and v2["trainer"] == "reinforce"
    assert v2["metrics"]["reward"] == pytest.approx(1.2) and v2["baseline"]["reward"] == pytest.approx(0.8)
    assert v2["metrics"]["kl"] == pytest.approx(3.1)
    assert v2["metrics"]["text_adherence"] == pytest.approx(0.215) and v2["metrics"]["quality"] == pytest.approx(0.6)
    assert v2["train"] == {"reward": 1.1, "kl": 2.9}
    assert v2["training"]["votes"] == 60 and v2["training"]["policy_versions"] == ["1"]
    # Not current any more: its deploy time is its publish time (auto-deploy), flagged as such.
    assert v2["latency"]["deployed_at_basis"] == "published"
    assert v2["latency"]["newest_vote_to_deploy_s"] == pytest.approx((60 - 49) * 60, abs=1)
    assert v2["latency"]["median_vote_to_deploy_s"] > v2["latency"]["newest_vote_to_deploy_s"]
    # Six pairs had a version-1 clip against a version-2 clip: version 2 won four.
    assert v2["win_rate"] == {
        "source": "votes",
        "value": pytest.approx(4 / 6, abs=1e-3),
        "opponent": "1",
        "wins": 4,
        "losses": 2,
    }
    assert versions["3"]["win_rate"] is None


def test_cycles_newest_first_with_the_checks_of_the_refused_one(seeded):
    store, _ = seeded
    summary = service(store).summary()
    cycles = summary["cycles"]
    assert [(c["run_id"], c["outcome"], c["version"]) for c in cycles] == [
        ("r3", "published", "3"),
        ("r2", "rejected", None),
        ("r1", "published", "2"),
    ]
    refused = cycles[1]
    assert refused["passed"] is False and refused["parent_version"] == "2"
    assert {c["name"]: c["passed"] for c in refused["checks"]} == {
        "finite": True,
        "reward_improved": False,
        "kl_bounded": True,
        "no_collapse": True,
    }
    assert [c["step"] for c in refused["checkpoints"]] == [5, 10]
    assert refused["reward"] == pytest.approx(1.15) and refused["baseline_reward"] == pytest.approx(1.2)
    assert cycles[0]["passed"] is True and cycles[0]["chosen_step"] == 15
    assert summary["cycles_since_accepted"] == 0


def test_reward_models_with_the_refused_one(seeded):
    store, _ = seeded
    models = service(store).summary()["reward_models"]
    assert models["current"] == "2"
    assert [(m["version"], m["trained_on_votes"], m["is_current"]) for m in models["versions"]] == [
        ("1", False, False),
        ("2", True, True),
    ]
    assert models["versions"][1]["heldout_accuracy"] == 0.61 and models["versions"][1]["segments"] == 2
    (refused,) = models["rejected"]
    assert refused["heldout_accuracy"] == 0.48 and "not above chance" in refused["reason"]


def test_buffer_by_policy_and_votes_per_minute(seeded):
    store, seed = seeded
    buffer = service(store).summary(window_minutes=30)["buffer"]
    assert buffer["total_votes"] == 110 and buffer["segments"] == 4
    assert [(p["policy_version"], p["votes"], p["segments"]) for p in buffer["by_policy"]] == [
        ("1", 60, 2),
        ("2", 30, 1),
        ("3", 20, 1),
    ]
    assert buffer["by_policy"][0]["ties"] == 13 + 6  # every third vote
    per_minute = buffer["votes_per_minute"]
    assert per_minute["minutes"] == 30 and len(per_minute["total"]) == 30
    # Policy 3's votes: one a minute for the last 20 minutes; the older policies' are outside the window.
    assert list(per_minute["by_policy"]) == ["3"] and sum(per_minute["total"]) == 20
    assert per_minute["total"][-21:-1] == [1] * 20 and per_minute["total"][-1] == 0
    assert per_minute["last_5_min_per_minute"] == pytest.approx(4 / 5)
    assert buffer["head_to_head"] == [
        {
            "version": "1",
            "opponent": "2",
            "wins": 2,
            "losses": 4,
            "ties": 0,
            "win_rate": pytest.approx(2 / 6, abs=1e-3),
        },
        {
            "version": "2",
            "opponent": "1",
            "wins": 4,
            "losses": 2,
            "ties": 0,
            "win_rate": pytest.approx(4 / 6, abs=1e-3),
        },
    ]


def test_segments_are_read_once_and_the_summary_is_cached(seeded):
    store, seed = seeded
    now = [NOW.timestamp()]
    ops = service(store, clock=lambda: now[0], ttl_s=10)
    first = ops.summary()
    segment_reads = [k for k in store.reads if k.startswith("preferences/")]
    assert len(segment_reads) == 4
    store.reads.clear()
    assert ops.summary() is first and store.reads == []  # within the ttl: nothing read at all
    now[0] += 11
    ops.summary()
    assert not any(k.startswith("preferences/") for k in store.reads)  # segments are immutable: cached by key
    # A new segment is read, and only it.
    _segment(store, store.config.bucket_buffer, "3", 1, 0, [NOW])
    store.reads.clear()
    now[0] += 11
    assert ops.summary()["buffer"]["total_votes"] == 111
    assert [k for k in store.reads if k.startswith("preferences/")] == [segment_key("3", 1, 0, 0)]


def test_a_section_that_cannot_be_read_is_reported_and_the_rest_is_kept(seeded):
    store, _ = seeded
    original = store.list_keys

    def no_buffer(bucket, prefix=""):
        if bucket == store.config.bucket_buffer:
            raise PermissionError("AccessDenied")
        return original(bucket, prefix)

    store.list_keys = no_buffer
    summary = service(store).summary()
    assert summary["errors"] == [{"section": "buffer", "error": "PermissionError: AccessDenied"}]
    assert summary["buffer"] is None and summary["served"]["version"] == "3" and len(summary["cycles"]) == 3
    store.down = True
    summary = service(store).summary()
    assert {e["section"] for e in summary["errors"]} == {"buffer", "registry", "reward_models", "canaries"}
    assert summary["versions"] == [] and summary["served"]["version"] is None


def test_canaries_and_the_cycles_they_decided(seeded):
    store, _ = seeded  # version 3 (run r3) was promoted by a canary (tests/ops_helpers.py)
    summary = service(store).summary()
    (canary,) = summary["canaries"]
    assert canary["state"] == "promoted" and canary["votes"]["decided"] == 60 and "event_ids" not in canary
    by_run = {c["run_id"]: c for c in summary["cycles"]}
    assert by_run["r3"]["canary"]["state"] == "promoted" and by_run["r3"]["canary"]["lower"] == 0.52
    assert all(c["canary"] is None for run, c in by_run.items() if run != "r3")


def test_empty_registry_and_buffer():
    summary = service(Store()).summary()
    assert summary["errors"] == [] and summary["versions"] == [] and summary["cycles"] == []
    assert summary["served"] == {"version": None, "previous": None, "updated_at": None, "details": None}
    assert summary["buffer"]["total_votes"] == 0 and summary["buffer"]["votes_per_minute"]["by_policy"] == {}


def test_consecutive_refusals_are_counted(seeded):
    store, _ = seeded
    registry = Registry(store, store.config.bucket_models)
    for minutes in (10, 5):
        _reject(
            registry,
            "generator",
            NOW - timedelta(minutes=minutes),
            {
                "reason": "no checkpoint passed the gate",
                "gate": {"checks": []},
                "lineage": {"run_id": "rx", "parent_version": "3"},
            },
        )
    assert service(store).summary()["cycles_since_accepted"] == 2


def test_non_finite_metrics_of_a_refused_cycle_become_null(seeded):
    store, _ = seeded
    nan = float("nan")
    _reject(
        Registry(store, store.config.bucket_models),
        "generator",
        NOW - timedelta(minutes=1),
        {
            "reason": "no checkpoint passed the gate: step 5: finite: non-finite",
            "gate": {
                "checks": [{"name": "finite", "passed": False, "detail": "non-finite"}],
                "candidate": {"reward": nan, "kl": float("inf")},
                "baseline": {"reward": 1.45},
                "checkpoints": [{"step": 5, "passed": False, "reward": nan, "kl": nan}],
            },
            "lineage": {"run_id": "r4", "parent_version": "3"},
        },
    )
    summary = service(store).summary()
    newest = summary["cycles"][0]
    assert newest["run_id"] == "r4" and newest["reward"] is None and newest["kl"] is None
    assert newest["checkpoints"] == [{"step": 5, "passed": False, "reward": None, "kl": None}]
    json.dumps(summary, allow_nan=False)  # what the JSON response does


# ----------------------------------------------------------------- routes


@pytest.fixture()
def client(seeded):
    store, _ = seeded
    settings = GatewaySettings(gateway_api_keys=f"ops:{hash_key(KEY)}", gateway_store_timeout_s=2)
    app = create_app(settings, triton=FakeTriton(), store=store, text_encoder=FakeTextEncoder())
    with TestClient(app) as client:
        yield client


def test_summary_needs_an_api_key_not_a_page_token(client):
    assert client.get("/v1/ops/summary").status_code == 401
    assert client.get("/v1/ops/summary", headers={"Authorization": "Bearer mrl_wrong"}).status_code == 401
    page_token = client.get("/page-token").json()["token"]
    refused = client.get("/v1/ops/summary", headers={"Authorization": f"Bearer {page_token}"})
    assert refused.status_code == 403 and "API key" in refused.json()["detail"]
    answer = client.get("/v1/ops/summary", params={"window_minutes": 15}, headers={"X-API-Key": KEY})
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["served"]["version"] == "3" and body["window_minutes"] == 15
    assert len(body["buffer"]["votes_per_minute"]["total"]) == 15
    assert client.get("/v1/ops/summary", params={"window_minutes": 0}, headers={"X-API-Key": KEY}).status_code == 422


def test_dashboard_page_is_served_without_a_key(client):
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/dashboard.js" in page.text and 'id="api-key"' in page.text
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "/v1/ops/summary" in script.text
    assert "/v1/ops/summary" in client.get("/openapi.json").json()["paths"]
    assert "/dashboard" not in client.get("/openapi.json").json()["paths"]
