"""The reward service's FastAPI application.

``create_app`` takes its collaborators (model holder, input resolver, batch
scorer) as arguments so tests can inject fakes; left out, they are built from
the settings by ``reward_service.services.runtime``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from musicrl import openapi
from musicrl.errors import error_response
from musicrl.logging import RequestIdMiddleware, get_logger
from reward_service.openapi import state_limits
from reward_service.routes import admin, health, scores
from reward_service.services.batcher import BatcherStopped, QueueFull
from reward_service.services.inputs import InputError, InputResolver
from reward_service.services.metrics import RewardMetrics
from reward_service.services.models import ModelHolder, ModelsNotReady
from reward_service.services.service import ComponentUnavailable, RewardService, ScoreBatch, ServiceLimits
from reward_service.settings import RewardSettings

log = get_logger("reward_service")

# How often a failed first load of the models is retried.
_INITIAL_LOAD_RETRY_S = 2.0


@dataclass
class Dependencies:
    holder: ModelHolder
    resolver: InputResolver
    score_batch: ScoreBatch


def create_app(settings: RewardSettings | None = None, dependencies: Dependencies | None = None) -> FastAPI:
    settings = settings or RewardSettings()
    if dependencies is None:
        from reward_service.services.runtime import default_dependencies  # noqa: PLC0415 - loads models

        dependencies = default_dependencies(settings)
    metrics = RewardMetrics()
    holder = dependencies.holder
    service = RewardService(
        holder,
        dependencies.resolver,
        dependencies.score_batch,
        metrics,
        limits=ServiceLimits(max_items=settings.reward_max_items),
        default_weights=settings.reward_default_weights,
        max_batch_size=settings.reward_max_batch_size,
        max_wait_s=settings.reward_max_wait_ms / 1000.0,
        max_queued=settings.reward_queue_max_items,
    )

    async def load_until_ready() -> None:
        while not holder.ready:
            try:
                metrics.observe_reload("startup", await asyncio.to_thread(holder.reload))
                log.info("models.loaded", versions=dict(holder.snapshot().versions))
            except Exception as err:  # noqa: BLE001 - retried; /readyz reports it meanwhile
                metrics.observe_reload("startup", err)
                log.warning("models.load_failed", error=str(err), retry_in_s=_INITIAL_LOAD_RETRY_S)
                await asyncio.sleep(_INITIAL_LOAD_RETRY_S)

    def on_poll(outcome) -> None:
        metrics.observe_reload("poll", outcome)
        if isinstance(outcome, Exception):
            log.warning("models.poll_failed", error=str(outcome))
        elif outcome.changed:
            log.info("models.reloaded", trigger="poll", changed={c: new for c, (_, new) in outcome.changed.items()})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        loading = asyncio.create_task(load_until_ready())
        holder.start_polling(settings.reward_poll_interval_s, on_poll)
        try:
            yield
        finally:
            loading.cancel()
            holder.stop_polling()
            service.stop()

    app = FastAPI(
        title="MusicRL reward service",
        version="1",
        lifespan=lifespan,
        max_body_size=settings.reward_max_body_bytes,  # 413 whether or not Content-Length is sent
    )
    app.state.settings = settings
    app.state.service = service
    app.include_router(scores.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    openapi.install(app, lambda document: state_limits(document, dependencies.resolver, settings.reward_max_items))
    app.add_middleware(RequestIdMiddleware)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request_seconds.labels(getattr(route, "path", "unmatched"), str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError) -> JSONResponse:
        metrics.rejected.labels(f"http_{err.status_code}").inc()
        return error_response(request, err.status_code, err.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels("http_422").inc()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in err.errors()
        )
        return error_response(request, 422, problems or "invalid request body")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        metrics.rejected.labels("queue_full").inc()
        return error_response(request, 429, f"too busy: {err}", {"Retry-After": str(settings.reward_retry_after_s)})

    @app.exception_handler(ModelsNotReady)
    async def not_ready(request: Request, err: ModelsNotReady) -> JSONResponse:
        metrics.rejected.labels("not_ready").inc()
        return error_response(request, 503, str(err), {"Retry-After": str(settings.reward_retry_after_s)})

    @app.exception_handler(ComponentUnavailable)
    async def unavailable(request: Request, err: ComponentUnavailable) -> JSONResponse:
        metrics.rejected.labels("component_unavailable").inc()
        return error_response(request, 503, str(err))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # Bad input never gets here (it is a 4xx above); this is a fault of the service or its models.
        log.exception("request.failed", path=request.url.path, error=str(err))
        return error_response(request, 500, f"scoring failed: {type(err).__name__}")

    @app.exception_handler(BatcherStopped)
    async def stopped(request: Request, err: BatcherStopped) -> JSONResponse:
        return error_response(request, 503, str(err))

    return app
