"""The operator's view: ``GET /dashboard`` (a static page) and ``GET /v1/ops/summary`` (its data).

The page itself holds nothing; it asks for an API key and calls the summary with it.
The summary reveals internals (versions, lineage, gate results, vote rates), so it
takes an API key like the write routes, and refuses listening-page tokens (403).
The work is in ``serving.services.ops``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from musicrl.errors import ErrorBody
from serving.deps import Operator, app_singleton, get_settings
from serving.routes.page import STATIC_DIR
from serving.schemas import AUTH_ERRORS
from serving.services.ops import MAX_WINDOW_MINUTES, OpsService

router = APIRouter(tags=["operations"])


def get_ops_service(request: Request) -> OpsService:
    settings = get_settings(request)
    return app_singleton(request, "ops", lambda: OpsService.from_settings(settings, request.app.state.store))


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")


@router.get(
    "/v1/ops/summary",
    responses={
        **AUTH_ERRORS,
        403: {"model": ErrorBody, "description": "A listening-page token: the ops API needs an API key."},
    },
)
async def ops_summary(
    caller: Operator,
    service: Annotated[OpsService, Depends(get_ops_service)],
    window_minutes: Annotated[
        int, Query(ge=1, le=MAX_WINDOW_MINUTES, description="Span of the votes-per-minute series.")
    ] = 60,
) -> JSONResponse:
    """The served generator and its lineage, every version's gate metrics, every finetune cycle with its
    checks, the reward models, and the buffer's votes by policy version (docs/dashboard.md)."""
    summary = await asyncio.to_thread(service.summary, window_minutes)
    return JSONResponse(summary, headers={"Cache-Control": "no-store"})
