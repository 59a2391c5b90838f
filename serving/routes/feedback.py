"""``POST /v1/feedback``: a user's vote on a pair of clips (trophy, tie or none)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from musicrl.schemas.preference import FeedbackAccepted, FeedbackRequest
from serving.deps import app_singleton, get_generation_service, get_settings
from serving.schemas import ErrorBody
from serving.services.feedback import FEEDBACK_METRICS, FeedbackProducer, FeedbackService

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])
# 413: a body above MUSICRL_GATEWAY_MAX_BODY_BYTES (serving.body_limit).
ERRORS = {404: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}


def get_feedback_service(request: Request) -> FeedbackService:
    settings = get_settings(request)
    producer = app_singleton(request, "feedback_producer", lambda: FeedbackProducer(settings), lambda p: p.close())
    return FeedbackService(settings, get_generation_service(request), producer, FEEDBACK_METRICS)


@router.post("", response_model=FeedbackAccepted, status_code=202, responses=ERRORS)
async def post_feedback(
    body: FeedbackRequest, service: Annotated[FeedbackService, Depends(get_feedback_service)]
) -> FeedbackAccepted:
    """Record a vote. 202 once the broker has it; 503 with Retry-After if not (retry with the same event_id)."""
    return await service.submit(body)
