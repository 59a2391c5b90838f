"""Who is calling: API keys (configured as SHA-256 hashes) and the listening page's tokens.

- An app presents its key as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. The
  gateway hashes what it is given and compares it with every configured hash with
  ``hmac.compare_digest`` (all of them, so the time taken does not say which matched).
- The listening page has no key of its own to hide: ``GET /page-token`` hands any
  visitor a short-lived signed token of the ``page`` principal, whose limits
  (``gateway_page_*``) are shared by all visitors. Page tokens start with ``p1.``;
  generated API keys start with ``mrl_``.

Missing or unknown credentials raise :class:`serving.errors.Unauthorized` (401).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime

from serving.errors import Unauthorized
from serving.services.limits import Principal
from serving.services.signing import BadToken, TokenSigner, derive_key
from serving.settings import PAGE_PRINCIPAL, ApiKeySpec, GatewaySettings

KEY_PREFIX = "mrl_"
PAGE_TOKEN_KIND = "p1"


def hash_key(key: str) -> str:
    """Hex SHA-256 of an API key: what the gateway's configuration holds instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry(name: str, key: str, rate_per_min: int | None = None, max_concurrency: int | None = None) -> str:
    """The ``MUSICRL_GATEWAY_API_KEYS`` entry of a key: ``name:sha256hex[:rate_per_min[:max_concurrency]]``."""
    parts = [name, hash_key(key)]
    if rate_per_min is not None or max_concurrency is not None:
        parts.append("" if rate_per_min is None else str(rate_per_min))
    if max_concurrency is not None:
        parts.append(str(max_concurrency))
    ApiKeySpec.model_validate(":".join(parts))  # the entry parses, or this raises
    return ":".join(parts)


class ApiKeys:
    """The configured keys and the principal each stands for."""

    def __init__(self, specs: list[ApiKeySpec], default_rate_per_min: int, default_max_concurrency: int):
        self._entries = [
            (
                bytes.fromhex(spec.sha256),
                Principal(
                    spec.name,
                    spec.rate_per_min or default_rate_per_min,
                    spec.max_concurrency or default_max_concurrency,
                ),
            )
            for spec in specs
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def principal(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for expected, principal in self._entries:  # no early exit
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


class PageTokens:
    """Short-lived tokens of the ``page`` principal, for the listening page."""

    def __init__(self, secret: bytes, ttl_s: int, principal: Principal, clock=time.time):
        self._signer = TokenSigner(PAGE_TOKEN_KIND, derive_key(secret, "musicrl page token v1"))
        self.ttl_s = ttl_s
        self.principal = principal
        self.clock = clock

    def mint(self) -> tuple[str, datetime]:
        expires = int(self.clock()) + self.ttl_s
        token = self._signer.sign({"e": expires, "n": secrets.token_hex(8)})
        return token, datetime.fromtimestamp(expires, UTC)

    def valid(self, token: str) -> bool:
        try:
            payload = self._signer.verify(token)
        except BadToken:
            return False
        expires = payload.get("e")
        return isinstance(expires, int) and self.clock() < expires


class Authenticator:
    """Maps the credential of a request to its principal, or raises Unauthorized."""

    def __init__(self, settings: GatewaySettings, clock=time.time):
        self.keys = ApiKeys(
            settings.gateway_api_keys, settings.gateway_key_rate_per_min, settings.gateway_key_max_concurrency
        )
        page = Principal(PAGE_PRINCIPAL, settings.gateway_page_rate_per_min, settings.gateway_page_max_concurrency)
        secret = settings.gateway_vote_token_key.get_secret_value().encode()
        self.page_tokens = (
            PageTokens(secret, settings.gateway_page_token_ttl_s, page, clock)
            if settings.gateway_page_enabled
            else None
        )

    def authenticate(self, credential: str | None) -> Principal:
        if not credential:
            raise Unauthorized("an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`")
        if credential.startswith(PAGE_TOKEN_KIND + ".") and self.page_tokens is not None:
            if self.page_tokens.valid(credential):
                return self.page_tokens.principal
            raise Unauthorized("the page token is invalid or expired: reload the page")
        principal = self.keys.principal(credential)
        if principal is None:
            raise Unauthorized("unknown API key")
        return principal
