"""The listening page: two candidates, a trophy under each, a tie button; and its tokens.

The page calls the API like any app, with a token of the ``page`` principal that
``GET /page-token`` gives to any visitor (short-lived, limited by
``gateway_page_*``, shared by every visitor): see ``serving.services.auth``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from serving.errors import NotFound
from serving.services.auth import Authenticator

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/")
async def listening_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/page-token")
async def page_token(request: Request) -> JSONResponse:
    """A fresh token for the listening page (404 when MUSICRL_GATEWAY_PAGE_ENABLED is false)."""
    authenticator: Authenticator = request.app.state.auth
    if authenticator.page_tokens is None:
        raise NotFound("the listening page is disabled (MUSICRL_GATEWAY_PAGE_ENABLED=false)")
    token, expires_at = authenticator.page_tokens.mint()
    return JSONResponse({"token": token, "expires_at": expires_at.isoformat()}, headers={"Cache-Control": "no-store"})
