"""Errors the services raise, and the HTTP answers they map to (in ``serving.app``)."""

from __future__ import annotations


class UpstreamUnavailable(Exception):
    """Triton or the object store is unreachable, not ready or too slow: 503 with Retry-After."""

    def __init__(self, upstream: str, reason: str):
        super().__init__(f"{upstream} unavailable: {reason}")
        self.upstream = upstream
        self.reason = reason


class UpstreamFailed(Exception):
    """The upstream answered but with an error that retrying will not fix: 502."""


class NotFound(Exception):
    """The generation or clip does not exist: 404."""


class RequestRejected(Exception):
    """The request is outside the configured limits: 422 with the field and the reason."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class Unauthorized(Exception):
    """No credential, or one the gateway does not know: 401 with ``WWW-Authenticate: Bearer``."""


class Forbidden(Exception):
    """A valid credential that may not do this (a listening-page token on the ops API): 403."""


class RateLimited(Exception):
    """A key, the page or a user is over its rate or concurrency limit: 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.message = message
        self.retry_after_s = max(1, int(retry_after_s))


class VoteRefused(Exception):
    """A vote its token does not allow (missing, forged, expired, for another generation, user,
    key or clip): 403 with the field and the reason."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class DuplicateVote(Exception):
    """A second vote (another event id) by the same user on the same generation: 409."""
