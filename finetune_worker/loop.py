"""The long-running worker: start a cycle when there is enough new data or enough time has passed.

Triggers (either suffices):

- data: at least ``finetune_trigger_min_preferences`` preferences on the current
  policy that no cycle has used yet (the count is remembered per policy version in
  ``<work_dir>/loop_state.json``, so a rejected candidate does not retrigger on the same data);
- time: ``finetune_trigger_interval_s`` since the last cycle (0 turns it off).

An unfinished run (a worker was killed) is resumed at once. With ``finetune_promotion`` canary or both
(docs/canary.md), a cycle's canary stage waits for the users' votes inside the cycle, under the
lease (renewed in the background), polling every ``finetune_poll_interval_s``; no other cycle can
start meanwhile (its parent would be the same policy). A stopped worker resumes the canary.
Every cycle runs under
the object-store lease (``finetune_worker.lease``): two workers never train at once,
and a dead worker's lease expires so another can take over and resume.

On start, a deploy a killed worker left half-done is finished or undone (under the lease,
``Deployer.recover``). SIGTERM/SIGINT (``finetune_worker.shutdown``): the cycle in flight
stops at its next safe point (never inside a publish or a deploy), the lease is released
and ``loop`` returns, so ``finetune loop`` exits 0.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from finetune_worker import shutdown
from finetune_worker.cycle import TERMINAL, FinetuneCycle
from finetune_worker.lease import Lease, LeaseLost
from musicrl.checkpoint import write_json_atomic
from musicrl.logging import get_logger

log = get_logger(__name__)

CYCLES = Counter("musicrl_finetune_cycles", "Finetuning cycles finished, by outcome.", ["status"])
LAST_REWARD = Gauge("musicrl_finetune_last_reward", "Target reward of the last gated candidate on held-out prompts.")
LAST_KL = Gauge("musicrl_finetune_last_kl", "KL to the reference of the last gated candidate, nats per clip.")
SERVED_VERSION = Gauge("musicrl_finetune_current_version", "Generator version the registry points at.")


class Trigger:
    def __init__(self, cycle: FinetuneCycle):
        self.cycle = cycle
        self.path = Path(cycle.work_dir) / "loop_state.json"

    def _load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"used": {}, "last_cycle_at": 0.0}

    def record(self, policy_version: str, n_preferences: int) -> None:
        state = self._load()
        state["used"][policy_version] = n_preferences
        state["last_cycle_at"] = time.time()
        write_json_atomic(self.path, state, indent=None)

    def due(self) -> tuple[bool, str, int]:
        """(start a cycle?, why, preferences on the current policy)."""
        s = self.cycle.settings
        pending = self.cycle.load_state()
        if (
            pending is not None
            and pending.status not in TERMINAL
            and (pending.status != "published" or s.finetune_auto_deploy)
        ):
            return True, f"resume run {pending.run_id} ({pending.status})", 0
        current = self.cycle.registry.current("generator")
        if current is None:
            return False, "no current generator", 0
        count = self.cycle.buffer.counts_by_policy().get(current, 0)
        state = self._load()
        new = count - int(state["used"].get(current, 0))
        if new >= s.finetune_trigger_min_preferences:
            return True, f"{new} new preferences on policy {current}", count
        interval = s.finetune_trigger_interval_s
        if interval and time.time() - float(state["last_cycle_at"]) >= interval:
            return True, f"{interval:.0f} s since the last cycle", count
        return False, f"{new}/{s.finetune_trigger_min_preferences} new preferences on policy {current}", count


def run_cycle_with_lease(
    cycle: FinetuneCycle, trigger: Trigger | None = None, count: int | None = None
) -> dict[str, Any] | None:
    """One cycle under the lease; None when another worker holds it."""
    lease = Lease(cycle.store, ttl_s=cycle.settings.finetune_lease_ttl_s)
    if not lease.acquire():
        log.info("loop.lease_busy", holder=lease.holder())
        return None
    lease.start_renewing()
    cycle.guard = lease.renew
    try:
        _recover(cycle)
        parent = cycle.registry.current("generator")
        record = cycle.run_once()
    finally:
        lease.release()
    CYCLES.labels(record["status"]).inc()
    candidate = record.get("gate", {}).get("candidate", {})
    if candidate:
        LAST_REWARD.set(candidate.get("reward", float("nan")))
        LAST_KL.set(candidate.get("kl", float("nan")))
    if trigger is not None and parent is not None:
        trigger.record(record["parent_version"], count if count is not None else record["n_preferences"])
    return record


def _recover(cycle: FinetuneCycle) -> dict[str, Any] | None:
    """Finish or undo a half-done deploy (the caller holds the lease); a failure is logged, the deploy retries it."""
    try:
        return cycle.deployer().recover()
    except Exception as exc:  # noqa: BLE001 - Triton or the store unreachable: the next deploy recovers first
        log.error("loop.deploy_recovery_failed", error=str(exc))
        return None


def recover_deploy(cycle: FinetuneCycle) -> dict[str, Any] | None:
    """At start: finish or undo the deploy a killed worker left half-done, under the lease.

    Nothing to do (no journal) costs one stat of a local file. None when there was nothing to do
    or another worker holds the lease (its own cycles recover before they deploy).
    """
    if cycle.deployer().read_journal() is None:
        return None
    lease = Lease(cycle.store, ttl_s=cycle.settings.finetune_lease_ttl_s)
    if not lease.acquire():
        log.info("loop.recovery_lease_busy", holder=lease.holder())
        return None
    try:
        return _recover(cycle)
    finally:
        lease.release()


def loop(
    cycle: FinetuneCycle, stop: threading.Event | None = None, max_cycles: int | None = None
) -> list[dict[str, Any]]:
    """Run cycles whenever one is due until ``stop`` is set (``finetune loop`` passes the signal flag,
    ``shutdown.event()``), a stop signal arrives or ``max_cycles`` cycles ran."""
    stop = stop or threading.Event()
    trigger = Trigger(cycle)
    records: list[dict[str, Any]] = []
    try:
        recover_deploy(cycle)
    except Exception as exc:  # noqa: BLE001 - the store unreachable: the first cycle's deploy recovers
        log.error("loop.deploy_recovery_failed", error=str(exc))
    while not stop.is_set() and not shutdown.requested() and (max_cycles is None or len(records) < max_cycles):
        try:
            due, why, count = trigger.due()
            current = cycle.registry.current("generator")
            if current is not None and current.isdigit():
                SERVED_VERSION.set(int(current))
            if due:
                log.info("loop.cycle_start", why=why)
                record = run_cycle_with_lease(cycle, trigger, count or None)
                if record is not None:
                    records.append(record)
                    log.info(
                        "loop.cycle_done", run_id=record["run_id"], status=record["status"], reason=record.get("reason")
                    )
            else:
                log.debug("loop.idle", why=why)
        except shutdown.ShutdownRequested as exc:  # a safe point after SIGTERM/SIGINT; the lease is released
            log.info("loop.stopping", reason=str(exc))
            break
        except LeaseLost as exc:
            log.error("loop.lease_lost", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - keep the worker alive; the run resumes next tick
            log.exception("loop.cycle_failed", error=str(exc))
        if max_cycles is not None and len(records) >= max_cycles:
            break
        stop.wait(cycle.settings.finetune_poll_interval_s)
    if shutdown.requested():
        log.info("loop.stopped", reason=shutdown.reason(), cycles=len(records))
    return records
