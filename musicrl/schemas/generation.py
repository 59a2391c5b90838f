"""The generation record (schema ``generation.v1``), stored by the gateway.

One JSON object per request at ``generations/{generation_id}.json`` in the
generations bucket (``generation_key``); each clip's audio is at ``clips/{clip_id}.wav``
in the clips bucket (``clip_audio_key``), stamped with its generation id
(``CLIP_GENERATION_ID_METADATA``). The feedback consumer joins preferences with the
record and the finetune worker reads prompts, tokens, log-probs and policy versions from it.
Fields may be added in later versions; existing ones keep their meaning.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_ID = "generation.v1"


def generation_key(generation_id: str) -> str:
    return f"generations/{generation_id}.json"


def clip_audio_key(clip_id: str) -> str:
    return f"clips/{clip_id}.wav"


# User metadata the gateway puts on every clip's audio (``clip_audio_key``): the generation it
# belongs to. Read back with ``ObjectStore.stat(...).metadata`` or ``get_bytes_and_metadata``
# (S3 sends it as the header ``x-amz-meta-generation-id``; the store strips the prefix).
CLIP_GENERATION_ID_METADATA = "generation-id"


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    duration_s: float
    temperature: float
    top_k: int = 0
    seed: int | None = Field(None, description="The request seed every clip seed was derived from.")


class ClipRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    clip_id: str
    index: int
    seed: int
    policy_version: str
    model_name: str = Field(
        "generator", description="Triton model that served the clip (the challenger in experiments)."
    )
    tokens: list[int]
    logprobs: list[float]
    duration_s: float
    sample_rate: int
    audio_key: str


class Timings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    embed_ms: float = 0.0
    triton_ms: float = 0.0
    store_ms: float = 0.0
    total_ms: float = 0.0


class GenerationRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    schema_id: Literal["generation.v1"] = Field(SCHEMA_ID, alias="schema")
    generation_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    prompt: str
    app_id: str = "web"
    experiment: str | None = None
    params: SamplingParams
    clips: list[ClipRecord]
    timings: Timings = Field(default_factory=Timings)

    def clip(self, clip_id: str) -> ClipRecord | None:
        return next((c for c in self.clips if c.clip_id == clip_id), None)

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)
