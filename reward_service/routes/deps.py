"""Dependencies injected into the routes (built once by ``create_app``)."""

from __future__ import annotations

from fastapi import Request

from reward_service.services.metrics import RewardMetrics
from reward_service.services.models import ModelHolder
from reward_service.services.service import RewardService
from reward_service.settings import RewardSettings


def get_service(request: Request) -> RewardService:
    return request.app.state.service


def get_holder(request: Request) -> ModelHolder:
    return request.app.state.service.holder


def get_metrics(request: Request) -> RewardMetrics:
    return request.app.state.service.metrics


def get_settings(request: Request) -> RewardSettings:
    return request.app.state.settings
