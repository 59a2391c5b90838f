"""The gateway as a component of the local stack (``musicrl stack up``, see docs/stack.md)."""

from __future__ import annotations

import sys

from musicrl.stack.processes import ManagedProcess, http_ok
from musicrl.stack.settings import StackSettings
from musicrl.stack.stack import StackInfo


def gateway_process(s: StackSettings) -> ManagedProcess:
    """``musicrl gateway serve`` on ``stack_gateway_port``, pointed at the stack's servers.

    Healthy once the process answers ``/healthz``; ``/readyz`` turns 200 when Triton
    serves the generator (the finetune component deploys the current one at ``up``).
    Its environment holds the stack's development API key, hashed
    (``MUSICRL_GATEWAY_API_KEYS``; clients get the key as ``MUSICRL_API_KEY``).
    """
    port = s.stack_gateway_port
    return ManagedProcess(
        "gateway",
        [sys.executable, "-m", "musicrl.cli", "gateway", "serve", "--host", s.stack_host, "--port", str(port)],
        health=lambda: http_ok(f"http://{s.stack_host}:{port}/healthz"),
        ports={"http": port},
        env=StackInfo(s).env(),
        host=s.stack_host,
        stop_timeout_s=40.0,  # uvicorn's graceful shutdown lets requests in flight finish (30 s)
    )
