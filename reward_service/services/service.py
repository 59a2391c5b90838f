"""The reward service's logic behind the routes: validate, resolve inputs,
queue for the micro-batcher, combine the rewards."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from musicrl.schemas.scores import Component, ItemScores, ScoreItem, ScoreRequest, ScoreResponse
from reward_service.services.batcher import MicroBatcher
from reward_service.services.inputs import Clip, InputError, InputResolver
from reward_service.services.metrics import RewardMetrics
from reward_service.services.models import ModelHolder, ModelSnapshot
from reward_service.services.scorer import Task

ScoreBatch = Callable[[ModelSnapshot, Sequence[Task]], list[dict[str, float]]]


class ComponentUnavailable(RuntimeError):
    """A requested reward model is not loaded (none is published in the registry)."""


def normalise_mos(mos: float) -> float:
    """MOS 1..5 to 0..1, as the paper does before combining with text adherence."""
    return min(1.0, max(0.0, (mos - 1.0) / 4.0))


@dataclass(frozen=True)
class ServiceLimits:
    max_items: int


class RewardService:
    def __init__(
        self,
        holder: ModelHolder,
        resolver: InputResolver,
        score_batch: ScoreBatch,
        metrics: RewardMetrics,
        *,
        limits: ServiceLimits,
        default_weights: Mapping[str, float],
        max_batch_size: int,
        max_wait_s: float,
        max_queued: int,
    ):
        self.holder = holder
        self.resolver = resolver
        self.metrics = metrics
        self.limits = limits
        self.default_weights = dict(default_weights)
        self.batcher: MicroBatcher[Task, dict[str, float], ModelSnapshot] = MicroBatcher(
            score_batch,
            holder.snapshot,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queued=max_queued,
            on_batch=metrics.observe_batch,
            on_queue_depth=metrics.queue_depth.set,
        )

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        if len(request.items) > self.limits.max_items:
            raise InputError(413, f"{len(request.items)} items in one request, the limit is {self.limits.max_items}")
        components = request.requested_components
        weights = self._weights(request, components)
        # Refuse before decoding anything: a request that cannot be scored now
        # should cost as little as possible.
        unavailable = [c for c in components if c not in self.holder.snapshot().versions]
        if unavailable:
            raise ComponentUnavailable(f"no {', '.join(unavailable)} model is published yet; ask for other components")
        need_tokens = "preference" in components
        clips: list[Clip] = await asyncio.gather(
            *(asyncio.to_thread(self._resolve, item, i, need_tokens) for i, item in enumerate(request.items))
        )
        tasks = [Task(clip, components) for clip in clips]
        raw, snapshot = await self.batcher.submit(tasks)
        for item in request.items:
            self.metrics.clips_scored.labels(item.source).inc()
        return ScoreResponse(
            scores=[self._item_scores(r, weights) for r in raw],
            components=list(components),
            weights=weights,
            model_versions={c: snapshot.versions[c] for c in components},
        )

    def _resolve(self, item: ScoreItem, index: int, need_tokens: bool) -> Clip:
        started = time.perf_counter()
        clip = self.resolver.resolve(item, index, need_tokens)
        self.metrics.input_seconds.labels(item.source).observe(time.perf_counter() - started)
        return clip

    def _weights(self, request: ScoreRequest, components: Sequence[Component]) -> dict[Component, float]:
        given = request.weights or {}
        return {c: float(given.get(c, self.default_weights.get(c, 1.0))) for c in components}

    @staticmethod
    def _item_scores(raw: dict[str, float], weights: Mapping[Component, float]) -> ItemScores:
        for name, value in raw.items():
            if not math.isfinite(value):
                raise ArithmeticError(f"the {name} model returned {value}")
        mos = raw.get("quality_mos")
        quality = None if mos is None else normalise_mos(mos)
        values = {"text_adherence": raw.get("text_adherence"), "quality": quality, "preference": raw.get("preference")}
        combined = sum(weight * values[c] for c, weight in weights.items())
        return ItemScores(
            text_adherence=values["text_adherence"],
            quality_mos=mos,
            quality=quality,
            preference=values["preference"],
            combined=combined,
        )
