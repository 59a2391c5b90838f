"""What a client of the gateway sends to be let in (no heavy imports: load tests use it).

The write routes need an API key (docs/serving.md, "Authentication"). Clients take it
from ``MUSICRL_API_KEY`` unless given one; ``musicrl stack env`` exports the local
stack's development key under that name, and ``StackInfo.api_key`` holds it.
"""

from __future__ import annotations

import os

API_KEY_ENV = "MUSICRL_API_KEY"


def api_key_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer KEY`` for ``api_key``, else for ``$MUSICRL_API_KEY``; no header without either."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}
