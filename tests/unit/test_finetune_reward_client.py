"""The reward service client: batching, retries on 429/5xx/transport errors, clear errors on 4xx."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from finetune_worker.reward_client import HttpRewardFunction, RewardServiceError
from finetune_worker.rewards import make_reward_fn

pytestmark = pytest.mark.unit


def _service(fail_first: list[int] | None = None):
    calls = {"n": 0, "sizes": []}
    failures = list(fail_first or [])

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if failures:
            return httpx.Response(failures.pop(0), json={"detail": "busy"})
        body = json.loads(request.content)
        calls["sizes"].append(len(body["items"]))
        assert body["components"] == ["text_adherence", "quality", "preference"]
        scores = [
            {
                "text_adherence": float(sum(item["tokens"])),
                "quality_mos": 3.0,
                "quality": 0.5,
                "preference": -1.0,
                "combined": 0.0,
            }
            for item in body["items"]
        ]
        return httpx.Response(
            200,
            json={
                "scores": scores,
                "components": body["components"],
                "weights": {},
                "model_versions": {"text_adherence": "1", "quality": "1", "preference": "7"},
            },
        )

    return httpx.MockTransport(handler), calls


def test_batches_of_at_most_max_items_in_order():
    transport, calls = _service()
    client = HttpRewardFunction("http://reward", max_items=4, transport=transport)
    tokens = np.arange(10)[:, None] * np.ones((10, 3), dtype=np.int64)
    out = client([f"p{i}" for i in range(10)], tokens)
    assert calls["sizes"] == [4, 4, 2]
    assert out["text_adherence"].tolist() == [3.0 * i for i in range(10)]
    assert out["quality_mos"].tolist() == [3.0] * 10 and client.versions["preference"] == "7"


def test_retries_busy_and_server_errors_then_succeeds():
    transport, calls = _service(fail_first=[429, 503])
    client = HttpRewardFunction("http://reward", transport=transport, attempts=3)
    assert client(["p"], np.zeros((1, 2), dtype=np.int64))["quality"].tolist() == [0.5]
    assert calls["n"] == 3


def test_client_errors_fail_at_once_with_the_message():
    transport, calls = _service(fail_first=[422])
    client = HttpRewardFunction("http://reward", transport=transport)
    with pytest.raises(RewardServiceError, match="422"):
        client(["p"], np.zeros((1, 2), dtype=np.int64))
    assert calls["n"] == 1


def test_unreachable_service_is_a_clear_error_after_retries():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    client = HttpRewardFunction("http://reward", transport=httpx.MockTransport(refuse), attempts=2)
    with pytest.raises(RewardServiceError, match="unreachable"):
        client(["p"], np.zeros((1, 2), dtype=np.int64))


def test_reward_specs():
    assert isinstance(make_reward_fn("http://127.0.0.1:1"), HttpRewardFunction)
    with pytest.raises(ValueError, match="unknown reward function"):
        make_reward_fn("ftp://nope")
    with pytest.raises(ValueError, match="python:module:attr"):
        make_reward_fn("python:nocolon")
