"""Settings mixins shared by the services.

Every service has exactly one settings class (for example
``serving.settings.GatewaySettings``) built from these mixins plus its own
fields. All variables share the prefix ``MUSICRL_``; a field ``s3_endpoint``
is read from ``MUSICRL_S3_ENDPOINT``. Service-specific fields carry the
service's name (``gateway_port`` -> ``MUSICRL_GATEWAY_PORT``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
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
    # Production brokers (Strimzi) authenticate clients with SCRAM over TLS;
    # the local broker needs none of this.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None

    def kafka_client_options(self) -> dict:
        """Connection keyword arguments shared by every kafka-python client."""
        options: dict = {"bootstrap_servers": self.kafka_bootstrap, "security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        if self.kafka_ssl_cafile:
            options["ssl_cafile"] = self.kafka_ssl_cafile
        return options


class TritonConfig(BaseServiceSettings):
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_model_name: str = "generator"
