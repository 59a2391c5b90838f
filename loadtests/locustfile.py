"""Locust users of the generation gateway.

- ``AppUser``: an app asking for music (``POST /v1/generations``) at a steady rate.
- ``ListenerUser``: a person (a simulated listener from ``musicrl.listeners``) who asks
  for a pair, downloads both clips, listens for as long as that listener would, and
  votes through ``POST /v1/feedback``.

``loadtests/locustfile_ramp.py`` adds a ramp of both. Run them with
``musicrl experiment locust`` (headless, CSV and HTML reports; see docs/loadtests.md)
or with locust's own command line. Everything is configured by ``LOADTEST_*``
environment variables (``LoadtestSettings``) so that the same file serves every run;
the API key is ``MUSICRL_API_KEY`` (what ``musicrl stack env`` exports).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from functools import cache
from pathlib import Path

import gevent
import numpy as np
from locust import FastHttpUser, constant_throughput, events, task
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from musicrl.audio.formats import decode_audio
from musicrl.listeners import ListenerConfig, Population
from serving.client import api_key_headers

PROMPTS = (
    "upbeat electronic dance track with bright synth leads",
    "calm lo-fi piano with soft drums",
    "slow ambient pads in a minor key",
    "fast jazzy walking bass with brushed drums",
    "cheerful acoustic guitar folk tune",
    "dark cinematic strings building tension",
    "playful marimba melody over light percussion",
    "energetic rock riff with driving drums",
)


class LoadtestSettings(BaseSettings):
    """How the simulated apps and listeners behave (environment ``LOADTEST_*``)."""

    model_config = SettingsConfigDict(env_prefix="LOADTEST_", extra="ignore")

    duration_s: float = Field(5.0, gt=0, description="Seconds of audio per generated clip.")
    candidates: int = Field(2, ge=2, description="Clips per generation request.")
    app_rate: float = Field(0.5, gt=0, description="Generation requests per second per app user.")
    listener_rate: float = Field(0.05, gt=0, description="Pairs judged per second per listener user (at most).")
    listen_speed: float = Field(1.0, gt=0, description="1 = listen in real time; 10 = ten times faster.")
    use_presigned_urls: bool = Field(False, description="Download from the object store instead of the gateway.")
    seed: int = Field(0, description="Seeds the listener population and each listener's choices.")
    population_size: int = Field(200, ge=1)
    app_id: str = "loadtest"
    votes_file: Path | None = Field(None, description="Where the vote counts are written at the end of a run.")


@cache
def settings() -> LoadtestSettings:
    return LoadtestSettings()


@cache
def population() -> Population:
    return Population(ListenerConfig(size=settings().population_size), seed=settings().seed)


_listener_numbers = itertools.count()
_prompt_numbers = itertools.count()
votes: Counter[str] = Counter()


@events.test_stop.add_listener
def write_vote_counts(**_kwargs) -> None:
    if settings().votes_file is not None:
        settings().votes_file.parent.mkdir(parents=True, exist_ok=True)
        settings().votes_file.write_text(json.dumps({"votes": dict(votes), "total": sum(votes.values())}, indent=2))


def next_prompt() -> str:
    return PROMPTS[next(_prompt_numbers) % len(PROMPTS)]


def generation_body(config: LoadtestSettings, **extra) -> dict:
    return {
        "prompt": next_prompt(),
        "n": config.candidates,
        "duration_s": config.duration_s,
        "app_id": config.app_id,
    } | extra


@cache
def headers() -> dict[str, str]:
    return api_key_headers()


class AppUser(FastHttpUser):
    """An app that requests music at a steady rate and plays nothing back."""

    weight = 1

    def wait_time(self):
        return constant_throughput(settings().app_rate)(self)  # the pacing state lives on the user

    @task
    def generate(self) -> None:
        with self.client.post(
            "/v1/generations",
            json=generation_body(settings()),
            headers=headers(),
            name="/v1/generations",
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif len(response.json()["clips"]) != settings().candidates:
                response.failure("wrong number of clips")


class ListenerUser(FastHttpUser):
    """A person who asks for a pair, listens to it and votes (or does not)."""

    weight = 1

    def on_start(self) -> None:
        number = next(_listener_numbers)
        self.listener = population()[number % len(population())]
        self.rng = np.random.default_rng([settings().seed, number])

    def wait_time(self):
        return constant_throughput(settings().listener_rate)(self)

    @task
    def judge_a_pair(self) -> None:
        config = settings()
        with self.client.post(
            "/v1/generations",
            json=generation_body(config, user_id=self.listener.id),
            headers=headers(),
            name="/v1/generations",
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            generation = response.json()
        clip_a, clip_b = generation["clips"][:2]
        heard = [self._download(clip) for clip in (clip_a, clip_b)]
        if any(audio is None for audio in heard):
            return
        (wave_a, sample_rate), (wave_b, _) = heard
        vote = self.listener.judge(wave_a, wave_b, self.rng, sample_rate=sample_rate)
        gevent.sleep((vote.listen_a_s + vote.listen_b_s) / config.listen_speed)
        body = {
            "event_id": uuid.uuid4().hex,
            "generation_id": generation["generation_id"],
            "clip_a_id": clip_a["clip_id"],
            "clip_b_id": clip_b["clip_id"],
            "choice": vote.choice,
            "listen_a_s": vote.listen_a_s,
            "listen_b_s": vote.listen_b_s,
            "user_id": self.listener.id,
            "app_id": config.app_id,
            "vote_token": generation["vote_token"],
        }
        with self.client.post(
            "/v1/feedback", json=body, headers=headers(), name="/v1/feedback", catch_response=True
        ) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            else:
                votes[vote.choice] += 1

    def _download(self, clip: dict) -> tuple[np.ndarray, int] | None:
        url = clip["audio_url"] if settings().use_presigned_urls else clip["download_url"]
        with self.client.get(url, name="/v1/clips/{clip_id}/audio", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return None
            return decode_audio(response.content)
