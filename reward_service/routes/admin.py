from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from musicrl.logging import get_logger
from musicrl.schemas.scores import ErrorResponse
from reward_service.routes.deps import get_holder, get_metrics, get_settings
from reward_service.services.metrics import RewardMetrics
from reward_service.services.models import ModelHolder
from reward_service.settings import RewardSettings

router = APIRouter(tags=["admin"])
log = get_logger("reward_service.admin")
_bearer = HTTPBearer(auto_error=False)


def require_admin(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    settings: RewardSettings = Depends(get_settings),
) -> None:
    if settings.reward_admin_token is None:
        raise HTTPException(403, "the admin API is disabled: set MUSICRL_REWARD_ADMIN_TOKEN")
    expected = settings.reward_admin_token.get_secret_value()
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


_ERRORS = {
    401: {
        "model": ErrorResponse,
        "description": "No bearer token, or not the admin token",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    },
    403: {"model": ErrorResponse, "description": "The admin API is disabled (no MUSICRL_REWARD_ADMIN_TOKEN)"},
    503: {"model": ErrorResponse, "description": "The reload failed; the models in use stay"},
}


@router.post("/v1/admin/reload", dependencies=[Depends(require_admin)], responses=_ERRORS)
async def reload(holder: ModelHolder = Depends(get_holder), metrics: RewardMetrics = Depends(get_metrics)) -> dict:
    """Load the registry's current reward models now; requests keep flowing meanwhile."""
    try:
        result = await asyncio.to_thread(holder.reload)
    except Exception as err:  # noqa: BLE001 - reported to the caller; the models in use stay
        metrics.observe_reload("admin", err)
        log.warning("models.reload_failed", trigger="admin", error=str(err))
        serving = dict(holder.snapshot().versions) if holder.ready else {}
        raise HTTPException(503, f"reload failed ({err}); still serving {serving or 'no models'}") from err
    metrics.observe_reload("admin", result)
    log.info("models.reloaded", trigger="admin", changed={c: new for c, (_, new) in result.changed.items()})
    return {
        "changed": {c: {"from": old, "to": new} for c, (old, new) in result.changed.items()},
        "model_versions": result.versions,
    }
