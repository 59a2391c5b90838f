"""A private target for a load test: the real stack and gateway on free local ports.

``local_gateway(checkpoint, work_dir)`` starts SeaweedFS, Tansu and Triton
(``musicrl.stack``), installs the generator checkpoint as version 1, starts
``musicrl gateway serve`` in its own process, waits until ``/readyz`` answers,
yields the gateway's URL and the stack's API key, and stops everything it
started, so that a committed load-test report can be reproduced with one command.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def local_gateway(checkpoint: Path, work_dir: Path, ready_timeout_s: float = 300.0) -> Iterator[tuple[str, str]]:
    from musicrl.stack import Stack, free_port_settings
    from serving.model_repository import BatchingConfig, install_version, load
    from serving.settings import GatewaySettings

    stack = Stack(free_port_settings(work_dir / "stack"))
    info = stack.up()
    gateway, log = None, None
    try:
        settings = info.settings_for(GatewaySettings)
        install_version(
            info.triton_repo, 1, checkpoint, settings.triton_model_name, BatchingConfig.from_settings(settings)
        )
        load(info.triton_http_url, settings.triton_model_name)
        port = _free_port()
        log = (work_dir / "gateway.log").open("w")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "musicrl.cli", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **info.env()},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, gateway, ready_timeout_s, work_dir / "gateway.log")
        yield url, info.api_key  # the gateway accepts the stack's key (info.env())
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        if log is not None:
            log.close()
        stack.down()


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the gateway at {url} was not ready after {timeout_s} s; see {log}")
