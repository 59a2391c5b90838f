"""A registry and a buffer with a few finetune cycles behind them, for the operator's view tests.

``seed_ops_history`` writes, through the real ``Registry`` and the buffer's Parquet
layout, what three hours of the loop leave behind (times relative to ``now``):

    generator 1   base (published like `stack up` does), served first
    policy 1      60 votes in two segments, 10 to 50 min after the start
    reward/preference 1 (bootstrap, no run) and 2 (trained on policy 1's votes, run r1)
    generator 2   run r1 on policy 1's segments, published at +60 min, deployed
    policy 2      30 votes at +70..+100 min, 6 of them on pairs of a version-1 and a version-2 clip
    (refused)     run r2 at +110 min: the gate refused both snapshots (reward not improved)
    reward/preference rejected at +105 min (accuracy not above chance)
    generator 3   run r3 on both policies' segments, published at +150 min, current since +151 min
    policy 3      20 votes in the last 20 minutes

Timestamps the registry writes itself (``created_at``, ``updated_at``, ``recorded_at``) are
rewritten after the fact so that tests can check the derived latencies exactly.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from buffer_helpers import vote_row

from musicrl.buffer import rows_to_parquet, segment_key
from musicrl.registry import MANIFEST, Registry
from musicrl.storage import ObjectStore

START_BEFORE_NOW = timedelta(hours=3)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rows(policy: str, times: list[datetime], partition: int, first_offset: int, mixed_every: int = 0) -> list[dict]:
    rows = []
    for i, received in enumerate(times):
        mixed = bool(mixed_every) and i % mixed_every == 0
        version_a = str(int(policy) - 1) if mixed else policy
        # Mixed pairs: the new version (clip b) wins two of three.
        choice = ("b" if i % 3 else "a") if mixed else ("a", "b", "tie")[i % 3]
        rows.append(
            vote_row(
                event_id=f"{policy}-{partition}-{first_offset + i}",
                generation_id=f"{policy}{partition}{first_offset + i:030d}",
                choice=choice,
                received=received,
                version_a=version_a,
                version_b=policy,
                offset=first_offset + i,
                partition=partition,
                policy_version=policy,
            )
        )
    return rows


def _segment(
    store: ObjectStore,
    bucket: str,
    policy: str,
    partition: int,
    first_offset: int,
    times: list[datetime],
    mixed_every: int = 0,
) -> str:
    key = segment_key(policy, partition, first_offset, first_offset + len(times) - 1)
    store.put_bytes(bucket, key, rows_to_parquet(_rows(policy, times, partition, first_offset, mixed_every)))
    return key


def _publish(registry: Registry, kind: str, at: datetime, metrics: dict, lineage: dict, workdir: Path) -> str:
    directory = workdir / kind.replace("/", "_") / iso(at)
    directory.mkdir(parents=True)
    (directory / "weights.pt").write_bytes(b"not really weights")
    version = registry.publish(kind, directory, metrics=metrics, lineage=lineage)
    key = f"{kind}/{version}/{MANIFEST}"
    manifest = registry.store.get_json(registry.bucket, key)
    registry.store.put_json(registry.bucket, key, {**manifest, "created_at": iso(at)})
    return version


def _set_current(registry: Registry, kind: str, version: str, at: datetime) -> None:
    registry.set_current(kind, version)
    record = registry.store.get_json(registry.bucket, f"{kind}/current")
    registry.store.put_json(registry.bucket, f"{kind}/current", {**record, "updated_at": iso(at)})


def _reject(registry: Registry, kind: str, at: datetime, report: dict) -> None:
    key = registry.record_rejection(kind, report)
    registry.store.put_json(
        registry.bucket, key, {**registry.store.get_json(registry.bucket, key), "recorded_at": iso(at)}
    )


def _gate(reward: float, kl: float, text: float, quality: float) -> dict:
    return {
        "reward": reward,
        "kl": kl,
        "reward/preference": reward,
        "reward/text_adherence": text,
        "reward/quality": quality,
        "reward/quality_mos": 1 + 4 * quality,
        "reward/combined": reward + text + quality,
        "n_clips": 48.0,
    }


def seed_ops_history(store: ObjectStore, bucket_models: str, bucket_buffer: str, now: datetime) -> dict:
    """Write the history above; returns what a reader should find (keys, times, counts)."""
    start = now - START_BEFORE_NOW
    at = lambda minutes: start + timedelta(minutes=minutes)  # noqa: E731
    registry = Registry(store, bucket_models)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        v1 = _publish(registry, "generator", at(0), {}, {"source": "checkpoints/generator"}, workdir)
        _set_current(registry, "generator", v1, at(0))
        p1 = [
            _segment(store, bucket_buffer, "1", 0, 0, [at(10 + i) for i in range(40)]),
            _segment(store, bucket_buffer, "1", 1, 0, [at(30 + i) for i in range(20)]),
        ]
        rm1 = _publish(registry, "reward/preference", at(0), {}, {"source": "checkpoints/preference"}, workdir)
        _set_current(registry, "reward/preference", rm1, at(0))
        rm2 = _publish(
            registry,
            "reward/preference",
            at(55),
            {"heldout_accuracy": 0.61, "n_train_pairs": 48, "n_heldout_pairs": 12},
            {"generator_version": v1, "buffer_segments": p1, "run_id": "r1"},
            workdir,
        )
        _set_current(registry, "reward/preference", rm2, at(56))
        v2 = _publish(
            registry,
            "generator",
            at(60),
            {
                "gate": {
                    "candidate": _gate(1.20, 3.1, 0.215, 0.60),
                    "baseline": _gate(0.80, 0.0, 0.217, 0.61),
                    "chosen_step": 10,
                },
                "train": {"reward": 1.1, "kl": 2.9},
                "reward_model": {"published": rm2, "heldout_accuracy": 0.61, "n_train_pairs": 48},
            },
            {
                "run_id": "r1",
                "parent_version": v1,
                "reference_version": v1,
                "stage": "U",
                "trainer": "reinforce",
                "reward_model_versions": {"preference": rm2, "text_adherence": "1", "quality": "1"},
                "buffer_segments": p1,
                "n_preferences": 60,
                "chosen_step": 10,
                "code_commit": "abc1234",
            },
            workdir,
        )
        _set_current(registry, "generator", v2, at(61))
        p2 = [_segment(store, bucket_buffer, "2", 0, 40, [at(70 + i) for i in range(30)], mixed_every=5)]
        _reject(
            registry,
            "reward/preference",
            at(105),
            {
                "reason": "out-of-sample (held-out or cross-validated) accuracy not above chance",
                "metrics": {"heldout_accuracy": 0.48, "n_train_pairs": 70},
                "lineage": {"generator_version": v2, "run_id": "r2"},
            },
        )
        checks = [
            {"name": "finite", "passed": True, "detail": "ok"},
            {
                "name": "reward_improved",
                "passed": False,
                "detail": "target reward 1.2000 -> 1.1500 (gain -0.0500, needs > 0.0)",
            },
            {"name": "kl_bounded", "passed": True, "detail": "KL 4.000 nats/clip (bound 50.0)"},
            {"name": "no_collapse", "passed": True, "detail": "other rewards within 0.05"},
        ]
        _reject(
            registry,
            "generator",
            at(110),
            {
                "reason": "no checkpoint passed the gate: step 5: reward_improved: ... | step 10: reward_improved: ...",
                "gate": {
                    "passed": False,
                    "checks": checks,
                    "candidate": _gate(1.15, 4.0, 0.214, 0.6),
                    "baseline": _gate(1.20, 3.1, 0.215, 0.6),
                    "reason": "reward_improved: ...",
                    "chosen_step": None,
                    "checkpoints": [
                        {"step": 5, "passed": False, "reason": "reward_improved: ...", "reward": 1.1, "kl": 2.0},
                        {"step": 10, "passed": False, "reason": "reward_improved: ...", "reward": 1.15, "kl": 4.0},
                    ],
                },
                "lineage": {
                    "run_id": "r2",
                    "parent_version": v2,
                    "stage": "U",
                    "trainer": "reinforce",
                    "buffer_segments": p1 + p2,
                },
            },
        )
        v3 = _publish(
            registry,
            "generator",
            at(150),
            {
                "gate": {
                    "candidate": _gate(1.45, 6.0, 0.212, 0.59),
                    "baseline": _gate(1.20, 3.1, 0.215, 0.60),
                    "chosen_step": 15,
                },
                "train": {"reward": 1.4, "kl": 5.5},
                "reward_model": {"published": None, "kept": rm2, "heldout_accuracy": 0.6},
            },
            {
                "run_id": "r3",
                "parent_version": v2,
                "reference_version": v1,
                "stage": "U",
                "trainer": "reinforce",
                "reward_model_versions": {"preference": rm2},
                "buffer_segments": p1 + p2,
                "n_preferences": 90,
                "chosen_step": 15,
                "code_commit": "abc1234",
            },
            workdir,
        )
        # Version 3 was first a canary against version 2 (docs/canary.md), promoted on the users' votes.
        registry.record_canary(
            "generator",
            {
                "canary_id": "c3",
                "run_id": "r3",
                "version": v3,
                "baseline_version": v2,
                "state": "promoted",
                "started_at": at(150).isoformat(),
                "share": 0.5,
                "alpha": 0.05,
                "max_votes": 400,
                "votes": {"wins": 40, "losses": 20, "ties": 3, "decided": 60, "used": 63, "seen": 63},
                "win_rate": 0.667,
                "lower": 0.52,
                "upper": 0.79,
                "decision_reason": "lower bound 0.52 > 0.5",
                "event_ids": ["e1"],
            },
        )
        _set_current(registry, "generator", v3, at(151))
    p3 = [_segment(store, bucket_buffer, "3", 0, 70, [now - timedelta(minutes=20 - i) for i in range(20)])]
    return {
        "start": start,
        "versions": [v1, v2, v3],
        "reward_models": [rm1, rm2],
        "segments": {"1": p1, "2": p2, "3": p3},
        "votes": {"1": 60, "2": 30, "3": 20},
        "v2_newest_vote": at(30 + 19),
        "v3_newest_vote": at(70 + 29),
        "v2_deployed": at(60),
        "v3_deployed": at(151),
    }
