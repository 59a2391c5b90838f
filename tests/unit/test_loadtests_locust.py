"""The locustfiles, run headless for a few seconds against a small fake gateway.

The fake speaks the gateway's public contract (the same pydantic request models)
so that the users' requests are validated as the real gateway would; the real
gateway is exercised in tests/integration/test_loadtests_gateway.py.
"""

from __future__ import annotations

import uuid
from contextlib import ExitStack

import numpy as np
import pytest
from fastapi import FastAPI, Header, HTTPException, Response
from servers import serve_in_thread

from loadtests.locust_runner import LocustRun, run_locust, summarize
from musicrl.audio.formats import encode_audio
from musicrl.schemas.preference import FeedbackAccepted, FeedbackRequest
from serving.schemas import GenerationRequest

pytestmark = pytest.mark.unit

SAMPLE_RATE = 16_000
API_KEY = "fake-gateway-key"


class FakeGateway:
    def __init__(self, failing: bool = False):
        self.failing = failing
        self.generations: dict[str, list[str]] = {}
        self.vote_tokens: dict[str, str] = {}  # generation id -> its token
        self.clips: dict[str, tuple[float, float]] = {}
        self.feedback: list[FeedbackRequest] = []
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()
        rng = np.random.default_rng(0)

        def authenticate(authorization: str | None) -> None:
            if authorization != f"Bearer {API_KEY}":
                raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})

        @app.post("/v1/generations", status_code=201)
        def generate(body: GenerationRequest, authorization: str | None = Header(None)) -> dict:
            authenticate(authorization)
            if self.failing:
                raise HTTPException(503, "generator unavailable")
            generation_id = uuid.uuid4().hex
            clips = []
            for index in range(body.n or 2):
                clip_id = uuid.uuid4().hex
                self.clips[clip_id] = (float(220 * 2 ** rng.uniform(0, 2)), float(2 ** rng.uniform(-1, 3)))
                clips.append({
                    "clip_id": clip_id, "index": index, "audio_url": f"/v1/clips/{clip_id}/audio",
                    "download_url": f"/v1/clips/{clip_id}/audio", "duration_s": body.duration_s,
                    "sample_rate": SAMPLE_RATE, "policy_version": "1", "model_name": "generator", "seed": index,
                })  # fmt: skip
            self.generations[generation_id] = [clip["clip_id"] for clip in clips]
            self.vote_tokens[generation_id] = f"v1.{uuid.uuid4().hex}.sig"
            return {
                "generation_id": generation_id,
                "prompt": body.prompt,
                "clips": clips,
                "vote_token": self.vote_tokens[generation_id],
            }

        @app.get("/v1/clips/{clip_id}/audio")
        def audio(clip_id: str) -> Response:
            if clip_id not in self.clips:
                raise HTTPException(404, "no such clip")
            f0, rate = self.clips[clip_id]
            t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
            wave = 0.3 * np.sin(2 * np.pi * f0 * t) * np.exp(-4 * ((t * rate) % 1.0) / rate)
            return Response(encode_audio(wave.astype(np.float32), SAMPLE_RATE, "wav"), media_type="audio/wav")

        @app.post("/v1/feedback", status_code=202)
        def feedback(body: FeedbackRequest, authorization: str | None = Header(None)) -> FeedbackAccepted:
            authenticate(authorization)
            if self.generations.get(body.generation_id) is None:
                raise HTTPException(404, "unknown generation")
            if body.vote_token != self.vote_tokens[body.generation_id]:
                raise HTTPException(403, "not the vote token of this generation")
            if {body.clip_a_id, body.clip_b_id} - set(self.generations[body.generation_id]):
                raise HTTPException(422, "clips are not of this generation")
            self.feedback.append(body)
            return FeedbackAccepted(event_id=body.event_id, partition=0, offset=len(self.feedback))

        return app


@pytest.fixture
def serve():
    with ExitStack() as servers:
        yield lambda gateway: servers.enter_context(serve_in_thread(gateway.app, timeout_s=10, log_level="warning"))


FAST = {
    "LOADTEST_DURATION_S": "2",
    "LOADTEST_LISTEN_SPEED": "20",
    "LOADTEST_LISTENER_RATE": "4",
    "LOADTEST_APP_RATE": "4",
    "LOADTEST_SEED": "3",
    "MUSICRL_API_KEY": API_KEY,  # the users present it (serving.client.api_key_headers)
}


def test_mix_of_apps_and_listeners_runs_headless_and_reports(serve, tmp_path):
    gateway = FakeGateway()
    host = serve(gateway)
    run = LocustRun("mix", host, users=4, spawn_rate=2, run_time_s=8, out_dir=tmp_path, env=FAST)
    code, summary = run_locust(run, timeout_s=90)

    log = (tmp_path / "mix_locust.log").read_text()
    assert code == 0, log
    assert summary["failures"] == 0 and summary["requests"] > 10
    endpoints = summary["endpoints"]
    assert endpoints["POST /v1/generations"]["requests"] > 5
    assert endpoints["GET /v1/clips/{clip_id}/audio"]["requests"] >= 2
    assert endpoints["POST /v1/feedback"]["requests"] >= 1
    for report in (
        "mix_stats.csv",
        "mix_stats_history.csv",
        "mix_failures.csv",
        "mix.html",
        "mix.png",
        "mix_summary.json",
    ):
        assert (tmp_path / report).stat().st_size > 0, report

    # Every vote reached the gateway, valid, from a simulated listener, on a pair it was given.
    # (A vote in flight when the run stops may miss the statistics or the vote count.)
    counted = endpoints["POST /v1/feedback"]["requests"]
    assert counted <= sum(summary["votes"].values()) <= len(gateway.feedback) <= counted + run.users
    assert {vote.choice for vote in gateway.feedback} <= {"a", "b", "tie", "none"}
    assert all(vote.user_id.startswith("listener-3-") for vote in gateway.feedback)
    assert len({vote.event_id for vote in gateway.feedback}) == len(gateway.feedback)
    assert all(0 <= vote.listen_a_s <= 2.0 and 0 <= vote.listen_b_s <= 2.0 for vote in gateway.feedback)


def test_failed_requests_are_counted_and_fail_the_run(serve, tmp_path):
    host = serve(FakeGateway(failing=True))
    run = LocustRun("apps", host, users=2, spawn_rate=2, run_time_s=3, out_dir=tmp_path, env=FAST)
    code, summary = run_locust(run, timeout_s=60)
    assert code != 0
    assert summary["failures"] == summary["requests"] > 0
    assert "503" in (tmp_path / "apps_failures.csv").read_text()


def test_summary_needs_the_statistics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no statistics"):
        summarize(tmp_path / "missing_stats.csv")
