"""The reliability experiment's pure parts: forged votes, their schedule, the bombs, synthetic buffers, the summary."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC

import numpy as np
import pytest

from loadtests.reliability import (
    FORGED_KINDS,
    Keys,
    Pair,
    bomb_request,
    bombs,
    chunk_plan,
    expired_token,
    forged_vote,
    landed,
    parse_schemathesis,
    process_memory,
    summarize,
    synthetic_chunk,
    table_rows,
    valid_vote,
    vote_schedule,
)
from musicrl.audio.formats import AudioFormatError, AudioOutOfRange, AudioTooLarge, check_header, read_header
from musicrl.schemas.preference import FeedbackRequest
from serving.services.vote_tokens import VoteTokens

pytestmark = pytest.mark.unit

SECRET = b"test-vote-secret"


def _pair(i: int, tokens: VoteTokens) -> Pair:
    gid, a, b = (f"{i:02x}" * 16, f"{i + 100:02x}" * 16, f"{i + 200:02x}" * 16)
    token, _ = tokens.issue(gid, [(a, 2.0), (b, 2.0)], "stack", f"user-{i}")
    return Pair(gid, (a, b), (2.0, 2.0), token, f"user-{i}")


def _refusal(policy_tokens: VoteTokens, vote, key_name: str = "stack") -> str | None:
    """What the gateway's checks say about a vote (before the ledger): None when they let it through."""
    body = vote.body
    if "vote_token" not in body:
        return "422 no token"
    FeedbackRequest.model_validate(body)  # every forged body is well-formed apart from what it forges
    try:
        claims = policy_tokens.verify(body["vote_token"])
    except Exception as err:  # VoteRefused
        return f"403 {err}"
    if claims.generation_id != body["generation_id"]:
        return "403 generation"
    if claims.key_name != (key_name if vote.key == "main" else "other"):
        return "403 key"
    if claims.user != policy_tokens.user_digest(body["user_id"]):
        return "403 user"
    for field, listen in (("clip_a_id", "listen_a_s"), ("clip_b_id", "listen_b_s")):
        if body[field] not in claims.clips:
            return "403 clip"
        if body[listen] > claims.clips[body[field]] + 0.5:
            return "422 listen"
    return None


def test_every_forged_kind_is_refused_by_the_token_checks_except_the_replay_which_is_a_valid_looking_second_vote():
    tokens = VoteTokens(SECRET, ttl_s=3600)
    pairs = [_pair(i, tokens) for i in range(3)]
    rng = np.random.default_rng(0)
    valid = valid_vote(pairs[0], rng)
    assert _refusal(tokens, valid) is None and valid.body["listen_a_s"] == 2.0
    outcomes = {}
    for kind in FORGED_KINDS:
        vote = forged_vote(kind, pairs[0], pairs[1], rng, lambda pair: expired_token(SECRET, pair, "stack"))
        assert vote.kind == kind and vote.body["event_id"] != valid.body["event_id"]
        outcomes[kind] = _refusal(tokens, vote)
    assert outcomes.pop("replay") is None  # refused by the gateway's ledger (409), not by the token
    assert all(outcomes.values()), outcomes
    assert "expired" in outcomes["expired"] and outcomes["no_token"].startswith("422")
    assert outcomes["listen_too_long"].startswith("422") and outcomes["other_user"] == "403 user"
    with pytest.raises(ValueError):
        forged_vote("polite", pairs[0], pairs[1], rng, lambda pair: "")


@pytest.mark.parametrize("n_forged,n_valid", [(1000, 40), (9, 1), (37, 5), (0, 3)])
def test_the_schedule_sends_every_kind_every_valid_vote_once_and_replays_only_what_was_voted(n_forged, n_valid):
    steps = vote_schedule(n_forged, n_valid, seed=1)
    kinds = Counter(kind for kind, _, _ in steps)
    assert kinds.pop("valid") == n_valid and sum(kinds.values()) == n_forged
    if n_forged >= len(FORGED_KINDS):
        assert set(kinds) == set(FORGED_KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
    voted: set[int] = set()
    for kind, target, other in steps:
        assert 0 <= target < n_valid and 0 <= other < n_valid
        if kind == "valid":
            assert target not in voted
            voted.add(target)
        elif kind == "replay":
            assert target in voted
        if n_valid > 1 and kind != "valid":
            assert other != target
    assert voted == set(range(n_valid))
    if n_valid > 1 and n_forged >= 4 * n_valid:  # interleaved, not all at one end
        positions = [i for i, step in enumerate(steps) if step[0] == "valid"]
        assert positions[-1] - positions[0] > len(steps) // 2


def test_landed_counts_by_event_id():
    assert landed({"a", "b", "x"}, {"a", "b", "c"}, {"x", "y"}) == {
        "rows_in_buffer": 3,
        "valid_landed": 2,
        "forged_landed": 1,
        "other_rows": 0,
    }


def test_every_bomb_header_is_refused_by_the_header_check_or_unreadable():
    from musicrl.audio.formats import AudioLimits

    limits = AudioLimits(min_sample_rate=8000, max_sample_rate=48_000, max_channels=2, max_seconds=60.0)
    checked = 0
    for bomb in bombs(max_items=4, max_body_bytes=2048):
        body = bomb_request(bomb, clip_ids=["0" * 32] * len(bomb.audio))
        if bomb.name == "body_over_limit":
            assert len(body) > 2048
        if bomb.body is None and not bomb.tokens and not bomb.by_clip_id:
            assert json.loads(body)["items"][0]["audio_b64"]
        for data in bomb.audio if bomb.name not in ("items_5",) else []:
            try:
                header = read_header(data)
            except AudioFormatError:
                continue
            if header.frames / header.samplerate <= 60 and 8000 <= header.samplerate <= 48_000 and header.channels <= 2:
                # Within the header's limits: a FLAC claiming a minute it does not hold (decoding finds nothing),
                # a WAV claiming 12 h whose length libsndfile takes from the bytes present (too short).
                assert bomb.name.startswith("flac_48k_stereo_60s") or bomb.name.endswith("wav_claims_12h"), bomb.name
                continue
            with pytest.raises((AudioOutOfRange, AudioTooLarge)):
                check_header(header, limits)
            checked += 1
    assert checked >= 6  # libsndfile itself refuses to open the 4 GHz and the 65,535-channel WAV
    names = [b.name for b in bombs(max_items=4)]
    assert len(names) == len(set(names)) and "items_5" in names


def test_synthetic_chunks_fit_the_buffer_schema_and_the_plan_covers_every_vote():
    from datetime import datetime

    from musicrl.buffer import parquet_to_table, rows_to_parquet

    plan = chunk_plan(2500, 3, 400)
    assert sum(n for _, _, n in plan) == 2500 and {p for p, _, _ in plan} == {0, 1, 2}
    assert all(n <= 400 for _, _, n in plan) and [f for p, f, _ in plan if p == 0][:2] == [0, 400]
    rows = synthetic_chunk(1, 400, 50, "3", np.random.default_rng(0), datetime(2026, 1, 1, tzinfo=UTC))
    table = parquet_to_table(rows_to_parquet(rows))
    assert table.num_rows == 50 and len(set(table.column("event_id").to_pylist())) == 50
    assert table.column("kafka_offset").to_pylist()[0] == 400 and set(table.column("policy_version").to_pylist()) == {
        "3"
    }


def test_the_private_gateway_keys_parse_as_the_gateway_reads_them():
    from serving.settings import GatewaySettings

    keys = Keys()
    env = keys.gateway_env("stack:" + "ab" * 32 + ":60000:1024", limited_rate=3)
    settings = GatewaySettings(
        gateway_api_keys=env["MUSICRL_GATEWAY_API_KEYS"], gateway_vote_token_key=env["MUSICRL_GATEWAY_VOTE_TOKEN_KEY"]
    )
    by_name = {spec.name: spec for spec in settings.gateway_api_keys}
    assert by_name["limited"].rate_per_min == 3 and by_name["narrow"].max_concurrency == 1 and "other" in by_name


def test_process_memory_reads_this_process():
    memory = process_memory(os.getpid())
    assert 0 < memory["rss_mb"] <= memory["peak_mb"]


def _results(**overrides):
    results = {
        "auth": {
            "write_routes": [{"route": "POST /v1/feedback", "statuses": {"no key": 401, "unknown key": 401}}],
            "rate_limited": {
                "rate_per_min": 2,
                "statuses": [201, 201, 429],
                "throttled": 1,
                "throttled_with_retry_after": 1,
                "retry_after": ["20"],
            },
            "concurrency_limited": {
                "max_concurrency": 1,
                "statuses": [201, 429],
                "throttled": 1,
                "throttled_with_retry_after": 1,
                "retry_after": ["1"],
            },
        },
        "votes": {
            "forged": 10,
            "valid": 2,
            "forged_accepted": 0,
            "valid_accepted": 2,
            "by_kind": {"valid": {202: 2}, "replay": {409: 10}},
            "buffer": {"valid_landed": 2, "forged_landed": 0, "rows_in_buffer": 2, "other_rows": 0},
        },
        "bombs": {
            "bombs": [{"name": "b", "statuses": [422, 413]}],
            "idle_rss_mb": 100.0,
            "peak_rss_mb": 150.0,
            "peak_ratio_to_idle": 1.5,
        },
        "consumer": {
            "points": [
                {
                    "votes": 1,
                    "chunks": 1,
                    "rss_mb": 100,
                    "peak_mb": 100,
                    "healthy_s": 1,
                    "restored_s": 2,
                    "known_event_ids": 0,
                },
                {
                    "votes": 10,
                    "chunks": 1,
                    "rss_mb": 110,
                    "peak_mb": 110,
                    "healthy_s": 1,
                    "restored_s": 2.2,
                    "known_event_ids": 9,
                },
            ],
            "rss_ratio": 1.1,
            "startup_ratio": 1.1,
        },
        "schemathesis": {
            "gateway": {"ran": True, "cases": 50, "failures": 0, "errors": 0, "failure_kinds": []},
            "reward_service": {"ran": True, "cases": 30, "failures": 0, "errors": 0},
        },
    }
    for path, value in overrides.items():
        part, _, key = path.partition("__")
        results[part][key] = value
    return results


def test_the_summary_meets_its_targets_only_when_every_measure_does():
    assert summarize(_results())["all_met"]
    failing = {
        "auth__write_routes": [{"route": "POST /v1/generations", "statuses": {"no key": 422}}],
        "votes__forged_accepted": 1,
        "votes__buffer": {"valid_landed": 2, "forged_landed": 1},
        "votes__valid_accepted": 1,
        "bombs__bombs": [{"name": "b", "statuses": [500]}],
        "bombs__peak_ratio_to_idle": 2.5,
        "consumer__rss_ratio": 1.3,
        "consumer__startup_ratio": None,
        "schemathesis__gateway": {
            "ran": True,
            "cases": 5,
            "failures": 1,
            "errors": 0,
            "failure_kinds": [{"code": "ST202", "operations": ["POST /v1/feedback"]}],
        },
        "schemathesis__reward_service": {"ran": False, "note": "not installed"},
    }
    for path, value in failing.items():
        summary = summarize(_results(**{path: value}))
        assert not summary["all_met"], path
        assert sum(not t["met"] for t in summary["targets"].values()) == 1, path
    rate = _results()
    rate["auth"]["rate_limited"]["statuses"] = [429, 201, 429]  # throttled before its rate was spent
    assert not summarize(rate)["targets"]["over_rate_429_retry_after"]["met"]
    partial = {"votes": _results()["votes"]}
    assert set(summarize(partial)["targets"]) == {"forged_votes_land_0", "valid_votes_all_land"}
    assert not summarize({})["all_met"]
    crashed = _results()
    crashed["bombs"] = {"error": "RuntimeError: reward is not running"}
    summary = summarize(crashed)
    assert not summary["all_met"] and not summary["targets"]["bombs_completed"]["met"]
    assert "bombs_all_4xx" not in summary["targets"] and summary["targets"]["forged_votes_land_0"]["met"]
    crashed["summary"] = summary
    assert ("bombs", "FAILED", "RuntimeError: reward is not running") in table_rows(crashed)


def test_the_table_has_a_row_per_kind_bomb_and_target():
    results = _results()
    results["summary"] = summarize(results)
    rows = table_rows(results)
    assert ("votes", "replay (10)", "409: 10") in rows
    assert any(part == "bombs" and "x1.5" in value for part, _, value in rows)
    assert sum(part == "target" for part, _, _ in rows) == len(results["summary"]["targets"])


def test_schemathesis_report_parsing(tmp_path):
    report = tmp_path / "report.json"
    assert parse_schemathesis(report, 2)["ran"] is False
    report.write_text(
        json.dumps(
            {
                "operations": {"tested": 3},
                "test_cases": {"generated": 41, "with_failures": 2, "unique_failures": 1},
                "failures": [
                    {"code": "ST201", "title": "t", "count": 2, "operations": ["POST /x"]},
                    {"code": "ST202", "title": "t", "count": 1, "operations": ["POST /x"]},
                ],
                "errors": [],
            }
        )
    )
    parsed = parse_schemathesis(report, 1)
    assert parsed["cases"] == 41 and parsed["failures"] == 2 and parsed["errors"] == 0  # two kinds: at least two
    assert parsed["failure_kinds"][0]["code"] == "ST201"
