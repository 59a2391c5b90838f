"""FastAPI dependencies: the objects a route needs, taken from the running app.

``create_app`` builds them once (or receives them, in tests). A route module
that needs a client of its own (for example a Kafka producer) builds it on
first use with ``app_singleton`` and gets it closed at shutdown.

``Caller`` is the dependency of every write route: it authenticates the request
(API key or page token, 401 otherwise) and holds one of the caller's slots of its
rate and concurrency limits while the route runs (429 when none is free).
``Operator`` is the same for the ops API, except that a listening-page token answers 403.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from serving.errors import Forbidden
from serving.services.auth import Authenticator
from serving.services.generations import GenerationService
from serving.services.limits import Principal, PrincipalLimits
from serving.services.vote_tokens import VotePolicy
from serving.settings import PAGE_PRINCIPAL, GatewaySettings

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKeyBearer",
    description="`Authorization: Bearer KEY`: an API key (`musicrl gateway new-key`) or a listening-page token.",
)
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="ApiKeyHeader", description="The API key, as a header of its own."
)


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_generation_service(request: Request) -> GenerationService:
    return request.app.state.generations


def get_vote_policy(request: Request) -> VotePolicy:
    return request.app.state.votes


def _principal(request: Request, bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> Principal:
    """Who calls: the key of ``Authorization: Bearer`` or ``X-API-Key`` (401 if none is valid), noted for the logs."""
    authenticator: Authenticator = request.app.state.auth
    principal = authenticator.authenticate(bearer.credentials if bearer is not None else api_key)
    request.state.principal = principal.name
    return principal


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> AsyncIterator[Principal]:
    """An API key or a listening-page token, within its rate and concurrency limits (429)."""
    principal = _principal(request, bearer, api_key)
    limits: PrincipalLimits = request.app.state.limits
    with limits.admit(principal):
        yield principal


async def require_operator(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> AsyncIterator[Principal]:
    """An API key, as for writes; a listening-page token (handed to any visitor) is refused with 403."""
    principal = _principal(request, bearer, api_key)
    if principal.name == PAGE_PRINCIPAL:
        raise Forbidden("the ops API needs an API key; listening-page tokens are not accepted")
    limits: PrincipalLimits = request.app.state.limits
    with limits.admit(principal):
        yield principal


# scope="function": the slot is given back when the route returns, before the answer is sent.
Caller = Annotated[Principal, Depends(require_api_key, scope="function")]
# Read routes that reveal internals (serving.routes.ops): an API key, never a page token.
Operator = Annotated[Principal, Depends(require_operator, scope="function")]


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
