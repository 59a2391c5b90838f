"""Configuration of the generation gateway (``MUSICRL_GATEWAY_*`` plus the shared mixins).

Every field is documented in ``docs/serving.md``; the environment variable of a
field is ``MUSICRL_`` + its name in upper case.
"""

from __future__ import annotations

import os

from pydantic import Field, SecretStr

from musicrl.config import KafkaConfig, ObjectStoreConfig, TritonConfig


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

    # Feedback (``POST /v1/feedback``): the user id is replaced by HMAC-SHA256(key, user id).
    # The default key is for development only; production sets MUSICRL_GATEWAY_USER_HASH_KEY from a secret.
    gateway_user_hash_key: SecretStr = SecretStr("musicrl-dev-only-user-hash-key")
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

    def triton_instance_count(self) -> int:
        return self.gateway_triton_instances or (os.cpu_count() or 1)
