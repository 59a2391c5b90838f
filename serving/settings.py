"""Configuration of the generation gateway (``MUSICRL_GATEWAY_*`` plus the shared mixins).

Every field is documented in ``docs/serving.md``; the environment variable of a
field is ``MUSICRL_`` + its name in upper case.
"""

from __future__ import annotations

import os

from pydantic import Field, SecretStr

from musicrl.config import KafkaConfig, ObjectStoreConfig, TritonConfig


class GatewaySettings(ObjectStoreConfig, KafkaConfig, TritonConfig):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_url: str = "http://127.0.0.1:8080"

    # Request limits (violations answer 422 with a message).
    gateway_max_prompt_chars: int = Field(1000, ge=1)
    gateway_max_candidates: int = Field(4, ge=1)
    gateway_default_candidates: int = Field(2, ge=1)
    gateway_min_duration_s: float = Field(1.0, gt=0)
    gateway_max_duration_s: float = Field(30.0, gt=0)
    gateway_default_duration_s: float = Field(10.0, gt=0)
    gateway_default_temperature: float = Field(0.99, gt=0)
    gateway_max_temperature: float = Field(2.0, gt=0)

    # Upstream calls: a timeout or an unreachable upstream answers 503 with Retry-After.
    gateway_triton_protocol: str = Field("grpc", pattern="^(grpc|http)$")
    gateway_triton_timeout_s: float = Field(120.0, gt=0)
    gateway_store_timeout_s: float = Field(15.0, gt=0)
    gateway_retry_after_s: int = Field(5, ge=1)
    gateway_presign_expiry_s: int = Field(3600, ge=1)

    # Prompt embedding (must match the generator's text_dim).
    gateway_text_encoder: str = "minilm"
    gateway_torch_threads: int = Field(1, ge=1)

    # Experiment: candidates of a request drawn from the current model and a challenger model.
    gateway_experiment_name: str | None = None
    gateway_challenger_model_name: str = "generator_challenger"
    gateway_experiment_share: float = Field(1.0, ge=0.0, le=1.0)

    # Feedback (``POST /v1/feedback``): the user id is replaced by HMAC-SHA256(key, user id).
    # The default key is for development only; production sets MUSICRL_GATEWAY_USER_HASH_KEY from a secret.
    gateway_user_hash_key: SecretStr = SecretStr("musicrl-dev-only-user-hash-key")
    # Longest wait for the broker's ack (and for the first connection); then 503 with Retry-After.
    gateway_kafka_timeout_s: float = Field(5.0, gt=0)

    # Triton model configuration written by ``musicrl gateway install-model``.
    gateway_triton_max_batch_size: int = Field(16, ge=1)
    gateway_triton_preferred_batch_sizes: list[int] = [4, 8, 16]
    gateway_triton_max_queue_delay_us: int = Field(20_000, ge=0)
    gateway_triton_instances: int = Field(0, ge=0)  # 0: one instance per CPU core

    def triton_instance_count(self) -> int:
        return self.gateway_triton_instances or (os.cpu_count() or 1)
