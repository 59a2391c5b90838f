from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reward_service.routes.deps import get_holder, get_metrics
from reward_service.services.metrics import RewardMetrics
from reward_service.services.models import ModelHolder

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(holder: ModelHolder = Depends(get_holder)) -> JSONResponse:
    """Ready once a complete set of reward models is loaded."""
    if not holder.ready:
        return JSONResponse({"ready": False, "reason": holder.last_error or "loading reward models"}, status_code=503)
    return JSONResponse({"ready": True, "model_versions": dict(holder.snapshot().versions)})


@router.get("/metrics", include_in_schema=False)  # Prometheus text, not part of the JSON API (as the gateway's)
def metrics(metrics: RewardMetrics = Depends(get_metrics)) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
