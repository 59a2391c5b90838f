"""FastAPI dependencies: the objects a route needs, taken from the running app.

``create_app`` builds them once (or receives them, in tests). A route module
that needs a client of its own (for example a Kafka producer) builds it on
first use with ``app_singleton`` and gets it closed at shutdown.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from fastapi import Request

from serving.services.generations import GenerationService
from serving.settings import GatewaySettings


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_generation_service(request: Request) -> GenerationService:
    return request.app.state.generations


def app_singleton(
    request: Request, name: str, factory: Callable[[], Any], close: Callable[[Any], Any] | None = None
) -> Any:
    """The app-wide object ``name``, created by ``factory`` on first use and closed (sync or async) at shutdown.

    Tests inject their own object by setting ``app.state.singletons[name]`` before the first request.
    """
    singletons: dict[str, Any] = request.app.state.singletons
    if name not in singletons:
        singletons[name] = factory()
        if close is not None:
            request.app.state.closers.append(lambda obj=singletons[name]: close(obj))
    return singletons[name]


async def close_singletons(app) -> None:
    for closer in reversed(app.state.closers):
        result = closer()
        if inspect.isawaitable(result):
            await result
    app.state.closers.clear()
