"""Liveness and readiness (``/metrics`` is mounted by ``musicrl.metrics.instrument_app``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive (no upstream is checked)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when Triton serves the generator and the object store answers; 503 otherwise."""
    state = request.app.state
    settings = state.settings
    triton_ready, store_ready = await asyncio.gather(
        state.triton.is_ready(settings.triton_model_name), _store_ready(state.store, settings)
    )
    ready = triton_ready and store_ready
    body = {"status": "ready" if ready else "not ready", "triton": triton_ready, "object_store": store_ready}
    headers = {} if ready else {"Retry-After": str(settings.gateway_retry_after_s)}
    return JSONResponse(body, status_code=200 if ready else 503, headers=headers)


async def _store_ready(store, settings) -> bool:
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(store.bucket_exists, settings.bucket_clips),
            timeout=settings.gateway_store_timeout_s,
        )
    except Exception:  # noqa: BLE001 - any failure to answer means not ready
        return False
