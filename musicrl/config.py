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
    # Attribute docstrings become field descriptions: the README settings table shows them.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", use_attribute_docstrings=True)

    log_level: str = "INFO"
    """Lowest level logged (DEBUG, INFO, WARNING, ERROR)."""
    log_json: bool = True
    """One JSON object per log line (false: coloured console lines for development)."""
    # What "production" refuses is each service's business: the gateway will not start with the
    # development user-hash or vote-token key, nor without API keys (GatewaySettings.production_problems).
    env: Literal["development", "production"] = "development"
    """`production`: refuse to start with development defaults for secrets (see docs/serving.md)."""


class ObjectStoreConfig(BaseServiceSettings):
    """Where the S3-compatible object store is (SeaweedFS here, MinIO in production)."""

    s3_endpoint: str = "127.0.0.1:8333"
    """host:port of the S3 API."""
    s3_access_key: str = "musicrl"
    """S3 access key."""
    s3_secret_key: str = "musicrl-secret"
    """S3 secret key."""
    s3_secure: bool = False
    """Use HTTPS for the S3 API."""
    s3_region: str = "us-east-1"
    """S3 region (signing only)."""
    bucket_clips: str = "musicrl-clips"
    """Bucket of generated audio clips."""
    bucket_generations: str = "musicrl-generations"
    """Bucket of generation records."""
    bucket_buffer: str = "musicrl-buffer"
    """Bucket of the on-policy preference buffer."""
    bucket_models: str = "musicrl-models"
    """Bucket of the model registry."""


class KafkaConfig(BaseServiceSettings):
    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers (host:port, comma-separated)."""
    topic_preferences: str = "preferences.v1"
    """Topic of preference events."""
    topic_dead_letter: str = "preferences.v1.dlq"
    """Topic of rejected preference events, with the reason."""
    topic_partitions: int = 3
    """Partitions of the preference topics when they are created."""
    # Production brokers (Strimzi) authenticate clients with SCRAM over TLS;
    # the local broker needs none of this.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Kafka security protocol."""
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    """SASL mechanism when the protocol is SASL_*."""
    kafka_sasl_username: str | None = None
    """SASL user name."""
    kafka_sasl_password: SecretStr | None = None
    """SASL password."""
    kafka_ssl_cafile: str | None = None
    """CA bundle that signed the brokers' TLS certificates."""

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
    """host:port of Triton's gRPC API."""
    triton_http_url: str = "127.0.0.1:8000"
    """host:port of Triton's HTTP API."""
    triton_model_name: str = "generator"
    """Name of the generator model in Triton."""
