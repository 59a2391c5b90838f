"""Run one of the project's ASGI apps on real HTTP (uvicorn in a thread) for a test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from musicrl.stack.processes import free_port


@contextmanager
def serve_in_thread(app, ready_path: str | None = None, timeout_s: float = 120.0) -> Iterator[str]:
    """Yield the base URL once uvicorn listens (and `ready_path`, if given, answers 200); stop it after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        assert thread.is_alive() and time.monotonic() < deadline, f"{url}{ready_path or ''} did not come up"
        if server.started:
            if ready_path is None:
                break
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
