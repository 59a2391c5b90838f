"""Settings mixins shared by the services.

Every service has exactly one settings class (for example
``serving.settings.GatewaySettings``) built from these mixins plus its own
fields. All variables share the prefix ``MUSICRL_``; a field ``s3_endpoint``
is read from ``MUSICRL_S3_ENDPOINT``. Service-specific fields carry the
service's name (``gateway_port`` -> ``MUSICRL_GATEWAY_PORT``).
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MUSICRL_"


class BaseServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    log_level: str = "INFO"
    log_json: bool = True


class ObjectStoreConfig(BaseServiceSettings):
    """Where the S3-compatible object store is (SeaweedFS here, MinIO in production)."""

    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "musicrl"
    s3_secret_key: str = "musicrl-secret"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    bucket_clips: str = "musicrl-clips"
    bucket_generations: str = "musicrl-generations"
    bucket_buffer: str = "musicrl-buffer"
    bucket_models: str = "musicrl-models"


class KafkaConfig(BaseServiceSettings):
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_preferences: str = "preferences.v1"
    topic_dead_letter: str = "preferences.v1.dlq"
    topic_partitions: int = 3


class TritonConfig(BaseServiceSettings):
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_model_name: str = "generator"
