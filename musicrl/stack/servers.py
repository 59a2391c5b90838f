"""How to run each real server of the stack: SeaweedFS, Tansu and Triton.

Each ``*_process(settings)`` returns a :class:`ManagedProcess` (command line,
environment, ports, health check). The project's own services join the stack
the same way: write a function ``settings -> ManagedProcess`` and add it to
``COMPONENTS`` in ``musicrl/stack/stack.py``.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from musicrl.stack.binaries import verified_path
from musicrl.stack.processes import ManagedProcess, http_ok
from musicrl.stack.settings import StackSettings


def weed_ports(s: StackSettings) -> dict[str, int]:
    ports = {
        "s3": s.stack_s3_port,
        "master": s.stack_weed_master_port,
        "volume": s.stack_weed_volume_port,
        "filer": s.stack_weed_filer_port,
        "admin": s.stack_weed_admin_port,
    }
    return ports | {f"{role}.grpc": port + 10000 for role, port in ports.items()}


def seaweedfs_process(s: StackSettings) -> ManagedProcess:
    data = s.data_dir / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    ports = weed_ports(s)
    argv = [
        str(verified_path("weed")),
        "mini",
        f"-dir={data}",
        f"-ip={s.stack_host}",
        f"-ip.bind={s.stack_host}",
        *(
            f"-{role}.port={port}" if not role.endswith(".grpc") else f"-{role[:-5]}.port.grpc={port}"
            for role, port in ports.items()
        ),
        # Unused listeners are switched off rather than left on default ports.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    env = {"AWS_ACCESS_KEY_ID": s.s3_access_key, "AWS_SECRET_ACCESS_KEY": s.s3_secret_key}
    return ManagedProcess(
        "seaweedfs",
        argv,
        health=lambda: http_ok(f"http://{s.stack_host}:{s.stack_s3_port}/healthz"),
        ports=ports,
        env=env,
        cwd=data,
        host=s.stack_host,
    )


def kafka_healthy(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        admin.describe_cluster()
        return True
    finally:
        admin.close()


def tansu_process(s: StackSettings) -> ManagedProcess:
    listener = f"tcp://{s.stack_host}:{s.stack_kafka_port}"
    env: dict[str, str] = {}
    if s.stack_kafka_storage == "s3":
        # Tansu's S3 engine (object_store crate) reads the AWS_* variables.
        storage = f"s3://{s.stack_kafka_bucket}/"
        env = {
            "AWS_ACCESS_KEY_ID": s.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
            "AWS_ENDPOINT": f"http://{s.stack_host}:{s.stack_s3_port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": s.s3_region,
        }
    else:
        storage = "memory://tansu/"
    argv = [
        str(verified_path("tansu")),
        "broker",
        f"--listener-url={listener}",
        f"--advertised-listener-url={listener}",
        f"--storage-engine={storage}",
    ]
    bootstrap = f"{s.stack_host}:{s.stack_kafka_port}"
    return ManagedProcess(
        "tansu",
        argv,
        health=lambda: kafka_healthy(bootstrap),
        ports={"kafka": s.stack_kafka_port},
        env=env,
        cwd=s.data_dir,
        host=s.stack_host,
    )


def assemble_python_backend(backends_dir: Path) -> Path:
    """Lay out ``backends_dir/python`` from the wheel's backend library and this Python's stub."""
    target = backends_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"):
        source = verified_path(name)
        dest = target / name
        if not dest.exists() or dest.stat().st_size != source.stat().st_size:
            shutil.copy2(source, dest)
    return backends_dir


def triton_env() -> dict[str, str]:
    """Environment for tritonserver so that its Python stub embeds this interpreter with this venv."""
    paths = sysconfig.get_paths()
    return {
        "LD_LIBRARY_PATH": ":".join(
            p for p in (sysconfig.get_config_var("LIBDIR"), str(Path(paths["purelib"]) / "nvidia_pytriton.libs")) if p
        ),
        # The stub ignores PYTHONPATH; it finds its interpreter as `python3` on
        # PATH, and through that interpreter's pyvenv.cfg this venv's packages
        # (numpy < 2 as the stub was built for; musicrl, installed editable).
        "PATH": os.pathsep.join([paths["scripts"], os.environ.get("PATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def triton_process(s: StackSettings, repository: str | None = None, extra_args: tuple[str, ...] = ()) -> ManagedProcess:
    """Triton on the ``stack_triton_*`` ports, explicit model control.

    ``repository`` overrides ``s.triton_repo``; an ``s3://http://HOST:PORT/BUCKET/PREFIX``
    repository is read with the stack's S3 credentials (``AWS_*`` from ``s3_access_key``,
    ``s3_secret_key``, ``s3_region``). ``extra_args`` go to tritonserver as they are (tests: the
    production manifests' ``--http-restricted-api``).
    """
    env = triton_env()
    if repository is None:
        repo = s.triton_repo
        repo.mkdir(parents=True, exist_ok=True)
        repository = str(repo)
    elif repository.startswith("s3://"):
        env |= {
            "AWS_ACCESS_KEY_ID": s.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
            "AWS_DEFAULT_REGION": s.s3_region,
        }
    backends = assemble_python_backend(s.data_dir / "triton" / "backends")
    argv = [
        str(verified_path("tritonserver")),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        f"--backend-directory={backends}",
        f"--http-address={s.stack_host}",
        f"--http-port={s.stack_triton_http_port}",
        f"--grpc-address={s.stack_host}",
        f"--grpc-port={s.stack_triton_grpc_port}",
        f"--metrics-address={s.stack_host}",
        f"--metrics-port={s.stack_triton_metrics_port}",
        "--exit-timeout-secs=10",
        # Several Tritons may run on one machine (a dev stack, test sessions):
        # each needs its own shared-memory region names.
        f"--backend-config=python,shm-region-prefix-name=musicrl_{s.stack_triton_grpc_port}_",
        "--backend-config=python,shm-default-byte-size=4194304",
        "--backend-config=python,shm-growth-byte-size=1048576",
        *extra_args,
    ]
    return ManagedProcess(
        "triton",
        argv,
        health=lambda: http_ok(f"http://{s.stack_host}:{s.stack_triton_http_port}/v2/health/ready"),
        ports={
            "http": s.stack_triton_http_port,
            "grpc": s.stack_triton_grpc_port,
            "metrics": s.stack_triton_metrics_port,
        },
        env=env,
        cwd=s.data_dir,
        host=s.stack_host,
    )
