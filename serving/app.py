"""The generation gateway: ``create_app`` wires settings, clients, services and routers.

Dependencies (Triton client, object store, text encoder) are built from the
settings at startup unless given, so tests inject fakes or real clients. The
in-memory state of authentication and limits (``state.auth``, ``state.limits``,
``state.votes``) is built here, once per app. With ``MUSICRL_ENV=production``
``create_app`` refuses settings that keep a development secret or have no API key.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles

from musicrl import openapi
from musicrl.config import InsecureSettings, refuse_development_secrets  # noqa: F401 - InsecureSettings is re-exported
from musicrl.errors import error_response
from musicrl.logging import RequestIdMiddleware, get_logger
from musicrl.metrics import instrument_app
from serving.body_limit import BodyLimitMiddleware
from serving.deps import close_singletons
from serving.errors import (
    DuplicateVote,
    Forbidden,
    NotFound,
    RateLimited,
    RequestRejected,
    Unauthorized,
    UpstreamFailed,
    UpstreamUnavailable,
    VoteRefused,
)
from serving.openapi import state_limits
from serving.routes import clips, feedback, generations, health, ops, page
from serving.routes.page import STATIC_DIR
from serving.services.auth import Authenticator
from serving.services.generations import GenerationService
from serving.services.limits import PrincipalLimits
from serving.services.triton import GeneratorClient, TritonGeneratorClient
from serving.services.vote_tokens import VotePolicy
from serving.settings import GatewaySettings

log = get_logger(__name__)


def create_app(
    settings: GatewaySettings | None = None,
    *,
    triton: GeneratorClient | None = None,
    store=None,
    text_encoder=None,
) -> FastAPI:
    settings = settings or GatewaySettings()
    # MUSICRL_ENV=production: development secrets (object-store keys, user-hash and vote-token keys) or
    # no API key refuse the start (musicrl.config.refuse_development_secrets); in development they are logged.
    problems = refuse_development_secrets(settings, "gateway")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        torch.set_num_threads(settings.gateway_torch_threads)
        executor = ThreadPoolExecutor(settings.gateway_io_threads, "gateway-io")
        asyncio.get_running_loop().set_default_executor(executor)
        state = app.state
        state.triton = triton or TritonGeneratorClient(settings.triton_grpc_url, settings.gateway_triton_timeout_s)
        state.store = store or _object_store(settings)
        state.text_encoder = text_encoder or _text_encoder(settings)
        state.generations = GenerationService(
            settings, state.triton, state.store, state.text_encoder, state.votes.tokens
        )
        await asyncio.to_thread(state.text_encoder.embed, ["warm-up"])  # loads lazy weights before the first request
        log.info(
            "gateway.started",
            triton=settings.triton_grpc_url,
            s3=settings.s3_endpoint,
            model=settings.triton_model_name,
            api_keys=[key.name for key in settings.gateway_api_keys],
            env=settings.env,
        )
        if problems:
            log.warning("gateway.development_settings", problems=problems)
        if not settings.gateway_api_keys:
            log.warning(
                "gateway.no_api_keys",
                hint="only the listening page can call the API; make a key with `musicrl gateway new-key`",
            )
        try:
            yield
        finally:
            await close_singletons(app)
            if triton is None:
                await state.triton.close()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="MusicRL generation gateway",
        version="1",
        description="Text-to-music generation with pairwise candidates, served by Triton; feedback feeds online RLHF.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.singletons = {}
    app.state.closers = []
    app.state.auth = Authenticator(settings)
    app.state.limits = PrincipalLimits()
    app.state.votes = VotePolicy(settings)
    _add_error_handlers(app, settings)
    for module in (clips, feedback, generations, health, ops, page):
        app.include_router(module.router)
    openapi.install(app, lambda document: state_limits(document, settings))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Innermost of the middlewares: a 413 is counted in the metrics and carries the request id.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.gateway_max_body_bytes)
    instrument_app(app, service="gateway")
    app.add_middleware(RequestIdMiddleware)  # outermost: every log line of the request carries its id
    return app


def _object_store(settings: GatewaySettings):
    from musicrl.storage import ObjectStore

    return ObjectStore(settings)


def _text_encoder(settings: GatewaySettings):
    from musicrl.text import load_text_encoder

    return load_text_encoder(settings.gateway_text_encoder)


def _add_error_handlers(app: FastAPI, settings: GatewaySettings) -> None:
    error = error_response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return error(request, 422, errors)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected):
        return error(request, 422, [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}])

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized):
        return error(request, 401, str(exc), {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden):
        return error(request, 403, str(exc))

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited):
        log.info("request.rate_limited", principal=getattr(request.state, "principal", None), reason=exc.message)
        return error(request, 429, exc.message, {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(VoteRefused)
    async def vote_refused(request: Request, exc: VoteRefused):
        return error(request, 403, [{"loc": ["body", exc.field], "msg": exc.message, "type": "vote_refused"}])

    @app.exception_handler(DuplicateVote)
    async def duplicate_vote(request: Request, exc: DuplicateVote):
        return error(request, 409, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error(request, 404, f"not found: {exc}")

    @app.exception_handler(UpstreamUnavailable)
    async def unavailable(request: Request, exc: UpstreamUnavailable):
        log.warning("upstream.unavailable", upstream=exc.upstream, reason=exc.reason)
        headers = {"Retry-After": str(settings.gateway_retry_after_s)}
        return error(request, 503, f"{exc.upstream} is unavailable, retry later", headers)

    @app.exception_handler(UpstreamFailed)
    async def failed(request: Request, exc: UpstreamFailed):
        log.error("upstream.failed", reason=str(exc))
        return error(request, 502, str(exc))
