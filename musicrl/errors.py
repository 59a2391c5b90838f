"""One error body for every service: ``{"detail": ..., "request_id": ...}``.

``detail`` is a message (or, for a request that fails validation, the list of problems);
``request_id`` is the id ``musicrl.logging.RequestIdMiddleware`` gave the request (also in the
``X-Request-ID`` header and on every log line of the request), so a client can quote it.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: str | list
    request_id: str | None = None


def error_response(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer ``status`` with ``detail`` and the request's id."""
    body = {"detail": jsonable_encoder(detail), "request_id": getattr(request.state, "request_id", None)}
    return JSONResponse(body, status_code=status, headers=headers)
