"""The feedback consumer as a component of the local stack (``musicrl stack up``, see docs/stack.md)."""

from __future__ import annotations

import sys

from musicrl.stack.processes import ManagedProcess, http_ok
from musicrl.stack.settings import StackSettings
from musicrl.stack.stack import StackInfo


def consumer_process(s: StackSettings) -> ManagedProcess:
    """``musicrl consumer run``; healthy when its ``/healthz`` (on ``stack_consumer_metrics_port``) says so."""
    port = s.stack_consumer_metrics_port
    env = StackInfo(s).env() | {
        "MUSICRL_CONSUMER_METRICS_HOST": s.stack_host,
        "MUSICRL_CONSUMER_METRICS_PORT": str(port),
    }
    return ManagedProcess(
        "consumer",
        [sys.executable, "-m", "musicrl.cli", "consumer", "run"],
        health=lambda: http_ok(f"http://{s.stack_host}:{port}/healthz"),
        ports={"metrics": port},
        env=env,
        host=s.stack_host,
    )
