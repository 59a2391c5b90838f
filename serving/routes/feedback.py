"""``POST /v1/feedback``: a user's vote on a pair of clips (trophy, tie or none)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from musicrl.errors import ErrorBody
from musicrl.schemas.preference import FeedbackAccepted, FeedbackRequest
from serving.deps import Caller, app_singleton, get_generation_service, get_settings, get_vote_policy
from serving.schemas import AUTH_ERRORS, UNDECODABLE_BODY
from serving.services.feedback import FEEDBACK_METRICS, FeedbackProducer, FeedbackService

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])
# 413: a body above MUSICRL_GATEWAY_MAX_BODY_BYTES (serving.body_limit); 401 and 429 (key or user) as AUTH_ERRORS.
ERRORS = {
    **AUTH_ERRORS,
    **UNDECODABLE_BODY,
    403: {
        "model": ErrorBody,
        "description": "The vote token does not allow this vote: forged, expired, or for "
        "another generation, API key, user or clip.",
    },
    404: {"model": ErrorBody},
    409: {"model": ErrorBody, "description": "The user already voted on this generation (with another event_id)."},
    413: {"model": ErrorBody},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody},
}


def get_feedback_service(request: Request) -> FeedbackService:
    settings = get_settings(request)
    producer = app_singleton(request, "feedback_producer", lambda: FeedbackProducer(settings), lambda p: p.close())
    return FeedbackService(
        settings, get_generation_service(request), producer, FEEDBACK_METRICS, get_vote_policy(request)
    )


@router.post("", response_model=FeedbackAccepted, status_code=202, responses=ERRORS)
async def post_feedback(
    caller: Caller, body: FeedbackRequest, service: Annotated[FeedbackService, Depends(get_feedback_service)]
) -> FeedbackAccepted:
    """Record a vote carrying the generation's `vote_token`. 202 once the broker has it; 503 with Retry-After
    if not (retry with the same event_id)."""
    return await service.submit(body, caller.name)
