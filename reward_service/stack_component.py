"""The reward service as a component of the local stack (``musicrl stack up``, see docs/stack.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from musicrl.stack.processes import ManagedProcess, http_ok
from musicrl.stack.settings import StackSettings
from musicrl.stack.stack import StackInfo

ROOT = Path(__file__).resolve().parents[1]


def reward_process(s: StackSettings) -> ManagedProcess:
    """``musicrl reward serve`` on ``stack_reward_port``.

    It runs in the repository root so that reward kinds with nothing published in the
    registry fall back to the committed ``checkpoints/``. It polls the registry every
    5 s (unless ``MUSICRL_REWARD_POLL_INTERVAL_S`` says otherwise), so a preference model
    published by a finetune cycle is served within seconds without an admin token.
    """
    port = s.stack_reward_port
    local_defaults = {
        "MUSICRL_REWARD_POLL_INTERVAL_S": "5",
        "MUSICRL_REWARD_MODEL_CACHE_DIR": str(s.data_dir / "reward-cache"),
    }
    return ManagedProcess(
        "reward",
        [sys.executable, "-m", "musicrl.cli", "reward", "serve", "--host", s.stack_host, "--port", str(port)],
        health=lambda: http_ok(f"http://{s.stack_host}:{port}/healthz"),
        ports={"http": port},
        env=StackInfo(s).env() | {k: v for k, v in local_defaults.items() if k not in os.environ},
        cwd=ROOT,
        host=s.stack_host,
    )
