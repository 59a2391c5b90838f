"""Request and response bodies of the gateway's public API.

Hard bounds live here (what no deployment may exceed); the configurable limits
(``MUSICRL_GATEWAY_MAX_*``) are checked by the generation service. Both answer 422.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from musicrl.errors import ErrorBody
from musicrl.schemas.generation import Timings

AudioFormat = Literal["wav", "flac", "ogg", "mp3"]
MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
}
ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_CANDIDATES = 4
# Below this the sampling is greedy anyway, and far below it (about 1e-37) logits / temperature overflow
# float32: the clip's log-probabilities become NaN (found by schemathesis, docs/reliability.md).
MIN_TEMPERATURE = 0.01
# The largest integer every JSON parser reads exactly (RFC 8259, section 6): a larger seed could come back
# from a client as another number.
MAX_SEED = (1 << 53) - 1


def _json_integer(value):
    """A JSON Schema integer: a number with no fractional part (``3`` or ``3.0``), never a boolean or a string
    (pydantic's lax mode would take ``true`` and ``"3"``; schemathesis found ``"seed": false`` accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    return value


def json_int(**bounds):
    """An integer field's type: JSON integers only (``_json_integer``), within ``bounds`` (``ge``, ``le``)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_integer)]


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the music should be like.", examples=["calm lo-fi piano with soft drums"])
    n: json_int(ge=1, le=MAX_CANDIDATES) | None = Field(None, description="Candidates to generate (default 2).")
    duration_s: float | None = Field(None, gt=0, description="Seconds of audio per candidate (default 10).")
    temperature: float | None = Field(
        None, ge=MIN_TEMPERATURE, description="Sampling temperature (default 0.99, as in MusicRL)."
    )
    top_k: json_int(ge=0, le=1 << 16) = Field(0, description="Top-k filtering; 0 samples from the full distribution.")
    seed: json_int(ge=0, le=MAX_SEED) | None = Field(None, description="Makes the request reproducible.")
    app_id: str = Field("web", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    user_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The app's user the pair is for: only this user may vote on it (never stored). "
        "Without it the pair takes one vote, from any user, posted with the same API key.",
    )

    @field_validator("prompt")
    @classmethod
    def prompt_has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        return prompt


class ClipOut(BaseModel):
    clip_id: str
    index: int
    audio_url: str = Field(description="Presigned object-store URL of the WAV file.")
    download_url: str = Field(description="Gateway path; add ?format=wav|flac|ogg|mp3.")
    format: AudioFormat = "wav"
    duration_s: float
    sample_rate: int = Field(description="Of the audio, the served model's own (16000 default, 32000 MusicGen).")
    num_codebooks: int = Field(
        1,
        description="Tokens per frame of the clip (1 default, 4 MusicGen): the record's "
        "`tokens` is [T] for 1, [K][T] for more.",
    )
    policy_version: str
    model_name: str
    seed: int


class GenerationResponse(BaseModel):
    generation_id: str
    created_at: datetime
    prompt: str
    experiment: str | None
    clips: list[ClipOut]
    timings: Timings
    vote_token: str | None = Field(
        None, description="Send it back with the vote (`POST /v1/feedback`); null when there is no pair (n = 1)."
    )
    vote_token_expires_at: datetime | None = Field(None, description="Votes are taken until then.")


class ClipInfo(BaseModel):
    clip_id: str
    generation_id: str
    index: int
    prompt: str
    policy_version: str
    model_name: str
    seed: int
    duration_s: float
    sample_rate: int
    num_codebooks: int = 1
    audio_url: str
    download_url: str
    created_at: datetime


# FastAPI's answer to a body it cannot even decode (not UTF-8, JSON nested too deeply); malformed JSON is 422.
UNDECODABLE_BODY: dict[int | str, dict] = {
    400: {"model": ErrorBody, "description": "The body cannot be decoded (not UTF-8, or JSON nested too deeply)."},
}

# The answers of the authentication and limits every write route has (serving.deps.Caller).
AUTH_ERRORS: dict[int | str, dict] = {
    401: {
        "model": ErrorBody,
        "description": "No API key, or an unknown one (`WWW-Authenticate: Bearer`).",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    },
    429: {
        "model": ErrorBody,
        "description": "The key (or the user, for votes) is over its rate or concurrency limit.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
    },
}
