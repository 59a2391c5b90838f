"""A bound on the size of request bodies, enforced before any route parses one.

Every body the gateway accepts is a small JSON document (the largest, a
``POST /v1/generations`` with a prompt at ``MUSICRL_GATEWAY_MAX_PROMPT_CHARS``,
is a few KB), so the body is read here, up to the limit, before the app sees it:

- a ``Content-Length`` above the limit is answered 413 without reading a byte;
- a body without one (chunked) is answered 413 as soon as what has arrived
  passes the limit; the rest is never read and the connection is closed.

The answer has the gateway's error shape, ``{"detail": ..., "request_id": ...}``.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a request body above ``max_body_bytes``, before the app reads it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            limit = self.max_body_bytes
            await self._reject(scope, send, f"request body of {declared} bytes is above the limit of {limit} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: nobody is left to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, send, f"request body is above the limit of {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards only http.disconnect, as from the server

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Scope, send: Send, detail: str) -> None:
        request_id = (scope.get("state") or {}).get("request_id")
        payload = json.dumps({"detail": detail, "request_id": request_id}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    # The rest of the body is left unread: the connection cannot carry another request.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed Content-Length itself
    return None
