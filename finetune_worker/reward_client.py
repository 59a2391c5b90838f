"""The reward service over HTTP, as a :class:`RewardFunction` for the trainers.

Rollouts of the default generator are sent as tokens (the service decodes them with
the shared codec); a policy with its own codec (MusicGen) sends its decoded audio
instead (``score_audio``, WAV at the policy's sample rate, through
``finetune_worker.rewards.PolicyRewardFunction``). Requests hold at most ``max_items`` clips,
with the request and response bodies of ``musicrl.schemas.scores``. Connection errors, 429
(queue full) and 5xx are retried with exponential backoff; a 4xx is a bug in what we sent and
fails at once.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import httpx
import numpy as np
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from musicrl.logging import get_logger
from musicrl.schemas.scores import COMPONENTS, ScoreItem, ScoreRequest, ScoreResponse

log = get_logger(__name__)


class RewardServiceError(RuntimeError):
    """The reward service refused the request or stayed unavailable after the retries."""


def _retryable(error: BaseException) -> bool:
    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, httpx.HTTPStatusError) and (
        error.response.status_code == 429 or error.response.status_code >= 500
    )


class HttpRewardFunction:
    """``(prompts, tokens) -> {component: scores}`` through ``POST /v1/scores``."""

    def __init__(
        self,
        base_url: str,
        components: list[str] | None = None,
        max_items: int = 64,
        timeout_s: float = 120.0,
        attempts: int = 6,
        admin_token: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.components = list(components or COMPONENTS)
        self.max_items = max_items
        self.admin_token = admin_token
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport)
        self._versions: dict[str, str] = {}
        self._post = retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )(self._post_once)

    @property
    def versions(self) -> dict[str, str]:
        """Reward model versions that produced the last scores."""
        return dict(self._versions)

    def _post_once(self, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        response = self.http.post(path, json=body, headers=headers)
        response.raise_for_status()
        return response.json()

    def _call(self, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        try:
            return self._post(path, body, headers)
        except httpx.HTTPStatusError as err:
            raise RewardServiceError(f"{path} answered {err.response.status_code}: {err.response.text[:500]}") from err
        except httpx.TransportError as err:
            raise RewardServiceError(f"reward service at {self.http.base_url} unreachable: {err}") from err

    def __call__(self, prompts: list[str], tokens: np.ndarray) -> dict[str, np.ndarray]:
        tokens = np.asarray(tokens)
        if len(prompts) != len(tokens):
            raise ValueError(f"{len(prompts)} prompts for {len(tokens)} clips")
        return self._score(
            [ScoreItem(prompt=p, tokens=[int(t) for t in row]) for p, row in zip(prompts, tokens)], self.components
        )

    def score_audio(
        self, prompts: list[str], waves: Sequence[np.ndarray], sample_rate: int, components: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Score waveforms (mono, in [-1, 1], at ``sample_rate``), sent as WAV: the service keeps their rate
        (32 kHz for MusicGen reaches CLAP at full bandwidth). ``components``: this call's, else the client's."""
        from musicrl.audio.formats import encode_audio  # noqa: PLC0415

        if len(prompts) != len(waves):
            raise ValueError(f"{len(prompts)} prompts for {len(waves)} clips")
        items = [
            ScoreItem(
                prompt=p,
                audio_b64=base64.b64encode(encode_audio(np.asarray(w, dtype=np.float32), int(sample_rate))).decode(),
            )
            for p, w in zip(prompts, waves)
        ]
        return self._score(items, list(components) if components is not None else self.components)

    def _score(self, items: list[ScoreItem], components: list[str]) -> dict[str, np.ndarray]:
        scores = []
        for start in range(0, len(items), self.max_items):
            request = ScoreRequest(items=items[start : start + self.max_items], components=components)
            response = ScoreResponse.model_validate(self._call("/v1/scores", request.model_dump(exclude_none=True)))
            self._versions = dict(response.model_versions)
            scores.extend(response.scores)
        names = [
            n
            for n in ("text_adherence", "quality", "quality_mos", "preference", "combined")
            if getattr(scores[0], n) is not None
        ]
        return {name: np.array([getattr(s, name) for s in scores], dtype=np.float64) for name in names}

    def reload(self) -> dict:
        """Ask the service to load the registry's current reward models now (``POST /v1/admin/reload``)."""
        if not self.admin_token:
            raise RewardServiceError("no admin token configured (MUSICRL_FINETUNE_REWARD_ADMIN_TOKEN)")
        result = self._call("/v1/admin/reload", headers={"Authorization": f"Bearer {self.admin_token}"})
        log.info("reward_service.reloaded", **result)
        return result

    def close(self) -> None:
        self.http.close()
