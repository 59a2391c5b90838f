"""Vote tokens: a vote is accepted only for a pair the gateway served, as it served it.

``POST /v1/generations`` answers with a ``vote_token``, an HMAC-SHA256-signed,
expiring token (``serving.services.signing``, kind ``v1``) over:

- ``g``: the generation id;
- ``k``: the name of the API key that asked for it (``page`` for the listening page);
- ``u``: a keyed digest of the ``user_id`` the request named, or null when it named none;
- ``c``: the clip ids with their durations in seconds;
- ``e``: the expiry (Unix seconds, ``gateway_vote_token_ttl_s`` after the generation).

``POST /v1/feedback`` must bring the token back (``vote_token``) with the same key;
:class:`VotePolicy` refuses (403) a token that is malformed, forged, expired, for
another generation, key or user, or that does not name both clips; refuses (422) a
listening time longer than the clip (plus ``gateway_listen_tolerance_s``); throttles
(429) a user above ``gateway_votes_per_user_per_min``; and refuses (409) a second vote
(another event id) by the same user on the same generation, remembered in memory
until the token expires (:class:`VoteLedger`). A token without a user allows one
vote per generation. The ledger and the user buckets are per process: behind several
replicas a replay may reach another one, and the feedback consumer's de-duplication
by event id stays the second line.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from musicrl.schemas.preference import FeedbackRequest
from serving.errors import DuplicateVote, RateLimited, RequestRejected, VoteRefused
from serving.services.limits import KeyedBuckets, retry_after
from serving.services.signing import BadToken, TokenSigner, derive_key
from serving.settings import GatewaySettings

VOTE_TOKEN_KIND = "v1"


@dataclass(frozen=True)
class VoteClaims:
    """What a valid vote token says."""

    generation_id: str
    key_name: str
    user: str | None  # keyed digest of the user id, or None: any user of the key, once
    clips: dict[str, float]  # clip id -> duration (s)
    expires_at: int  # Unix seconds

    @property
    def voter(self) -> str:
        """Who may vote once on the generation: the user, or the key when the token names no user."""
        return f"user:{self.user}" if self.user is not None else f"key:{self.key_name}"


class VoteTokens:
    """Issues and verifies vote tokens."""

    def __init__(self, secret: bytes, ttl_s: int, clock=time.time):
        self._signer = TokenSigner(VOTE_TOKEN_KIND, derive_key(secret, "musicrl vote token v1"))
        self._user_key = derive_key(secret, "musicrl vote token user v1")
        self.ttl_s = ttl_s
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: GatewaySettings, clock=time.time) -> VoteTokens:
        return cls(
            settings.gateway_vote_token_key.get_secret_value().encode(), settings.gateway_vote_token_ttl_s, clock
        )

    def user_digest(self, user_id: str) -> str:
        """128 bits of HMAC-SHA256 of the user id: binds the token without showing the buffer's pseudonym."""
        return hmac.new(self._user_key, user_id.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(
        self, generation_id: str, clips: Sequence[tuple[str, float]], key_name: str, user_id: str | None = None
    ) -> tuple[str, datetime]:
        """The token of a generation and when it expires."""
        expires = int(self.clock()) + self.ttl_s
        payload = {
            "g": generation_id,
            "k": key_name,
            "u": self.user_digest(user_id) if user_id is not None else None,
            "c": [[clip_id, round(float(duration_s), 3)] for clip_id, duration_s in clips],
            "e": expires,
        }
        return self._signer.sign(payload), datetime.fromtimestamp(expires, UTC)

    def verify(self, token: str) -> VoteClaims:
        """The claims of a valid, unexpired token; VoteRefused (403) otherwise."""
        try:
            payload = self._signer.verify(token)
            claims = VoteClaims(
                generation_id=_typed(payload, "g", str),
                key_name=_typed(payload, "k", str),
                user=None if payload.get("u") is None else _typed(payload, "u", str),
                clips={_clip_id(pair): _duration(pair) for pair in _typed(payload, "c", list)},
                expires_at=_typed(payload, "e", int),
            )
        except BadToken as err:
            raise VoteRefused("vote_token", f"invalid vote token: {err}") from None
        if self.clock() >= claims.expires_at:
            raise VoteRefused(
                "vote_token", f"the vote token has expired: votes are taken for {self.ttl_s} s after the generation"
            )
        return claims


def _typed(payload: dict, name: str, kind: type):
    value = payload.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadToken(f"field {name!r} is missing or not a {kind.__name__}")
    return value


def _clip_id(pair) -> str:
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
        raise BadToken("a clip is not [clip_id, duration_s]")
    return pair[0]


def _duration(pair) -> float:
    if not isinstance(pair[1], int | float) or isinstance(pair[1], bool):
        raise BadToken("a clip duration is not a number")
    return float(pair[1])


class VoteLedger:
    """(voter, generation) -> event id of its vote, kept until the token expires; at most ``max_entries``.

    The oldest entries are forgotten first when it is full (and expired ones as they come up),
    so a replay can pass only after ``max_entries`` newer votes or the token's expiry.
    """

    def __init__(self, max_entries: int, clock=time.time):
        self.max_entries = max_entries
        self.clock = clock
        self._votes: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._votes)

    def claim(self, claims: VoteClaims, event_id: str) -> bool:
        """True for the first vote of its voter on the generation, or a retry of it (same event id)."""
        now = self.clock()
        while self._votes:  # forget what has expired at the old end
            _, (_, expires_at) = next(iter(self._votes.items()))
            if expires_at > now:
                break
            self._votes.popitem(last=False)
        key = (claims.voter, claims.generation_id)
        held = self._votes.get(key)
        if held is not None and held[1] > now:
            return held[0] == event_id
        self._votes[key] = (event_id, claims.expires_at)
        while len(self._votes) > self.max_entries:
            self._votes.popitem(last=False)
        return True


class VotePolicy:
    """The checks a vote must pass before it is produced (see the module docstring)."""

    def __init__(self, settings: GatewaySettings, clock=time.time, monotonic=time.monotonic):
        self.tokens = VoteTokens.from_settings(settings, clock)
        self.ledger = VoteLedger(settings.gateway_vote_ledger_size, clock)
        self.per_user = KeyedBuckets(
            settings.gateway_votes_per_user_per_min, settings.gateway_vote_ledger_size, monotonic
        )
        self.tolerance_s = settings.gateway_listen_tolerance_s
        self.votes_per_min = settings.gateway_votes_per_user_per_min

    def admit(self, request: FeedbackRequest, key_name: str, user_pseudonym: str) -> VoteClaims:
        """Token, binding, listening times and the user's rate; raises VoteRefused, RequestRejected, RateLimited."""
        claims = self.tokens.verify(request.vote_token)
        if claims.generation_id != request.generation_id:
            raise VoteRefused("vote_token", "the vote token is for another generation")
        if claims.key_name != key_name:
            raise VoteRefused("vote_token", "the vote token was issued to another API key")
        if claims.user is not None and not hmac.compare_digest(claims.user, self.tokens.user_digest(request.user_id)):
            raise VoteRefused("vote_token", "the vote token was issued for another user")
        for field, clip_id, listened in (
            ("clip_a_id", request.clip_a_id, request.listen_a_s),
            ("clip_b_id", request.clip_b_id, request.listen_b_s),
        ):
            duration = claims.clips.get(clip_id)
            if duration is None:
                raise VoteRefused(field, f"clip {clip_id} is not one of the vote token's clips")
            if listened > duration + self.tolerance_s:
                listen_field = "listen_a_s" if field == "clip_a_id" else "listen_b_s"
                raise RequestRejected(
                    listen_field, f"{listened} s listened to a clip of {duration} s (tolerance {self.tolerance_s} s)"
                )
        wait = self.per_user.take(user_pseudonym)
        if wait > 0:
            raise RateLimited(
                f"this user is over the limit of {self.votes_per_min} votes per minute", retry_after(wait)
            )
        return claims

    def claim(self, claims: VoteClaims, event_id: str) -> None:
        """Remember the vote; DuplicateVote (409) if its voter voted on the generation with another event id."""
        if not self.ledger.claim(claims, event_id):
            raise DuplicateVote(
                f"this user already voted on generation {claims.generation_id}; a retry must re-send the same event_id"
            )
