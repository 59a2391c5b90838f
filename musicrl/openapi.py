"""A service's OpenAPI document states its deployment's limits, not only its types.

The pydantic models declare what holds everywhere; limits that come from settings
(longest clip, largest batch, ...) are written into the served document by a
``patch`` when it is first built. A client generated from ``/openapi.json`` (or a
schemathesis run) then knows what this deployment refuses before it asks: no
schema-valid body gets a 4xx for a rule the document did not state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

Document = dict[str, Any]


def typed_branch(schema: dict[str, Any], json_type: str) -> dict[str, Any]:
    """The branch of ``schema`` of ``json_type``: the schema itself, or its member of ``anyOf`` (an optional field)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == json_type:
            return branch
    raise KeyError(f"no {json_type} branch in {schema}")


def install(app: FastAPI, patch: Callable[[Document], Document]) -> None:
    """Serve ``patch(document)`` as ``app``'s OpenAPI document (built once, on the first request for it)."""

    def openapi() -> Document:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = patch(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
