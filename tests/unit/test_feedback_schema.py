"""The preference.v1 event: validation rules and the published JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from feedback_helpers import hex_id, make_event, make_record
from pydantic import ValidationError

from musicrl.schemas.preference import FeedbackRequest, PreferenceEvent, json_schema, json_schema_text

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_published_json_schema_is_up_to_date():
    published = ROOT / "docs" / "schemas" / "preference.v1.json"
    assert published.read_text() == json_schema_text(), "run `musicrl consumer schema` and commit the file"


def test_event_round_trips_through_bytes_and_matches_the_json_schema():
    event = make_event(make_record(), choice="tie")
    data = event.to_bytes()
    assert json.loads(data)["schema"] == "preference.v1"
    assert PreferenceEvent.from_bytes(data) == event
    jsonschema.validate(json.loads(data), json_schema())


def request_fields(**overrides):
    fields = dict(
        event_id=hex_id(),
        generation_id=hex_id(),
        clip_a_id=hex_id(),
        clip_b_id=hex_id(),
        choice="b",
        listen_a_s=3.0,
        listen_b_s=4.5,
        user_id="user-1",
        vote_token="v1.payload.signature",
    )
    fields.update(overrides)
    return fields


@pytest.mark.parametrize(
    "overrides",
    [
        {"event_id": "short"},
        {"event_id": "has spaces in it"},
        {"generation_id": "G" * 32},
        {"clip_a_id": "abc"},
        {"choice": "both"},
        {"listen_a_s": -1.0},
        {"listen_b_s": 7200.0},
        {"user_id": ""},
        {"vote_token": ""},
        {"vote_token": "v1.payload with spaces.sig"},
        {"client_ts": "2026-01-01T00:00:00"},  # no time zone
        {"app_id": "bad/app"},
        {"unexpected": 1},
    ],
)
def test_request_rejects_bad_fields(overrides):
    with pytest.raises(ValidationError):
        FeedbackRequest(**request_fields(**overrides))


def test_request_needs_the_vote_token_which_the_event_does_not_have():
    fields = request_fields()
    assert FeedbackRequest(**fields).vote_token == "v1.payload.signature"
    del fields["vote_token"]
    with pytest.raises(ValidationError, match="vote_token"):
        FeedbackRequest(**fields)
    assert "vote_token" not in PreferenceEvent.model_fields


def test_event_rejects_the_same_clip_twice_but_the_request_leaves_it_to_the_gateway():
    # The gateway checks the vote token first, so a forged vote gets 403 whatever its clips
    # (test_feedback_gateway checks the 422 a valid token then gets); the event itself never carries it.
    clip = hex_id()
    assert FeedbackRequest(**request_fields(clip_a_id=clip, clip_b_id=clip)).clip_a_id == clip
    fields = {k: v for k, v in request_fields().items() if k not in ("user_id", "vote_token", "client_ts")}
    with pytest.raises(ValidationError, match="two different clips"):
        PreferenceEvent(
            **fields | {"clip_a_id": clip, "clip_b_id": clip},
            user_pseudonym="0" * 64,
            received_at="2026-01-01T00:00:00Z",
        )


def test_json_schema_rejects_what_the_model_rejects():
    document = json.loads(make_event(make_record()).to_bytes())
    for field, value in [("choice", "both"), ("user_pseudonym", "not-a-hash"), ("schema", "preference.v2")]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**document, field: value}, json_schema())
        with pytest.raises(ValidationError):
            PreferenceEvent.model_validate({**document, field: value})
