"""In-memory rate and concurrency limits: token buckets per key, per page, per user.

Everything here lives in one process. With several gateway replicas each has its
own buckets and counters, so a key may do up to N times its limit across N
replicas (put a shared limiter, for example at the ingress, in front if that
matters). The methods are called from the event loop only, without an ``await``
between a check and its update, so no lock is needed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from serving.errors import RateLimited

Clock = Callable[[], float]


class TokenBucket:
    """``rate_per_min`` tokens a minute, at most ``capacity`` saved up (default: one minute's worth)."""

    __slots__ = ("capacity", "rate_per_s", "tokens", "updated", "clock")

    def __init__(self, rate_per_min: float, capacity: float | None = None, clock: Clock = time.monotonic):
        self.capacity = float(capacity if capacity is not None else rate_per_min)
        self.rate_per_s = rate_per_min / 60.0
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when there was one, otherwise the seconds until there is one (nothing taken)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


def retry_after(wait_s: float) -> int:
    """Whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(wait_s))


class KeyedBuckets:
    """One token bucket per key (a user's pseudonym), the ``max_keys`` most recently used kept.

    Forgetting a bucket gives its key a full one, so the bound is a memory bound, not a
    limit: keep it above the number of users active within a minute.
    """

    def __init__(self, rate_per_min: float, max_keys: int, clock: Clock = time.monotonic):
        self.rate_per_min = rate_per_min
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_min, clock=self.clock)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Principal:
    """Who calls: an API key's name (or ``page``) and its limits."""

    name: str
    rate_per_min: int
    max_concurrency: int


class PrincipalLimits:
    """Per principal: a token bucket of requests and a cap on requests in flight."""

    def __init__(self, clock: Clock = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    @contextmanager
    def admit(self, principal: Principal) -> Iterator[None]:
        """Hold one of the principal's slots for the ``with`` block; RateLimited (429) when none is free.

        The concurrency cap is checked first, so a request refused for it spends no token.
        """
        name = principal.name
        if self.in_flight(name) >= principal.max_concurrency:
            raise RateLimited(
                f"{name!r} already has {principal.max_concurrency} requests in flight, the most allowed", 1
            )
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(principal.rate_per_min, clock=self.clock)
        wait = bucket.take()
        if wait > 0:
            raise RateLimited(
                f"{name!r} is over its limit of {principal.rate_per_min} requests per minute", retry_after(wait)
            )
        self._in_flight[name] = self.in_flight(name) + 1
        try:
            yield
        finally:
            self._in_flight[name] -= 1
