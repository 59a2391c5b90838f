"""Buffer rows for tests that need chosen versions, choices and times (canary, dashboard)."""

from __future__ import annotations

from datetime import datetime


def vote_row(
    *,
    event_id: str,
    generation_id: str,
    choice: str,
    received: datetime,
    version_a: str,
    version_b: str,
    offset: int,
    partition: int = 0,
    experiment: str | None = None,
    policy_version: str | None = None,
) -> dict:
    """A buffer row as the consumer writes it (two short one-codebook clips, full listens), for tests that need
    rows with chosen versions, choices and times. ``policy_version`` defaults to the newer of the two clips'."""
    return {
        "event_id": event_id,
        "generation_id": generation_id,
        "clip_a_id": "a" * 32,
        "clip_b_id": "b" * 32,
        "choice": choice,
        "is_tie": choice == "tie",
        "listen_a_s": 5.0,
        "listen_b_s": 5.0,
        "listen_a_frac": 1.0,
        "listen_b_frac": 1.0,
        "user_pseudonym": "ab" * 32,
        "app_id": "web",
        "client_ts": received,
        "received_at": received,
        "prompt": "calm piano",
        "experiment": experiment,
        "temperature": 0.99,
        "policy_version": policy_version or max(version_a, version_b, key=int),
        "mixed_policy": version_a != version_b,
        "policy_version_a": version_a,
        "policy_version_b": version_b,
        "seed_a": 1,
        "seed_b": 2,
        "duration_a_s": 5.0,
        "duration_b_s": 5.0,
        "tokens_a": [1, 2],
        "tokens_b": [3, 4],
        "logprobs_a": [-0.5, -0.5],
        "logprobs_b": [-0.5, -0.5],
        "kafka_partition": partition,
        "kafka_offset": offset,
    }
