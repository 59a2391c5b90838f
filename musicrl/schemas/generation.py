"""The generation record (schema ``generation.v1``), stored by the gateway.

One JSON object per request at ``generations/{generation_id}.json`` in the
generations bucket (``generation_key``); each clip's audio is at ``clips/{clip_id}.wav``
in the clips bucket (``clip_audio_key``), stamped with its generation id
(``CLIP_GENERATION_ID_METADATA``). The feedback consumer joins preferences with the
record and the finetune worker reads prompts, tokens, log-probs and policy versions from it.
Fields may be added in later versions; existing ones keep their meaning.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    # One codebook (the default generator): [T], as always. K > 1 codebooks (MusicGen): [K][T], codebook k's
    # frames in row k, exactly the Triton TOKENS/LOGPROBS of the clip (docs/contracts.md, docs/models.md).
    tokens: list[int] | list[list[int]]
    logprobs: list[float] | list[list[float]]
    duration_s: float
    sample_rate: int
    audio_key: str

    @model_validator(mode="after")
    def _same_shape(self) -> ClipRecord:
        shape = _shape(self.tokens, "tokens")
        if _shape(self.logprobs, "logprobs") != shape:
            raise ValueError(f"logprobs must have the shape of tokens {shape}, got {_shape(self.logprobs, 'logprobs')}")
        return self

    @property
    def num_codebooks(self) -> int:
        """K: 1 for a flat token list, the number of rows of a nested one."""
        return _shape(self.tokens, "tokens")[0]

    def flat(self, field: Literal["tokens", "logprobs"]) -> list:
        """``tokens`` or ``logprobs`` as one flat, codebook-major list (the buffer's columns), values as stored."""
        values = getattr(self, field)
        return [v for row in values for v in row] if values and isinstance(values[0], list) else list(values)

    def codes(self) -> np.ndarray:
        """The tokens as int64 [K, T], whichever way they are stored."""
        return np.asarray(self.tokens, dtype=np.int64).reshape(self.num_codebooks, -1)

    def code_logprobs(self) -> np.ndarray:
        """The log-probs as float32 [K, T]."""
        return np.asarray(self.logprobs, dtype=np.float32).reshape(self.num_codebooks, -1)


def _shape(values: list, name: str) -> tuple[int, int]:
    """(K, T) of a flat list (K = 1) or a rectangular list of K >= 1 rows."""
    if not values or not isinstance(values[0], list):
        return 1, len(values)
    lengths = {len(row) for row in values}
    if len(lengths) != 1:
        raise ValueError(f"{name}: every codebook must have the same number of frames, got {sorted(lengths)}")
    return len(values), lengths.pop()


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
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
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
