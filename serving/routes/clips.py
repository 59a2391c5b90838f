"""Clip routes: metadata and audio in WAV, FLAC, OGG or MP3."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response

from musicrl.errors import ErrorBody
from serving.deps import get_generation_service
from serving.schemas import ID_PATTERN, MEDIA_TYPES, AudioFormat, ClipInfo
from serving.services.generations import GenerationService

router = APIRouter(prefix="/v1/clips", tags=["clips"])
Service = Annotated[GenerationService, Depends(get_generation_service)]
ClipId = Annotated[str, Path(pattern=ID_PATTERN)]
ERRORS = {404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}


@router.get("/{clip_id}", response_model=ClipInfo, responses=ERRORS)
async def get_clip(clip_id: ClipId, service: Service) -> ClipInfo:
    return await service.clip_info(clip_id)


@router.get(
    "/{clip_id}/audio",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {media: {} for media in MEDIA_TYPES.values()}}},
)
async def get_clip_audio(
    clip_id: ClipId, service: Service, format: Annotated[AudioFormat, Query()] = "wav"
) -> Response:
    audio = await service.clip_audio(clip_id, format)
    return Response(
        audio,
        media_type=MEDIA_TYPES[format],
        headers={
            "Content-Disposition": f'inline; filename="{clip_id}.{format}"',
            "Cache-Control": "public, max-age=86400",
        },
    )
