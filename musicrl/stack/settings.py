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

from musicrl.config import KafkaConfig, ObjectStoreConfig, TritonConfig


class StackSettings(ObjectStoreConfig, KafkaConfig, TritonConfig):
    stack_host: str = "127.0.0.1"
    stack_data_dir: Path = Path(".stack")
    stack_startup_timeout_s: float = 60.0

    # SeaweedFS `weed mini`: every port is explicit so that nothing collides.
    # gRPC ports are the HTTP port + 10000, as SeaweedFS expects by default.
    stack_s3_port: int = 8333
    stack_weed_master_port: int = 9333
    stack_weed_volume_port: int = 8380
    stack_weed_filer_port: int = 8888
    stack_weed_admin_port: int = 23646

    # Tansu (Kafka protocol). "s3" keeps topics and committed offsets in the
    # local object store (bucket `stack_kafka_bucket`) so they survive
    # `stack down`/`stack up`; "memory" loses them and is what the tests use.
    stack_kafka_port: int = 9092
    stack_kafka_storage: Literal["s3", "memory"] = "s3"
    stack_kafka_bucket: str = "musicrl-kafka"

    # Triton: explicit model control, model repository under the data dir
    # unless given.
    stack_triton_http_port: int = 8000
    stack_triton_grpc_port: int = 8001
    stack_triton_metrics_port: int = 8002
    stack_triton_repo: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.stack_data_dir.resolve()

    @property
    def triton_repo(self) -> Path:
        return (self.stack_triton_repo or self.data_dir / "triton" / "models").resolve()
