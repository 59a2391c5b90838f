"""The local stack: the real servers (and later the project's services) as one unit.

``Stack(settings).up()`` starts every component in ``COMPONENTS`` order, waits
until each is healthy, runs its provisioning step (buckets, topics) and
returns a :class:`StackInfo`. ``down()`` stops them in reverse order. Both are
idempotent: a component whose PID file points at a live process is reused.

To add a service (gateway, reward service, consumer, ...), append a
``Component(name, "package.module:function")`` to ``COMPONENTS``, where the
function takes the ``StackSettings`` and returns a ``ManagedProcess`` (its
command line, ``StackInfo(settings).env()`` as environment, ports, health).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic_settings import BaseSettings

from musicrl.config import ENV_PREFIX
from musicrl.stack.binaries import StackError
from musicrl.stack.processes import ManagedProcess, RunDir, Supervisor, free_port, port_in_use
from musicrl.stack.servers import seaweedfs_process, tansu_process, triton_process
from musicrl.stack.settings import StackSettings

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

# The development API key of a stack: its gateway accepts it (MUSICRL_GATEWAY_API_KEYS) and its
# clients present it (MUSICRL_API_KEY). Limits high enough that no experiment is throttled.
STACK_KEY_NAME = "stack"
STACK_KEY_LIMITS = ":60000:1024"  # rate_per_min, max_concurrency


@dataclass(frozen=True)
class StackInfo:
    """Endpoints of a running stack, and the environment a service needs to reach it."""

    settings: StackSettings

    @property
    def host(self) -> str:
        return self.settings.stack_host

    @property
    def s3_endpoint(self) -> str:
        return f"{self.host}:{self.settings.stack_s3_port}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.settings.stack_kafka_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.host}:{self.settings.stack_triton_grpc_port}"

    @property
    def triton_http_url(self) -> str:
        return f"{self.host}:{self.settings.stack_triton_http_port}"

    @property
    def triton_metrics_url(self) -> str:
        return f"http://{self.host}:{self.settings.stack_triton_metrics_port}/metrics"

    @property
    def triton_repo(self) -> Path:
        return self.settings.triton_repo

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.settings.stack_gateway_port}"

    @property
    def reward_url(self) -> str:
        return f"http://{self.host}:{self.settings.stack_reward_port}"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "gateway-api-key"

    @property
    def api_key(self) -> str:
        """The stack's development API key: made on first use (mode 0600), kept across ``down``/``up``."""
        path = self.api_key_file
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "mrl_" + secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        return key

    def env(self) -> dict[str, str]:
        """The ``MUSICRL_*`` variables that point a service (and a client: ``MUSICRL_API_KEY``) at this stack."""
        s = self.settings
        key = self.api_key
        values = {
            "s3_endpoint": self.s3_endpoint,
            "s3_access_key": s.s3_access_key,
            "s3_secret_key": s.s3_secret_key,
            "s3_secure": "false",
            "s3_region": s.s3_region,
            "bucket_clips": s.bucket_clips,
            "bucket_generations": s.bucket_generations,
            "bucket_buffer": s.bucket_buffer,
            "bucket_models": s.bucket_models,
            "kafka_bootstrap": self.kafka_bootstrap,
            "topic_preferences": s.topic_preferences,
            "topic_dead_letter": s.topic_dead_letter,
            "topic_partitions": str(s.topic_partitions),
            "triton_grpc_url": self.triton_grpc_url,
            "triton_http_url": self.triton_http_url,
            "triton_model_name": s.triton_model_name,
            "gateway_url": self.gateway_url,
            "reward_url": self.reward_url,
            # The gateway keeps only the key's hash; clients (load tests, curl) present the key.
            "gateway_api_keys": f"{STACK_KEY_NAME}:{hashlib.sha256(key.encode()).hexdigest()}{STACK_KEY_LIMITS}",
            "api_key": key,
        }
        return {ENV_PREFIX + key.upper(): value for key, value in values.items()}

    def settings_for(self, cls: type[SettingsT], **overrides) -> SettingsT:
        """Build any service's settings class pointed at this stack (``info.settings_for(GatewaySettings)``)."""
        fields = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in self.env().items()}
        known = {k: v for k, v in fields.items() if k in cls.model_fields}
        return cls(**(known | overrides))

    def endpoints(self) -> dict[str, str]:
        return {
            "s3": f"http://{self.s3_endpoint}",
            "kafka": self.kafka_bootstrap,
            "triton-http": f"http://{self.triton_http_url}",
            "triton-grpc": self.triton_grpc_url,
            "triton-metrics": self.triton_metrics_url,
            "triton-repo": str(self.triton_repo),
            **(
                {
                    "gateway": f"{self.gateway_url}/  (listening page; API under /v1, docs at /docs)",
                    "reward": self.reward_url,
                }
                if self.settings.stack_services
                else {}
            ),
        }


def provision_buckets(s: StackSettings) -> None:
    from musicrl.config import ObjectStoreConfig
    from musicrl.storage import ObjectStore

    store = ObjectStore(StackInfo(s).settings_for(ObjectStoreConfig))
    buckets = store.buckets() + ([s.stack_kafka_bucket] if s.stack_kafka_storage == "s3" else [])
    # The S3 gateway answers before the volume server has registered: retry the first writes.
    deadline = time.monotonic() + s.stack_startup_timeout_s
    while True:
        try:
            for bucket in buckets:
                store.ensure_bucket(bucket)
            store.put_bytes(s.bucket_models, ".stack-probe", b"ok")
            store.delete(s.bucket_models, ".stack-probe")
            return
        except Exception as err:
            if time.monotonic() > deadline:
                raise StackError(f"seaweedfs: cannot create buckets: {err}") from err
            time.sleep(0.2)


def provision_topics(s: StackSettings) -> None:
    from musicrl.kafka import ensure_topics

    # The stack's broker listens on stack_kafka_port, which kafka_bootstrap may not name yet.
    ensure_topics(s.model_copy(update={"kafka_bootstrap": StackInfo(s).kafka_bootstrap}))


BuildFn = Callable[[StackSettings], ManagedProcess]


@dataclass(frozen=True)
class Component:
    """One process of the stack. ``build`` is a function or a ``"module:function"`` path,
    imported only when used, so that services can join without the shared library importing them."""

    name: str
    build: BuildFn | str
    provision: Callable[[StackSettings], None] | None = None

    def process(self, settings: StackSettings) -> ManagedProcess:
        build = self.build
        if isinstance(build, str):
            module, _, function = build.partition(":")
            build = getattr(importlib.import_module(module), function)
        return build(settings)


COMPONENTS: list[Component] = [
    Component("seaweedfs", seaweedfs_process, provision_buckets),
    Component("tansu", tansu_process, provision_topics),
    Component("triton", triton_process),
]


def _provision_by_path(path: str) -> Callable[[StackSettings], None]:
    """A provisioning step in a service's package, imported only when it runs."""

    def provision(settings: StackSettings) -> None:
        module, _, function = path.partition(":")
        getattr(importlib.import_module(module), function)(settings)

    return provision


# The project's services, started after the servers by `musicrl stack up` (unless
# `stack_services` is false). Kept apart from COMPONENTS so that the test fixtures and
# benchmarks that pick servers out of COMPONENTS keep getting only servers.
SERVICES: list[Component] = [
    Component("reward", "reward_service.stack_component:reward_process"),
    Component(
        "finetune",
        "finetune_worker.stack_component:finetune_process",
        _provision_by_path("finetune_worker.stack_component:serve_current_generator"),
    ),
    Component("gateway", "serving.stack_component:gateway_process"),
    Component("consumer", "feedback_consumer.stack_component:consumer_process"),
]


def default_components(settings: StackSettings) -> list[Component]:
    """What `musicrl stack up` runs: the servers, then the services when `stack_services` is on."""
    return COMPONENTS + (SERVICES if settings.stack_services else [])


@dataclass
class ComponentStatus:
    name: str
    pid: int | None
    healthy: bool


class Stack:
    def __init__(
        self, settings: StackSettings, components: list[Component] | None = None, tied_to_parent: bool = False
    ):
        self.settings = settings
        self.components = components or COMPONENTS
        self.supervisor = Supervisor(RunDir(settings.data_dir), tied_to_parent)
        self.info = StackInfo(settings)

    def up(self, on_started: Callable[[str, bool, float], None] | None = None) -> StackInfo:
        """Start what is not running yet; on failure stop what this call started and raise StackError."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        started: list[str] = []
        try:
            for component in self.components:
                t0 = time.monotonic()
                _, started_now = self.supervisor.start(
                    component.process(self.settings), self.settings.stack_startup_timeout_s
                )
                if started_now:
                    started.append(component.name)
                if component.provision is not None:
                    component.provision(self.settings)
                if on_started is not None:
                    on_started(component.name, started_now, time.monotonic() - t0)
        except BaseException:
            for name in reversed(started):
                self.supervisor.stop(name)
            raise
        self.write_env_file()
        return self.info

    def down(self) -> list[str]:
        """Stop every component this data dir's PID files name; returns those that were running."""
        stopped = [c.name for c in reversed(self.components) if self.supervisor.stop(c.name)]
        self.env_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ComponentStatus]:
        result = []
        for component in self.components:
            proc = self.supervisor.running(component.name)
            healthy = proc is not None and self.supervisor.healthy(component.process(self.settings))
            result.append(ComponentStatus(component.name, proc.pid if proc else None, healthy))
        return result

    @property
    def env_file(self) -> Path:
        return self.settings.data_dir / "stack.env"

    def write_env_file(self) -> None:
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.info.env().items()))

    def log_file(self, name: str) -> Path:
        return self.supervisor.run_dir.log_file(name)


def _free_port_with_grpc_twin(host: str, taken: set[int]) -> int:
    # SeaweedFS puts each gRPC listener at its HTTP port + 10000.
    while True:
        port = free_port(host)
        if port not in taken and port + 10000 <= 65535 and not port_in_use(host, port + 10000):
            return port


def free_port_settings(data_dir: Path, **overrides) -> StackSettings:
    """Settings for a private stack on free ports under ``data_dir`` (tests, experiments)."""
    host = "127.0.0.1"
    taken: set[int] = set()

    def pick(with_grpc: bool = False) -> int:
        port = _free_port_with_grpc_twin(host, taken) if with_grpc else free_port(host)
        while port in taken:
            port = free_port(host)
        taken.update({port, port + 10000} if with_grpc else {port})
        return port

    ports = {
        "stack_s3_port": pick(True),
        "stack_weed_master_port": pick(True),
        "stack_weed_volume_port": pick(True),
        "stack_weed_filer_port": pick(True),
        "stack_weed_admin_port": pick(True),
        "stack_kafka_port": pick(),
        "stack_triton_http_port": pick(),
        "stack_triton_grpc_port": pick(),
        "stack_triton_metrics_port": pick(),
        "stack_gateway_port": pick(),
        "stack_reward_port": pick(),
        "stack_consumer_metrics_port": pick(),
        "stack_finetune_metrics_port": pick(),
    }
    fixed = {"stack_host": host, "stack_data_dir": data_dir, "stack_kafka_storage": "memory"}
    return StackSettings(**(fixed | ports | overrides))
