"""Configuration of the generation gateway (``MUSICRL_GATEWAY_*`` plus the shared mixins).

Every field is documented in ``docs/serving.md``; the environment variable of a
field is ``MUSICRL_`` + its name in upper case.
"""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from musicrl.config import KafkaConfig, ObjectStoreConfig, TritonConfig

# Development defaults of the secrets; `MUSICRL_ENV=production` refuses to start with them.
DEV_USER_HASH_KEY = "musicrl-dev-only-user-hash-key"
DEV_VOTE_TOKEN_KEY = "musicrl-dev-only-vote-token-key"
# The listening page's principal (its tokens come from GET /page-token); no API key may take the name.
PAGE_PRINCIPAL = "page"


class ApiKeySpec(BaseModel):
    """One API key as configured: its name, the SHA-256 of the key, and optionally its own limits.

    Written ``name:sha256hex[:rate_per_min[:max_concurrency]]`` (or as a JSON object with
    these fields); ``musicrl gateway new-key --name NAME`` prints a fresh key and its line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Who holds the key (logs, limits, vote tokens).")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key; the key itself is never configured."
    )
    rate_per_min: int | None = Field(None, ge=1, description="Requests per minute (default gateway_key_rate_per_min).")
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests in flight (default gateway_key_max_concurrency)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_line(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = value.strip().split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError("an API key entry is name:sha256hex[:rate_per_min[:max_concurrency]]")
        names = ("name", "sha256", "rate_per_min", "max_concurrency")
        return {name: part for name, part in zip(names, parts) if part != ""}

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == PAGE_PRINCIPAL:
            raise ValueError(f"the key name {PAGE_PRINCIPAL!r} is the listening page's")
        return name


class GatewaySettings(ObjectStoreConfig, KafkaConfig, TritonConfig):
    gateway_host: str = Field("127.0.0.1", description="Address `musicrl gateway serve` binds.")
    gateway_port: int = Field(8080, description="Port `musicrl gateway serve` listens on.")
    gateway_url: str = Field(
        "http://127.0.0.1:8080", description="How clients (load tests, listeners) reach the gateway."
    )

    # Request limits: violations answer 422 with a message naming the field.
    gateway_max_prompt_chars: int = Field(1000, ge=1, description="Longest prompt accepted, in characters.")
    gateway_max_candidates: int = Field(4, ge=1, le=4, description="Most candidates (`n`) per request.")
    gateway_default_candidates: int = Field(2, ge=1, description="Candidates when the request gives no `n`.")
    gateway_min_duration_s: float = Field(1.0, gt=0, description="Shortest clip accepted, in seconds.")
    gateway_max_duration_s: float = Field(
        30.0, gt=0, description="Longest clip accepted; keep within the checkpoint's max_frames / FRAME_RATE."
    )
    gateway_default_duration_s: float = Field(10.0, gt=0, description="Clip length when the request gives none.")
    gateway_default_temperature: float = Field(0.99, gt=0, description="Sampling temperature by default (MusicRL's).")
    gateway_max_temperature: float = Field(2.0, gt=0, description="Highest temperature accepted.")
    # Checked before the body is parsed (413 above, with or without Content-Length). The largest
    # legitimate body, a generation request at the longest prompt, is a few KB (12 KB at worst
    # for 1,000 characters sent as JSON \u escapes); raise it with gateway_max_prompt_chars.
    gateway_max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request body accepted, in bytes (413 above)."
    )

    # Upstream calls: a timeout or an unreachable upstream answers 503 with Retry-After.
    gateway_triton_timeout_s: float = Field(120.0, gt=0, description="Timeout of one Triton inference call.")
    gateway_store_timeout_s: float = Field(15.0, gt=0, description="Timeout of one object-store call.")
    gateway_retry_after_s: int = Field(5, ge=1, description="Retry-After (seconds) sent with 503 answers.")
    gateway_presign_expiry_s: int = Field(3600, ge=1, description="Lifetime of presigned audio URLs.")

    gateway_text_encoder: str = Field(
        "minilm", description="Prompt encoder (musicrl.text); must be the one the generator was trained with."
    )
    gateway_torch_threads: int = Field(1, ge=1, description="Intra-op threads of the gateway's text encoder.")
    gateway_io_threads: int = Field(
        64,
        ge=1,
        description="Threads for blocking work (object store, WAV encoding, embedding) of concurrent requests.",
    )

    # Experiment: candidates of a request drawn from the current model and a challenger model.
    gateway_experiment_name: str | None = Field(
        None, description="Set to split candidates between current and challenger."
    )
    gateway_challenger_model_name: str = Field(
        "generator_challenger", description="Triton model serving the challenger."
    )
    gateway_experiment_share: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of requests in the experiment.")
    gateway_canary_poll_s: float = Field(
        5.0,
        ge=0.0,
        description="How often the gateway reads the registry's canary record (`generator/canary` in the models "
        "bucket): while the finetune worker runs a canary, it replaces the experiment above with current vs "
        "candidate in the canary's share of pairs (docs/canary.md). 0: never read it (the settings' experiment only).",
    )

    # Authentication and limits of the write routes (serving/services/auth.py, docs/serving.md "Authentication").
    # The limits are per process: with N replicas a key may do N times as much.
    gateway_api_keys: Annotated[list[ApiKeySpec], NoDecode] = Field(
        [],
        description="API keys, as SHA-256 hashes: `name:sha256hex[:rate_per_min[:max_concurrency]]` entries separated "
        "by commas or a JSON list (`musicrl gateway new-key` prints one). Required in production.",
    )
    gateway_key_rate_per_min: int = Field(
        600, ge=1, description="Requests per minute of a key whose entry names no rate (token bucket, bursts up to it)."
    )
    gateway_key_max_concurrency: int = Field(
        32, ge=1, description="Requests in flight of a key whose entry names no concurrency (429 above)."
    )
    gateway_page_enabled: bool = Field(
        True, description="`GET /page-token` gives the listening page short-lived tokens of the `page` principal."
    )
    gateway_page_token_ttl_s: int = Field(3600, ge=60, description="Lifetime of a page token, in seconds.")
    gateway_page_rate_per_min: int = Field(
        60, ge=1, description="Requests per minute of the listening page, all its visitors together."
    )
    gateway_page_max_concurrency: int = Field(
        4, ge=1, description="Requests of the listening page in flight, all its visitors together."
    )

    # Vote tokens: a generation's answer carries an HMAC-signed token that its vote must bring back.
    gateway_vote_token_key: SecretStr = Field(
        SecretStr(DEV_VOTE_TOKEN_KEY),
        description="HMAC key of vote tokens (and page tokens); set it from a secret in production.",
    )
    gateway_vote_token_ttl_s: int = Field(3600, ge=1, description="How long a generation can be voted on, in seconds.")
    gateway_listen_tolerance_s: float = Field(
        0.5, ge=0, description="How much a listening time may exceed the clip's duration, in seconds."
    )
    gateway_votes_per_user_per_min: int = Field(
        30, ge=1, description="Votes per minute of one user (by pseudonym; 429 above)."
    )
    gateway_vote_ledger_size: int = Field(
        200_000,
        ge=1,
        description="Votes remembered against replays ((user, generation) until the token expires) and users "
        "with a vote rate bucket; the oldest are forgotten first.",
    )

    # Feedback (``POST /v1/feedback``): the user id is replaced by HMAC-SHA256(key, user id).
    # The default key is for development only; production sets MUSICRL_GATEWAY_USER_HASH_KEY from a secret.
    gateway_user_hash_key: SecretStr = SecretStr(DEV_USER_HASH_KEY)
    """HMAC key of the user pseudonym; set it from a secret in production (changing it changes every pseudonym)."""
    # Longest wait for the broker's ack (and for the first connection); then 503 with Retry-After.
    gateway_kafka_timeout_s: float = Field(5.0, gt=0)
    """Wait for the broker's connection and ack of a feedback event, in seconds, before 503."""

    # Triton model configuration written by ``musicrl gateway install-model``.
    gateway_triton_max_batch_size: int = Field(16, ge=1, description="Triton max_batch_size of the generator.")
    gateway_triton_preferred_batch_sizes: list[int] = Field([4, 8, 16], description="Triton preferred batch sizes.")
    gateway_triton_max_queue_delay_us: int = Field(
        20_000, ge=0, description="How long Triton's batcher waits to fill a batch, in microseconds."
    )
    gateway_triton_instances: int = Field(0, ge=0, description="Generator instances in Triton; 0 = one per CPU core.")

    @field_validator("gateway_api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        """A JSON list, or entries separated by commas, whitespace or new lines."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [entry for entry in re.split(r"[,\s]+", text) if entry]

    @field_validator("gateway_api_keys")
    @classmethod
    def _unique_names(cls, keys: list[ApiKeySpec]) -> list[ApiKeySpec]:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"API key names must be unique: {', '.join(duplicates)}")
        return keys

    def production_problems(self) -> list[str]:
        """Why this configuration must not serve production traffic (empty when it may): the shared
        mixins' (object-store credentials) and the gateway's own secrets and API keys."""
        problems = super().production_problems()
        if self.gateway_user_hash_key.get_secret_value() == DEV_USER_HASH_KEY:
            problems.append("MUSICRL_GATEWAY_USER_HASH_KEY is the development default")
        if self.gateway_vote_token_key.get_secret_value() == DEV_VOTE_TOKEN_KEY:
            problems.append("MUSICRL_GATEWAY_VOTE_TOKEN_KEY is the development default")
        if not self.gateway_api_keys:
            problems.append("MUSICRL_GATEWAY_API_KEYS configures no API key")
        return problems

    def triton_instance_count(self) -> int:
        return self.gateway_triton_instances or (os.cpu_count() or 1)
