"""The configured limits of ``POST /v1/generations`` in the gateway's OpenAPI document (``musicrl.openapi``).

``GenerationRequest`` declares what is true everywhere (``n`` at most 4, ``duration_s``
positive); ``MUSICRL_GATEWAY_MAX_DURATION_S``, ``..._MIN_DURATION_S``, ``..._MAX_PROMPT_CHARS``,
``..._MAX_CANDIDATES`` and ``..._MAX_TEMPERATURE`` are written in when the document is built.
"""

from __future__ import annotations

from musicrl.openapi import Document, typed_branch
from serving.settings import GatewaySettings

# A prompt of only whitespace is refused (GenerationRequest.prompt_has_text): at least one other character.
NOT_BLANK = r"\S"


def state_limits(document: Document, settings: GatewaySettings) -> Document:
    fields = document["components"]["schemas"]["GenerationRequest"]["properties"]
    fields["prompt"].update(maxLength=settings.gateway_max_prompt_chars, pattern=NOT_BLANK)
    typed_branch(fields["n"], "integer")["maximum"] = settings.gateway_max_candidates
    duration = typed_branch(fields["duration_s"], "number")
    duration.pop("exclusiveMinimum", None)
    duration.update(minimum=settings.gateway_min_duration_s, maximum=settings.gateway_max_duration_s)
    typed_branch(fields["temperature"], "number")["maximum"] = settings.gateway_max_temperature
    return document
