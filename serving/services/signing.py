"""Signed, expiring tokens: ``<kind>.<base64url(JSON payload)>.<base64url(HMAC-SHA256)>``.

The payload is readable by whoever holds the token (it is signed, not encrypted):
put nothing in it the holder may not see. Each kind of token is signed with its
own key derived from the one configured secret, so a token of one kind can never
pass for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any


class BadToken(ValueError):
    """Malformed, of another kind, or with a signature that does not match."""


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose (HMAC-SHA256 of the purpose under the secret)."""
    return hmac.new(secret, purpose.encode(), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Signs and verifies the tokens of one ``kind`` (``v1``, ``p1``, ...) with one key."""

    def __init__(self, kind: str, key: bytes):
        self.kind = kind
        self._key = key

    def _mac(self, signed: str) -> bytes:
        return hmac.new(self._key, signed.encode(), hashlib.sha256).digest()

    def sign(self, payload: dict[str, Any]) -> str:
        body = _b64encode(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{self.kind}.{body}"
        return f"{signed}.{_b64encode(self._mac(signed))}"

    def verify(self, token: str) -> dict[str, Any]:
        """The payload of a token this signer made; BadToken for anything else."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != self.kind:
            raise BadToken(f"not a {self.kind} token")
        try:
            signature = _b64decode(parts[2])
        except (binascii.Error, ValueError):
            raise BadToken("the signature is not base64url") from None
        if not hmac.compare_digest(signature, self._mac(f"{parts[0]}.{parts[1]}")):
            raise BadToken("the signature does not match")
        try:
            payload = json.loads(_b64decode(parts[1]))
        except (binascii.Error, ValueError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadToken("the payload is not base64url JSON") from None
        if not isinstance(payload, dict):
            raise BadToken("the payload is not a JSON object")
        return payload
