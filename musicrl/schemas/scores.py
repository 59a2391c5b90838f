"""Request and response bodies of the reward service (``POST /v1/scores``).

These models are the contract: the reward service validates with them and its
clients (the finetune worker, analysis scripts) build requests and parse
responses with them.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Component = Literal["text_adherence", "quality", "preference"]
COMPONENTS: tuple[Component, ...] = ("text_adherence", "quality", "preference")
# The registry kind that serves each component.
REGISTRY_KINDS: dict[Component, str] = {
    "text_adherence": "reward/text_adherence",
    "quality": "reward/quality",
    "preference": "reward/preference",
}

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
# The OpenAPI format of ``audio_b64``: base64 of a WAV or FLAC file (reward_service/openapi.py).
AUDIO_FORMAT = "audio-base64"
SOURCES = ("clip_id", "audio_b64", "tokens")
_SOURCE_TYPES = {"clip_id": {"type": "string"}, "audio_b64": {"type": "string"}, "tokens": {"type": "array"}}


def _one_source(source: str) -> dict:
    """JSON Schema of an item whose only source is ``source`` (the others absent or null); only a
    ``clip_id`` item may name a ``generation_id``."""
    nulls = [name for name in SOURCES if name != source] + ([] if source == "clip_id" else ["generation_id"])
    return {
        "required": [source],
        "properties": {source: _SOURCE_TYPES[source]} | {name: {"type": "null"} for name in nulls},
    }


def _weights_need_components() -> list[dict]:
    """JSON Schema of ``_weights_of_computed_components``: a weight's component is among ``components`` when given."""
    return [
        {
            "if": {
                "required": ["weights", "components"],
                "properties": {"weights": {"type": "object", "required": [name]}, "components": {"type": "array"}},
            },
            "then": {"properties": {"components": {"contains": {"const": name}}}},
        }
        for name in COMPONENTS
    ]


class ScoreItem(BaseModel):
    """One clip to score: the prompt it was generated from and exactly one audio source."""

    # The validators' rules stated in the OpenAPI document too, so that clients (and schemathesis) know them.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [_one_source(name) for name in SOURCES]})

    prompt: str = Field(min_length=1, max_length=2000)
    # The pattern is stated in the document; _hex_id checks it with its own message.
    clip_id: str | None = Field(
        default=None,
        description="Clip stored at clips/{clip_id}.wav in the clips bucket.",
        json_schema_extra={"pattern": _HEX32.pattern},
    )
    generation_id: str | None = Field(
        default=None,
        description="With clip_id: the generation record whose tokens the preference model scores "
        "(otherwise the tokens are re-estimated from the audio).",
        json_schema_extra={"pattern": _HEX32.pattern},
    )
    audio_b64: str | None = Field(
        default=None, description="Base64 of a WAV or FLAC file.", json_schema_extra={"format": AUDIO_FORMAT}
    )
    tokens: list[int] | None = Field(default=None, description="Audio tokens, decoded by the service's codec.")

    @field_validator("clip_id", "generation_id")
    @classmethod
    def _hex_id(cls, value: str | None) -> str | None:
        if value is not None and not _HEX32.match(value):
            raise ValueError("must be a 32-character lowercase hex id (uuid4().hex)")
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ScoreItem:
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of clip_id, audio_b64, tokens (got {given or 'none'})")
        if self.generation_id is not None and self.clip_id is None:
            raise ValueError("generation_id is only meaningful together with clip_id")
        return self

    @property
    def source(self) -> Literal["clip_id", "audio_b64", "tokens"]:
        if self.clip_id is not None:
            return "clip_id"
        return "audio_b64" if self.audio_b64 is not None else "tokens"


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": _weights_need_components()})

    items: list[ScoreItem] = Field(min_length=1)
    components: list[Component] | None = Field(
        default=None,
        description="Rewards to compute; all of them when omitted.",
        # What _unique_components checks, stated in the OpenAPI document too (it keeps its own messages).
        json_schema_extra={"minItems": 1, "uniqueItems": True},
    )
    weights: dict[Component, float] | None = Field(
        default=None, description="Weights of the combined reward; the service defaults when omitted."
    )

    @field_validator("components")
    @classmethod
    def _unique_components(cls, value: list[Component] | None) -> list[Component] | None:
        if value is not None:
            if not value:
                raise ValueError("components must not be empty (omit it to compute all)")
            if len(set(value)) != len(value):
                raise ValueError("components must not repeat")
        return value

    @model_validator(mode="after")
    def _weights_of_computed_components(self) -> ScoreRequest:
        if self.weights is not None:
            unknown = set(self.weights) - set(self.requested_components)
            if unknown:
                raise ValueError(f"weights given for components that are not computed: {sorted(unknown)}")
            for name, weight in self.weights.items():
                if weight != weight or abs(weight) == float("inf"):
                    raise ValueError(f"weight of {name} must be a finite number")
        return self

    @property
    def requested_components(self) -> tuple[Component, ...]:
        if self.components is None:
            return COMPONENTS
        return tuple(c for c in COMPONENTS if c in self.components)


class ItemScores(BaseModel):
    """Scores of one item. A component that was not requested is null."""

    text_adherence: float | None = Field(
        default=None, description="Mean cosine of prompt and audio embeddings over 10 s segments, in [-1, 1]."
    )
    quality_mos: float | None = Field(
        default=None, description="Predicted MOS in [1, 5], mean of the first and last 20 s windows."
    )
    quality: float | None = Field(default=None, description="quality_mos normalised to [0, 1]: (mos - 1) / 4.")
    preference: float | None = Field(
        default=None, description="Bradley-Terry score, mean of the first and last 20 s windows."
    )
    combined: float = Field(description="Sum of weight * reward over the computed components (quality normalised).")


class ScoreResponse(BaseModel):
    scores: list[ItemScores]
    components: list[Component]
    weights: dict[Component, float]
    model_versions: dict[Component, str] = Field(
        description="Version of the reward model that produced each component; one set for the whole request."
    )


class ErrorResponse(BaseModel):
    detail: str
