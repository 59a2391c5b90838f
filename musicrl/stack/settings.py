"""Settings of the local stack (``musicrl stack up`` and the test fixtures).

The client-side endpoints (``s3_endpoint``, ``kafka_bootstrap``, ``triton_*_url``)
come from the shared mixins; the stack itself listens on the ``stack_*`` ports
below. Their defaults agree, so a service started with no environment reaches a
stack started with no environment. ``musicrl stack up`` also writes the exact
``MUSICRL_*`` variables of the running stack to ``<stack_data_dir>/stack.env``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from musicrl.config import KafkaConfig, ObjectStoreConfig, TritonConfig


class StackSettings(ObjectStoreConfig, KafkaConfig, TritonConfig):
    stack_host: str = Field("127.0.0.1", description="Address every server of the stack binds to.")
    stack_data_dir: Path = Field(
        Path(".stack"), description="Data, logs (`logs/`) and PID files (`run/`) of the stack."
    )
    stack_startup_timeout_s: float = Field(60.0, description="How long `up` waits for each server to become healthy.")

    stack_s3_port: int = Field(8333, description="SeaweedFS S3 API port.")
    stack_weed_master_port: int = Field(
        9333, description="SeaweedFS master port (its gRPC port is this + 10000, as for all SeaweedFS ports)."
    )
    stack_weed_volume_port: int = Field(8380, description="SeaweedFS volume server port.")
    stack_weed_filer_port: int = Field(8888, description="SeaweedFS filer port.")
    stack_weed_admin_port: int = Field(23646, description="SeaweedFS admin port (UI disabled).")

    stack_kafka_port: int = Field(9092, description="Tansu (Kafka protocol) port.")
    stack_kafka_storage: Literal["s3", "memory"] = Field(
        "s3",
        description="Where Tansu keeps topics and committed offsets: `s3` (bucket `stack_kafka_bucket` in the local "
        "SeaweedFS, survives `down`/`up`) or `memory` (lost on stop; what the tests use).",
    )
    stack_kafka_bucket: str = Field(
        "musicrl-kafka", description="Bucket of Tansu's data when `stack_kafka_storage=s3`."
    )

    stack_triton_http_port: int = Field(8000, description="Triton HTTP port.")
    stack_triton_grpc_port: int = Field(8001, description="Triton gRPC port.")
    stack_triton_metrics_port: int = Field(8002, description="Triton Prometheus metrics port.")
    stack_triton_repo: Path | None = Field(
        None, description="Triton model repository (explicit model control); default `<stack_data_dir>/triton/models`."
    )

    stack_services: bool = Field(
        True,
        description="`up` also starts the project's services (reward service, finetune loop, gateway, "
        "feedback consumer) after the servers; false starts only the servers.",
    )
    stack_gateway_port: int = Field(8080, description="Port of the generation gateway started by `up`.")
    stack_reward_port: int = Field(8090, description="Port of the reward service started by `up`.")
    stack_consumer_metrics_port: int = Field(9102, description="Metrics and health port of the feedback consumer.")
    stack_finetune_metrics_port: int = Field(9103, description="Metrics port of the finetune loop started by `up`.")

    @property
    def data_dir(self) -> Path:
        return self.stack_data_dir.resolve()

    @property
    def triton_repo(self) -> Path:
        return (self.stack_triton_repo or self.data_dir / "triton" / "models").resolve()
