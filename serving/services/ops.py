"""The operator's view: what the loop did, read from the model registry and the on-policy buffer.

``OpsService.summary()`` builds the JSON behind ``GET /v1/ops/summary`` and the
``/dashboard`` page:

- ``served``: the generator version the registry's ``current`` points at, when it moved,
  and its lineage (parent, stage, trainer, reward-model versions, buffer segments, votes);
- ``versions``: every published generator version with its gate metrics (reward, KL,
  text adherence, quality, the parent's numbers on the same prompts and seeds), the
  votes that trained it, whether it was deployed, and the time from the votes to the
  deployed policy;
- ``cycles``: every finetune cycle the registry knows of, newest first: published ones
  (they passed every gate check) and refused ones with each check and each snapshot;
- ``canaries``: every canary by preference (docs/canary.md), newest first, with its decision,
  wins, losses and confidence bounds; each cycle carries its own canary's outcome too;
- ``reward_models``: the ``reward/preference`` versions and refusals;
- ``buffer``: rows per policy version, votes per minute by policy version over a window,
  and head-to-head win rates from pairs whose two clips came from different versions.

The registry is read with ``Registry.history`` and ``Registry.rejections``, the same calls
as ``musicrl finetune history``. The buffer is read one segment at a time, a few columns
only, and each segment's counts are cached by key (segments are immutable); the whole
summary is cached for ``ttl_s``. Nothing personal leaves this module: counts and times,
no prompts, no user pseudonyms. A section that cannot be read (the object store down, or
the gateway's object-store user not allowed to read the bucket) is reported in ``errors``
and the other sections are still returned.

Skipped cycles (no vote-trained preference model yet) are not in the registry; the
finetune worker counts them in ``musicrl_finetune_cycles_total{status="skipped"}``.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq

from musicrl.buffer import PreferenceBuffer, SegmentRef, parse_segment_key
from musicrl.logging import get_logger
from musicrl.registry import Registry
from musicrl.storage import ObjectNotFound, ObjectStore

log = get_logger(__name__)

GENERATOR = "generator"
PREFERENCE = "reward/preference"
SEGMENT_COLUMNS = ["received_at", "is_tie", "choice", "policy_version_a", "policy_version_b"]
MAX_WINDOW_MINUTES = 24 * 60
MAX_SEGMENT_KEYS = 200  # per version in the JSON (the count is always exact)
# The gate's metric names (finetune_worker.evaluation.evaluate_policy): shown as columns and charts.
GATE_METRICS = {
    "reward": "reward",
    "kl": "kl",
    "text_adherence": "reward/text_adherence",
    "quality": "reward/quality",
    "preference": "reward/preference",
    "quality_mos": "reward/quality_mos",
}


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch of an ISO timestamp (``...Z`` or with an offset), or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity (a refused cycle's metrics may hold some) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if str(version).isdigit() else (1, str(version))


@dataclass
class SegmentSummary:
    """What the dashboard needs from one buffer segment (counts and times only)."""

    key: str
    policy_version: str
    rows: int = 0
    ties: int = 0
    first_at: float | None = None
    last_at: float | None = None
    per_minute: Counter = field(default_factory=Counter)  # epoch minute -> rows received in it
    # (version, opponent) -> [wins, losses, ties], from rows whose clips came from two versions
    head_to_head: dict[tuple[str, str], list[int]] = field(default_factory=dict)


def summarise_segment(ref: SegmentRef, data: bytes) -> SegmentSummary:
    table = pq.read_table(io.BytesIO(data), columns=SEGMENT_COLUMNS)
    summary = SegmentSummary(key=ref.key, policy_version=ref.policy_version, rows=table.num_rows)
    received = [ts.timestamp() for ts in table["received_at"].to_pylist() if ts is not None]
    if received:
        summary.first_at, summary.last_at = min(received), max(received)
        summary.per_minute.update(int(t // 60) for t in received)
    summary.ties = sum(1 for tie in table["is_tie"].to_pylist() if tie)
    choices = table["choice"].to_pylist()
    for choice, version_a, version_b in zip(
        choices, table["policy_version_a"].to_pylist(), table["policy_version_b"].to_pylist()
    ):
        if not version_a or not version_b or version_a == version_b or choice not in ("a", "b", "tie"):
            continue
        for version, opponent, won in ((version_a, version_b, choice == "a"), (version_b, version_a, choice == "b")):
            counts = summary.head_to_head.setdefault((version, opponent), [0, 0, 0])
            counts[2 if choice == "tie" else (0 if won else 1)] += 1
    return summary


class OpsService:
    """Builds the operator's summary; thread-safe, one instance per gateway process."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        bucket_models: str,
        bucket_buffer: str,
        model_name: str = "generator",
        ttl_s: float = 10.0,
        read_workers: int = 8,
        max_cached_segments: int = 100_000,
        clock=time.time,
    ):
        self.registry = Registry(store, bucket_models)
        self.buffer = PreferenceBuffer(store, bucket_buffer, read_workers=read_workers)
        self.store = store
        self.model_name = model_name
        self.ttl_s = ttl_s
        self.read_workers = read_workers
        self.max_cached_segments = max_cached_segments
        self.clock = clock
        self._segments: OrderedDict[str, SegmentSummary] = OrderedDict()
        self._cached: dict[int, tuple[float, dict]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, store: ObjectStore) -> OpsService:
        return cls(
            store,
            bucket_models=settings.bucket_models,
            bucket_buffer=settings.bucket_buffer,
            model_name=settings.triton_model_name,
        )

    # ------------------------------------------------------------------ the summary

    def summary(self, window_minutes: int = 60) -> dict[str, Any]:
        """The whole operator's view (cached for ``ttl_s`` per window)."""
        window_minutes = max(1, min(int(window_minutes), MAX_WINDOW_MINUTES))
        with self._lock:  # one computation at a time; the others get its result
            cached = self._cached.get(window_minutes)
            if cached is not None and self.clock() - cached[0] < self.ttl_s:
                return cached[1]
            result = self._build(window_minutes)
            self._cached = {window_minutes: (self.clock(), result)}
            return result

    def _build(self, window_minutes: int) -> dict[str, Any]:
        now = self.clock()
        errors: list[dict[str, str]] = []

        def attempt(section: str, fn, default):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - one section failing must not blank the page
                log.warning("ops.section_failed", section=section, error=str(exc))
                errors.append({"section": section, "error": f"{type(exc).__name__}: {exc}"})
                return default

        segments = attempt("buffer", self._segment_summaries, None)
        # The same reading as `musicrl finetune history`: every manifest (current marked), every refusal.
        pointer, history, rejected = attempt("registry", lambda: self._read_registry(GENERATOR), (None, [], []))
        reward_pointer, reward_history, reward_rejected = attempt(
            "reward_models", lambda: self._read_registry(PREFERENCE), (None, [], [])
        )

        by_key = {s.key: s for s in segments or []}
        buffer = self._buffer_section(segments, window_minutes, now) if segments is not None else None
        versions = self._versions(history, pointer, rejected, by_key)
        canaries = attempt("canaries", lambda: self._canaries(), [])
        cycles = self._with_canaries(self._cycles(history, rejected), canaries)
        served = next((v for v in versions if v["is_current"]), None)
        return _json_safe(
            {
                "generated_at": _iso(now),
                "window_minutes": window_minutes,
                "model_name": self.model_name,
                "served": {
                    "version": pointer.get("version") if pointer else None,
                    "previous": pointer.get("previous") if pointer else None,
                    "updated_at": pointer.get("updated_at") if pointer else None,
                    "details": served,
                },
                "versions": versions,
                "cycles": cycles,
                "cycles_since_accepted": self._cycles_since_accepted(cycles),
                "canaries": canaries,
                "reward_models": self._reward_models(reward_history, reward_rejected, reward_pointer),
                "buffer": buffer,
                "errors": errors,
            }
        )

    def _canaries(self) -> list[dict[str, Any]]:
        """Every canary by preference (docs/canary.md), newest first: its decision and the counts behind it
        (the list of vote ids stays in the registry)."""
        fields = (
            "canary_id",
            "run_id",
            "version",
            "baseline_version",
            "state",
            "started_at",
            "updated_at",
            "share",
            "alpha",
            "max_votes",
            "votes",
            "win_rate",
            "lower",
            "upper",
            "decision_reason",
        )
        records = [{k: record.get(k) for k in fields} for record in self.registry.canaries(GENERATOR)]
        return list(reversed(records))

    @staticmethod
    def _with_canaries(cycles: list[dict], canaries: list[dict]) -> list[dict]:
        """Each cycle with the outcome of its canary (``None`` when it had none)."""
        by_run = {c["run_id"]: c for c in reversed(canaries) if c.get("run_id")}  # newest canary of a run wins
        for cycle in cycles:
            canary = by_run.get(cycle.get("run_id"))
            cycle["canary"] = (
                None if canary is None else {k: canary.get(k) for k in ("state", "win_rate", "lower", "upper", "votes")}
            )
        return cycles

    def _read_registry(self, kind: str) -> tuple[dict | None, list[dict], list[dict]]:
        return self.registry.pointer(kind), self.registry.history(kind), self.registry.rejections(kind)

    # ------------------------------------------------------------------ buffer

    def _segment_summaries(self) -> list[SegmentSummary]:
        refs = self.buffer.segments()
        missing = [ref for ref in refs if ref.key not in self._segments]

        def read(ref: SegmentRef) -> SegmentSummary | None:
            try:
                return summarise_segment(ref, self.store.get_bytes(self.buffer.bucket, ref.key))
            except ObjectNotFound:  # replaced or deleted between the listing and the read
                return None

        if missing:
            with ThreadPoolExecutor(max_workers=self.read_workers) as pool:
                for summary in pool.map(read, missing):
                    if summary is not None:
                        self._segments[summary.key] = summary
        listed = {ref.key for ref in refs}
        for key in [key for key in self._segments if key not in listed]:
            del self._segments[key]
        while len(self._segments) > self.max_cached_segments:
            self._segments.popitem(last=False)
        return [self._segments[ref.key] for ref in refs if ref.key in self._segments]

    def _buffer_section(self, segments: list[SegmentSummary], window_minutes: int, now: float) -> dict[str, Any]:
        by_policy: dict[str, dict[str, Any]] = {}
        for s in segments:
            row = by_policy.setdefault(
                s.policy_version,
                {
                    "policy_version": s.policy_version,
                    "votes": 0,
                    "ties": 0,
                    "segments": 0,
                    "first_vote_at": None,
                    "last_vote_at": None,
                },
            )
            row["votes"] += s.rows
            row["ties"] += s.ties
            row["segments"] += 1
            if s.first_at is not None:
                row["first_vote_at"] = (
                    s.first_at if row["first_vote_at"] is None else min(row["first_vote_at"], s.first_at)
                )
                row["last_vote_at"] = s.last_at if row["last_vote_at"] is None else max(row["last_vote_at"], s.last_at)
        policies = sorted(by_policy, key=_version_key)
        last_minute = int(now // 60)
        first_minute = last_minute - window_minutes + 1
        per_policy = {v: [0] * window_minutes for v in policies}
        for s in segments:
            for minute, count in s.per_minute.items():
                if first_minute <= minute <= last_minute:
                    per_policy[s.policy_version][minute - first_minute] += count
        totals = [sum(per_policy[v][i] for v in policies) for i in range(window_minutes)]
        per_policy = {v: counts for v, counts in per_policy.items() if any(counts)}
        return {
            "total_votes": sum(row["votes"] for row in by_policy.values()),
            "segments": len(segments),
            "by_policy": [
                {
                    **by_policy[v],
                    "first_vote_at": _iso(by_policy[v]["first_vote_at"]),
                    "last_vote_at": _iso(by_policy[v]["last_vote_at"]),
                }
                for v in policies
            ],
            "votes_per_minute": {
                "start": _iso(first_minute * 60),
                "minutes": window_minutes,
                "total": totals,
                "by_policy": per_policy,
                "mean_per_minute": round(sum(totals) / window_minutes, 3),
                "last_5_min_per_minute": round(sum(totals[-5:]) / min(5, window_minutes), 3),
            },
            "head_to_head": self._head_to_head(segments),
        }

    @staticmethod
    def _head_to_head(segments: list[SegmentSummary]) -> list[dict[str, Any]]:
        merged: dict[tuple[str, str], list[int]] = {}
        for s in segments:
            for pair, counts in s.head_to_head.items():
                total = merged.setdefault(pair, [0, 0, 0])
                for i in range(3):
                    total[i] += counts[i]
        rows = []
        for (version, opponent), (wins, losses, ties) in sorted(
            merged.items(), key=lambda kv: (_version_key(kv[0][0]), _version_key(kv[0][1]))
        ):
            decided = wins + losses
            rows.append(
                {
                    "version": version,
                    "opponent": opponent,
                    "wins": wins,
                    "losses": losses,
                    "ties": ties,
                    "win_rate": round(wins / decided, 4) if decided else None,
                }
            )
        return rows

    # ------------------------------------------------------------------ registry

    def _versions(
        self, history: list[dict], pointer: dict | None, rejected: list[dict], segments: dict[str, SegmentSummary]
    ) -> list[dict[str, Any]]:
        current = str(pointer["version"]) if pointer else None
        served_policies = {s.policy_version for s in segments.values()}
        parents = {str(m.get("lineage", {}).get("parent_version")) for m in history}
        deploy_failures = {str(r["version"]): r for r in rejected if "gate" not in r and r.get("version")}
        head_to_head = self._head_to_head(list(segments.values()))
        rows = []
        for manifest in history:
            version = str(manifest["version"])
            lineage, metrics = manifest.get("lineage", {}) or {}, manifest.get("metrics", {}) or {}
            gate = metrics.get("gate", {}) or {}
            candidate, baseline = gate.get("candidate", {}) or {}, gate.get("baseline", {}) or {}
            deployed = (
                version == current
                or version == str((pointer or {}).get("previous"))
                or version in parents
                or version in served_policies
            )
            if version == current:
                status = "serving"
            elif deployed:
                status = "retired"
            elif version in deploy_failures:
                failure = deploy_failures[version]["reason"] or ""
                status = "rejected_at_deploy" if failure.startswith("checkpoint rejected") else "deploy_failed"
            else:
                status = "published"
            keys = [str(k) for k in lineage.get("buffer_segments", []) or []]
            trained_on = [segments[k] for k in keys if k in segments]
            policies = sorted(
                {ref.policy_version for ref in map(parse_segment_key, keys) if ref is not None}, key=_version_key
            )
            votes = sum(s.rows for s in trained_on)
            published_at = _epoch(manifest.get("created_at"))
            if version == current and pointer:
                deployed_at, basis = _epoch(pointer.get("updated_at")), "pointer"
            elif deployed and lineage.get("run_id"):
                deployed_at, basis = published_at, "published"  # auto-deploy follows the publish by the deploy time
            else:
                deployed_at, basis = None, None
            newest = max((s.last_at for s in trained_on if s.last_at is not None), default=None)
            median = _median_minute(trained_on)
            win = metrics.get("win_rate", candidate.get("win_rate"))
            parent = str(lineage.get("parent_version")) if lineage.get("parent_version") is not None else None
            versus_parent = next((h for h in head_to_head if h["version"] == version and h["opponent"] == parent), None)
            rows.append(
                {
                    "version": version,
                    "is_current": version == current,
                    "status": status,
                    "created_at": manifest.get("created_at"),
                    "parent_version": parent,
                    "reference_version": lineage.get("reference_version"),
                    "stage": lineage.get("stage"),
                    "trainer": lineage.get("trainer"),
                    "run_id": lineage.get("run_id"),
                    "chosen_step": gate.get("chosen_step", lineage.get("chosen_step")),
                    "code_commit": lineage.get("code_commit"),
                    "reward_model_versions": lineage.get("reward_model_versions") or {},
                    "reward_model": _reward_model_of_cycle(metrics.get("reward_model")),
                    "n_preferences": lineage.get("n_preferences"),
                    "training": {
                        "segments": len(keys),
                        "segment_keys": keys[:MAX_SEGMENT_KEYS],
                        "segments_truncated": len(keys) > MAX_SEGMENT_KEYS,
                        "segments_in_buffer": len(trained_on),
                        "policy_versions": policies,
                        "votes": votes,
                        "first_vote_at": _iso(
                            min((s.first_at for s in trained_on if s.first_at is not None), default=None)
                        ),
                        "newest_vote_at": _iso(newest),
                    },
                    "metrics": {name: _number(candidate.get(key)) for name, key in GATE_METRICS.items()},
                    "baseline": {name: _number(baseline.get(key)) for name, key in GATE_METRICS.items()},
                    "train": {k: _number(v) for k, v in (metrics.get("train") or {}).items() if _number(v) is not None},
                    "win_rate": {"source": "registry", "value": _number(win)}
                    if _number(win) is not None
                    else (
                        {
                            "source": "votes",
                            "value": versus_parent["win_rate"],
                            "opponent": parent,
                            "wins": versus_parent["wins"],
                            "losses": versus_parent["losses"],
                        }
                        if versus_parent
                        else None
                    ),
                    "latency": {
                        "published_at": manifest.get("created_at"),
                        "deployed_at": _iso(deployed_at),
                        "deployed_at_basis": basis,
                        "newest_vote_to_deploy_s": round(deployed_at - newest, 1) if deployed_at and newest else None,
                        "median_vote_to_deploy_s": round(deployed_at - median, 1) if deployed_at and median else None,
                    },
                }
            )
        return rows

    @staticmethod
    def _cycles(history: list[dict], rejected: list[dict]) -> list[dict[str, Any]]:
        cycles = []
        for manifest in history:
            lineage, metrics = manifest.get("lineage", {}) or {}, manifest.get("metrics", {}) or {}
            if not lineage.get("run_id"):
                continue  # the base version, published by hand or by `stack up`
            gate = metrics.get("gate", {}) or {}
            candidate, baseline = gate.get("candidate", {}) or {}, gate.get("baseline", {}) or {}
            cycles.append(
                {
                    "at": manifest.get("created_at"),
                    "run_id": lineage.get("run_id"),
                    "outcome": "published",
                    "version": str(manifest["version"]),
                    "parent_version": lineage.get("parent_version"),
                    "stage": lineage.get("stage"),
                    "passed": True,
                    # The registry keeps the chosen snapshot's numbers; it passed every check, or it would not be there.
                    "checks": gate.get("checks"),
                    "checkpoints": gate.get("checkpoints"),
                    "chosen_step": gate.get("chosen_step"),
                    "reward": _number(candidate.get("reward")),
                    "baseline_reward": _number(baseline.get("reward")),
                    "kl": _number(candidate.get("kl")),
                    "reason": None,
                }
            )
        for record in rejected:
            lineage, gate = record.get("lineage", {}) or {}, record.get("gate")
            if gate is not None:
                cycles.append(
                    {
                        "at": record.get("recorded_at"),
                        "run_id": lineage.get("run_id"),
                        "outcome": "rejected",
                        "version": None,
                        "parent_version": lineage.get("parent_version"),
                        "stage": lineage.get("stage"),
                        "passed": False,
                        "checks": gate.get("checks"),
                        "checkpoints": gate.get("checkpoints"),
                        "chosen_step": None,
                        "reward": _number((gate.get("candidate") or {}).get("reward")),
                        "baseline_reward": _number((gate.get("baseline") or {}).get("reward")),
                        "kl": _number((gate.get("candidate") or {}).get("kl")),
                        "reason": record.get("reason"),
                    }
                )
            else:  # refused after publishing: the checkpoint check before deploy, or the deploy itself
                reason = record.get("reason") or ""
                cycles.append(
                    {
                        "at": record.get("recorded_at"),
                        "run_id": record.get("run_id"),
                        "outcome": "rejected_at_deploy"
                        if reason.startswith("checkpoint rejected")
                        else "deploy_failed",
                        "version": record.get("version"),
                        "parent_version": None,
                        "stage": None,
                        "passed": True,
                        "checks": None,
                        "checkpoints": None,
                        "chosen_step": None,
                        "reward": None,
                        "baseline_reward": None,
                        "kl": None,
                        "reason": reason,
                    }
                )
        cycles.sort(key=lambda c: _epoch(c["at"]) or 0.0, reverse=True)
        return cycles

    @staticmethod
    def _cycles_since_accepted(cycles: list[dict]) -> int:
        """Gate refusals since the newest published cycle (what the alert on the worker's metrics watches too)."""
        count = 0
        for cycle in cycles:  # newest first
            if cycle["outcome"] == "published":
                break
            if cycle["outcome"] == "rejected":
                count += 1
        return count

    @staticmethod
    def _reward_models(history: list[dict], rejected: list[dict], pointer: dict | None) -> dict[str, Any]:
        def row(record: dict, version: str | None, at_key: str) -> dict[str, Any]:
            metrics, lineage = record.get("metrics", {}) or {}, record.get("lineage", {}) or {}
            return {
                "version": version,
                "at": record.get(at_key),
                "is_current": bool(record.get("is_current")),
                "trained_on_votes": bool(lineage.get("run_id")),
                "run_id": lineage.get("run_id"),
                "generator_version": lineage.get("generator_version"),
                "heldout_accuracy": _number(metrics.get("heldout_accuracy")),
                "n_train_pairs": _number(metrics.get("n_train_pairs")),
                "n_heldout_pairs": _number(metrics.get("n_heldout_pairs")),
                "warm_start_from": metrics.get("warm_start_from"),
                "segments": len(lineage.get("buffer_segments", []) or []),
                "reason": record.get("reason"),
            }

        return {
            "current": str(pointer["version"]) if pointer else None,
            "versions": [row(m, str(m["version"]), "created_at") for m in history],
            "rejected": [row(r, None, "recorded_at") for r in rejected],
        }


def _reward_model_of_cycle(report: Any) -> dict[str, Any] | None:
    """The reward-model part of a cycle's metrics: which version it published or kept, and its accuracy."""
    if not isinstance(report, dict) or not report:
        return None
    return {
        "published": report.get("published"),
        "kept": report.get("kept"),
        "skipped": report.get("skipped"),
        "heldout_accuracy": _number(report.get("heldout_accuracy")),
        "n_train_pairs": _number(report.get("n_train_pairs")),
    }


def _median_minute(segments: list[SegmentSummary]) -> float | None:
    """Median arrival time (to the minute) of the rows of ``segments``."""
    merged: Counter = Counter()
    for s in segments:
        merged.update(s.per_minute)
    total = sum(merged.values())
    if not total:
        return None
    seen = 0
    for minute in sorted(merged):
        seen += merged[minute]
        if seen * 2 >= total:
            return minute * 60 + 30.0
    return None  # unreachable
