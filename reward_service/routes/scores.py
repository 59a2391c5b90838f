from __future__ import annotations

from fastapi import APIRouter, Depends

from musicrl.schemas.scores import ErrorResponse, ScoreRequest, ScoreResponse
from reward_service.routes.deps import get_service
from reward_service.services.service import RewardService

router = APIRouter(tags=["scores"])

_ERRORS = {
    400: {
        "model": ErrorResponse,
        "description": "A body that cannot be decoded (not UTF-8, or JSON nested too deeply)",
    },
    404: {"model": ErrorResponse, "description": "A clip or generation id that does not exist"},
    413: {"model": ErrorResponse, "description": "Too many items, too long audio or too large a body"},
    422: {"model": ErrorResponse, "description": "An item that cannot be scored (bad audio, tokens, ids)"},
    429: {"model": ErrorResponse, "description": "The queue is full; retry after Retry-After seconds"},
    503: {"model": ErrorResponse, "description": "Reward models not loaded yet"},
}


@router.post("/v1/scores", response_model=ScoreResponse, responses=_ERRORS)
async def score(body: ScoreRequest, service: RewardService = Depends(get_service)) -> ScoreResponse:
    """Score clips with the requested reward models (all by default) and combine them."""
    return await service.score(body)
