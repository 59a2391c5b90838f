"""The preference event (`preference.v1`): one user's verdict on a pair of clips.

Apps post a :class:`FeedbackRequest` to the gateway (``POST /v1/feedback``) with the
``vote_token`` of the generation; the gateway checks the token, replaces the user id
by a keyed-hash pseudonym, stamps the time it received the request and produces a
:class:`PreferenceEvent` to Kafka (the token is not part of the event). The
feedback consumer validates every message against :class:`PreferenceEvent`.

Evolving the schema: a compatible change (a new optional field) stays
``preference.v1`` only if consumers that ignore it stay correct; anything else
is a new model ``PreferenceEventV2`` with ``schema = "preference.v2"`` and its
own JSON Schema file, and the consumer accepts both while producers migrate.
The published JSON Schema is ``docs/schemas/preference.v1.json`` (regenerate it
with ``musicrl consumer schema``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

SCHEMA_ID = "preference.v1"

HexId = Field(pattern=r"^[0-9a-f]{32}$", description="32 lower-case hex characters (uuid4().hex).")
Choice = Literal["a", "b", "tie", "none"]

# A listening time longer than an hour is a client bug, not a long listen.
MAX_LISTEN_S = 3600.0


class _PairFields(BaseModel):
    """Fields shared by the request an app sends and the event the gateway produces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(
        pattern=r"^[A-Za-z0-9_-]{8,64}$",
        description="Idempotency key chosen by the client; a retry re-sends the same id.",
    )
    generation_id: str = HexId
    clip_a_id: str = HexId
    clip_b_id: str = HexId
    choice: Choice = Field(description="'a' or 'b': the clip given the trophy; 'tie'; 'none': no verdict.")
    listen_a_s: float = Field(ge=0.0, le=MAX_LISTEN_S, description="Seconds of clip a the user listened to.")
    listen_b_s: float = Field(ge=0.0, le=MAX_LISTEN_S, description="Seconds of clip b the user listened to.")
    app_id: str = Field("web", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class FeedbackRequest(_PairFields):
    """Body of ``POST /v1/feedback``."""

    user_id: str = Field(
        min_length=1, max_length=256, description="The app's user id; never stored, only its keyed hash."
    )
    client_ts: AwareDatetime | None = Field(None, description="When the user voted, ISO-8601 with a time zone.")
    vote_token: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The `vote_token` of the generation's answer: signed by the gateway, it binds the vote to the "
        "generation, its clips and their durations, the API key and the user the generation named, until it expires.",
    )


class FeedbackAccepted(BaseModel):
    """Answer of ``POST /v1/feedback`` (202): the broker acknowledged the event."""

    event_id: str
    status: Literal["accepted"] = "accepted"
    partition: int
    offset: int


class PreferenceEvent(_PairFields):
    """The Kafka message on ``topic_preferences``, keyed by ``generation_id``."""

    schema_id: Literal["preference.v1"] = Field(SCHEMA_ID, alias="schema")
    user_pseudonym: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256 of the user id under the gateway's key."
    )
    client_ts: AwareDatetime | None = None
    received_at: AwareDatetime = Field(description="When the gateway accepted the request (UTC).")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _distinct_clips(self):
        # The gateway refuses such a vote after its token check (serving.services.feedback); the consumer
        # sends one that reaches the topic another way to the dead-letter topic.
        if self.clip_a_id == self.clip_b_id:
            raise ValueError("clip_a_id and clip_b_id must be two different clips")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PreferenceEvent:
        return cls.model_validate_json(data)


def utc_now() -> datetime:
    return datetime.now(UTC)


def json_schema() -> dict:
    schema = PreferenceEvent.model_json_schema(by_alias=True)
    schema["$id"] = f"{SCHEMA_ID}.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
