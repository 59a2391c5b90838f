"""Structured logging for every service: one JSON object per line on stderr.

Call ``configure_logging(settings, service="gateway")`` once at start-up, then
``log = get_logger(__name__)`` and ``log.info("generation.done", clips=2)``.
Standard-library loggers (uvicorn, kafka, httpx) go through the same
formatter, so a service writes a single format. Values bound with
``bind_context(...)`` (a request id, a generation id) are added to every line
logged in the same task or thread, through ``contextvars``.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars, merge_contextvars

__all__ = [
    "REQUEST_ID_HEADER",
    "RequestIdMiddleware",
    "bind_context",
    "bound_contextvars",
    "clear_contextvars",
    "configure_logging",
    "get_logger",
    "new_request_id",
]

REQUEST_ID_HEADER = "x-request-id"


class LogSettings(Protocol):
    log_level: str
    log_json: bool


def configure_logging(settings: LogSettings, service: str | None = None) -> None:
    """Route structlog and standard-library logging to one stderr handler (JSON or console)."""
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {settings.log_level!r}")

    def add_service(_, __, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if service is not None:
            event.setdefault("service", service)
        return event

    shared: list[structlog.types.Processor] = [
        merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
    ]
    renderer: list[structlog.types.Processor] = (
        [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
        if settings.log_json
        else [structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = _CurrentStderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Servers that install their own handlers would print every line twice.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # kafka-python logs every connection at INFO.
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (test runners replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def new_request_id() -> str:
    return uuid.uuid4().hex


def bind_context(**values: Any) -> None:
    """Add ``values`` to every line logged from now on in this task or thread."""
    bind_contextvars(**values)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestIdMiddleware:
    """ASGI middleware: takes ``X-Request-ID`` from the request (or makes one), binds it
    as ``request_id`` for every log line of the request and returns it in the response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        # Accept a caller's id only if it is short and printable; never log arbitrary input.
        request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        with bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)
