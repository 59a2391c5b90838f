"""The configured limits of ``POST /v1/scores`` in the reward service's OpenAPI document (``musicrl.openapi``).

Written in when the document is built: the most items per request (``MUSICRL_REWARD_MAX_ITEMS``),
the token range of the service's codec and the token counts of the shortest and longest clip
(``MUSICRL_REWARD_MIN_AUDIO_S``, ``..._MAX_AUDIO_S``). ``audio_b64`` is declared (in ``musicrl.schemas.scores``)
with the format ``AUDIO_FORMAT``: what is inside the base64 (a WAV or FLAC file within the limits) no JSON Schema
can state, so the name tells clients, and ``loadtests/schemathesis_hooks.py`` gives schemathesis
a generator of such files.
"""

from __future__ import annotations

import math

from musicrl.openapi import Document, typed_branch

# A clip's token count times the frame rate is compared with float limits: round inwards past float noise.
_EPS = 1e-9


def state_limits(document: Document, resolver, max_items: int) -> Document:
    """``resolver`` is the service's ``InputResolver`` (its codec and ``Limits``)."""
    schemas = document["components"]["schemas"]
    schemas["ScoreRequest"]["properties"]["items"]["maxItems"] = max_items
    tokens = typed_branch(schemas["ScoreItem"]["properties"]["tokens"], "array")
    tokens["items"].update(minimum=0, maximum=int(resolver.codec.VOCAB_SIZE) - 1)
    frame_rate = float(resolver.codec.FRAME_RATE)
    tokens.update(
        minItems=max(1, math.ceil(resolver.limits.min_audio_s * frame_rate - _EPS)),
        maxItems=math.floor(resolver.limits.max_audio_s * frame_rate + _EPS),
    )
    return document
