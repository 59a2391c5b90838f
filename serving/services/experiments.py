"""Which experiment the gateway runs now: the settings' static one, or the finetune worker's canary.

A canary (docs/canary.md) is started and ended by the finetune worker, never by a restart of
the gateway: the worker loads the candidate into Triton as the challenger model, then writes the
registry's canary record ``generator/canary`` in the models bucket (``musicrl.registry``). The
gateway reads that one small object at most every ``gateway_canary_poll_s`` seconds, in the
background (a request never waits for it), and while the record says ``running`` and its
``ends_by`` has not passed, the canary's arm replaces the settings' experiment: the record names
the experiment, the challenger model and the share of pairs.

Failure modes are on the safe side: an unreadable or malformed record counts as "no canary"
(the settings' experiment, if any, goes on; the last good record is kept while the store is
merely unreachable, until its ``ends_by``); a challenger that Triton does not serve falls back to
the current model (``GenerationService._generate``), and such a pair is not an experiment sample.
A worker that died mid-canary cannot leave the experiment on for ever: past ``ends_by`` (plus
``GRACE_S``) the record is ignored.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from musicrl.logging import get_logger
from musicrl.storage import ObjectNotFound

log = get_logger(__name__)

CANARY_KEY = "generator/canary"  # Registry.canary("generator") reads the same object (musicrl.registry.CANARY_POINTER)
GRACE_S = 60.0  # a running record past its ends_by by more than this is ignored (the worker is gone)


@dataclass(frozen=True)
class ExperimentArm:
    """One experiment: its name (stamped on the generation record and the buffer row), the challenger's
    Triton model, the share of requests that take part, and where it came from."""

    name: str
    challenger_model: str
    share: float
    source: str = "settings"  # "settings" or "canary"
    version: str | None = None  # the canary's candidate version

    @classmethod
    def from_settings(cls, settings) -> ExperimentArm | None:
        if not settings.gateway_experiment_name:
            return None
        return cls(
            settings.gateway_experiment_name, settings.gateway_challenger_model_name, settings.gateway_experiment_share
        )


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def arm_of_canary(record: Any, now: float | None = None) -> ExperimentArm | None:
    """The arm a canary record asks for, or None (not running, expired, or malformed)."""
    if not isinstance(record, dict) or record.get("state") != "running":
        return None
    name, model, share = record.get("experiment"), record.get("model_name"), record.get("share")
    if not isinstance(name, str) or not name or not isinstance(model, str) or not model:
        return None
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) <= 1.0:
        return None
    ends_by = _parse_time(record.get("ends_by"))
    if ends_by is None or (now if now is not None else time.time()) > ends_by + GRACE_S:
        return None
    version = record.get("version")
    return ExperimentArm(name, model, float(share), "canary", str(version) if version is not None else None)


class LiveExperiment:
    """The experiment arm of the moment (``current()``): the canary's while one runs, else the settings'."""

    def __init__(self, settings, store, clock=time.monotonic):
        self.settings = settings
        self.store = store
        self.static = ExperimentArm.from_settings(settings)
        self.poll_s = settings.gateway_canary_poll_s
        self._clock = clock
        self._record: dict | None = None
        self._fetched_at: float | None = None
        self._refreshing: asyncio.Task | None = None

    async def current(self) -> ExperimentArm | None:
        if self.poll_s <= 0:
            return self.static
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.poll_s
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._fetched_at = now  # one refresh per interval, even if it fails
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
        return arm_of_canary(self._record) or self.static

    async def refresh(self) -> None:
        """Read the canary record once (in a worker thread, bounded by the store timeout)."""
        s = self.settings
        try:
            record = await asyncio.wait_for(
                asyncio.to_thread(self.store.get_json, s.bucket_models, CANARY_KEY), timeout=s.gateway_store_timeout_s
            )
        except ObjectNotFound:
            record = None
        except Exception as exc:  # noqa: BLE001 - the store unreachable: keep what we knew (it expires by itself)
            log.warning("experiment.canary_unreadable", error=f"{type(exc).__name__}: {exc}")
            return
        before = arm_of_canary(self._record)
        self._record = record if isinstance(record, dict) else None
        after = arm_of_canary(self._record)
        if before != after:
            log.info(
                "experiment.canary_changed",
                experiment=after.name if after else None,
                version=after.version if after else None,
                share=after.share if after else None,
            )
