"""Settings mixins shared by the services.

Every service has exactly one settings class (for example
``serving.settings.GatewaySettings``) built from these mixins plus its own
fields. All variables share the prefix ``MUSICRL_``; a field ``s3_endpoint``
is read from ``MUSICRL_S3_ENDPOINT``. Service-specific fields carry the
service's name (``gateway_port`` -> ``MUSICRL_GATEWAY_PORT``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MUSICRL_"

# Development defaults of the object-store credentials (the local stack's SeaweedFS user);
# `MUSICRL_ENV=production` refuses to start with them (refuse_development_secrets).
DEV_S3_ACCESS_KEY = "musicrl"
DEV_S3_SECRET_KEY = "musicrl-secret"


class InsecureSettings(RuntimeError):
    """``MUSICRL_ENV=production`` with a development default for a secret (or a missing required one)."""


class BaseServiceSettings(BaseSettings):
    # Attribute docstrings become field descriptions: the README settings table shows them.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", use_attribute_docstrings=True)

    log_level: str = "INFO"
    """Lowest level logged (DEBUG, INFO, WARNING, ERROR)."""
    log_json: bool = True
    """One JSON object per log line (false: coloured console lines for development)."""
    # What "production" refuses: every mixin and service lists its own development defaults in
    # production_problems() (object-store credentials here; the gateway's user-hash and vote-token
    # keys and API keys in GatewaySettings); refuse_development_secrets() is called by each
    # service's startup and by ObjectStore.
    env: Literal["development", "production"] = "development"
    """`production`: refuse to start with development defaults for secrets (see docs/deploy.md)."""

    def production_problems(self) -> list[str]:
        """Why this configuration must not run in production (empty when it may). Subclasses extend it."""
        return []


class ObjectStoreConfig(BaseServiceSettings):
    """Where the S3-compatible object store is (SeaweedFS here, MinIO in production)."""

    s3_endpoint: str = "127.0.0.1:8333"
    """host:port of the S3 API."""
    s3_access_key: str = DEV_S3_ACCESS_KEY
    """S3 access key (each service has its own user in production, docs/deploy.md)."""
    s3_secret_key: str = DEV_S3_SECRET_KEY
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
    # minio's own defaults (300 s timeouts, 5 retries) let an object-store brownout hold a
    # request thread for up to half an hour; every call is bounded by these instead.
    s3_timeout_s: float = Field(10.0, gt=0)
    """Connect timeout and read timeout (longest silence on an open connection, not a whole transfer) of each
    S3 request, in seconds."""
    s3_retries: int = Field(2, ge=0)
    """Retries of an S3 request after a connection error, a read timeout or a 500/502/503/504 (0: none);
    at most (1 + retries) x 2 x s3_timeout_s plus backoff per call."""

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if self.s3_access_key == DEV_S3_ACCESS_KEY:
            problems.append("MUSICRL_S3_ACCESS_KEY is the development default")
        if self.s3_secret_key == DEV_S3_SECRET_KEY:
            problems.append("MUSICRL_S3_SECRET_KEY is the development default")
        return problems


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
            options["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
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


class PreferenceRulesConfig(BaseServiceSettings):
    """Which votes count, for every service that reads them: the consumer writes only such votes to the buffer,
    and the finetune worker's readers (reward model, DPO) apply the same rule (``musicrl.buffer.usable_pair``)."""

    min_listen_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Fraction of each clip's duration the user must have listened to for the vote to count (the paper kept only
    users who listened to both clips)."""


def refuse_development_secrets(settings: BaseServiceSettings, service: str) -> list[str]:
    """Raise ``InsecureSettings`` when ``settings.env`` is production and a secret is a development default.

    Called by every service's startup (gateway, reward service, feedback consumer, finetune worker) and by
    ``musicrl.storage.ObjectStore``. Returns the problems (empty in production): in development the caller
    may log them as a warning.
    """
    problems = settings.production_problems()
    if settings.env == "production" and problems:
        raise InsecureSettings(f"{service}: refusing to start with MUSICRL_ENV=production: " + "; ".join(problems))
    return problems
