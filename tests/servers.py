"""Run one of the project's ASGI apps on real HTTP (uvicorn in a thread) for a test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from musicrl.stack.processes import free_port, http_ok, wait_until_healthy


@contextmanager
def serve_in_thread(app, ready_path: str | None = None, timeout_s: float = 120.0, **config) -> Iterator[str]:
    """Yield the base URL once uvicorn listens (and `ready_path`, if given, answers 200); stop it after.

    ``config`` goes to ``uvicorn.Config`` (e.g. ``log_level``).
    """
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **({"log_config": None} | config)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(
            lambda: server.started and (ready_path is None or http_ok(url + ready_path, timeout_s=5)),
            timeout_s,
            name=f"{url}{ready_path or ''}",
            alive=thread.is_alive,
        )
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
