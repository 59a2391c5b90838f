"""A private target for a load test: the real stack and gateway on free local ports.

``local_gateway(checkpoint, work_dir)`` starts SeaweedFS, Tansu and Triton
(``musicrl.stack``), installs the generator checkpoint as version 1, starts
``musicrl gateway serve`` in its own process, waits until ``/readyz`` answers,
yields the gateway's URL and the stack's API key, and stops everything it
started, so that a committed load-test report can be reproduced with one command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def local_gateway(checkpoint: Path, work_dir: Path, ready_timeout_s: float = 300.0) -> Iterator[tuple[str, str]]:
    from musicrl.stack import Stack, free_port_settings
    from musicrl.stack.processes import free_port, serve_process
    from serving.model_repository import BatchingConfig, install_version, load
    from serving.settings import GatewaySettings

    stack = Stack(free_port_settings(work_dir / "stack"))
    info = stack.up()
    try:
        settings = info.settings_for(GatewaySettings)
        install_version(
            info.triton_repo, 1, checkpoint, settings.triton_model_name, BatchingConfig.from_settings(settings)
        )
        load(info.triton_http_url, settings.triton_model_name)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "musicrl.cli", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with serve_process(
            argv,
            f"{url}/readyz",
            name="gateway",
            env={**os.environ, **info.env()},
            log_path=work_dir / "gateway.log",
            timeout_s=ready_timeout_s,
        ):
            yield url, info.api_key  # the gateway accepts the stack's key (info.env())
    finally:
        stack.down()
