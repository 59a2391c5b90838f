"""Request and response bodies of the gateway's public API.

Hard bounds live here (what no deployment may exceed); the configurable limits
(``MUSICRL_GATEWAY_MAX_*``) are checked by the generation service. Both answer 422.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the music should be like.", examples=["calm lo-fi piano with soft drums"])
    n: int | None = Field(None, ge=1, le=MAX_CANDIDATES, description="Candidates to generate (default 2).")
    duration_s: float | None = Field(None, gt=0, description="Seconds of audio per candidate (default 10).")
    temperature: float | None = Field(
        None, ge=MIN_TEMPERATURE, description="Sampling temperature (default 0.99, as in MusicRL)."
    )
    top_k: int = Field(0, ge=0, le=1 << 16, description="Top-k filtering; 0 samples from the full distribution.")
    seed: int | None = Field(None, ge=0, lt=1 << 62, description="Makes the request reproducible.")
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
    sample_rate: int
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
    audio_url: str
    download_url: str
    created_at: datetime


class ErrorBody(BaseModel):
    detail: str | list
    request_id: str | None = None


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
