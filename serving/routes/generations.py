"""Generation routes: create candidates and read generation records."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from musicrl.errors import ErrorBody
from musicrl.schemas.generation import GenerationRecord
from serving.deps import Caller, get_generation_service
from serving.schemas import AUTH_ERRORS, ID_PATTERN, UNDECODABLE_BODY, GenerationRequest, GenerationResponse
from serving.services.generations import GenerationService

router = APIRouter(prefix="/v1/generations", tags=["generations"])
Service = Annotated[GenerationService, Depends(get_generation_service)]
ERRORS = {404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 502: {"model": ErrorBody}, 503: {"model": ErrorBody}}
# A body above MUSICRL_GATEWAY_MAX_BODY_BYTES (serving.body_limit); 401 and 429 of the API key.
WRITE_ERRORS = {**ERRORS, 413: {"model": ErrorBody}, **AUTH_ERRORS, **UNDECODABLE_BODY}


@router.post("", response_model=GenerationResponse, status_code=201, responses=WRITE_ERRORS)
async def create_generation(caller: Caller, body: GenerationRequest, service: Service) -> GenerationResponse:
    """Generate `n` candidate clips for a prompt, store them and their record, return presigned URLs
    and the `vote_token` the vote on the pair must carry."""
    return await service.create(body, caller.name)


@router.get("/{generation_id}", response_model=GenerationRecord, response_model_by_alias=True, responses=ERRORS)
async def get_generation(generation_id: Annotated[str, Path(pattern=ID_PATTERN)], service: Service) -> GenerationRecord:
    """The stored generation record (prompt, parameters, tokens, log-probs, policy versions)."""
    return await service.get(generation_id)
