"""What a finetune cycle's buffer-dependent work costs as the buffer grows.

RL and the gate cost the same whatever the buffer holds (a fixed number of steps,
rollouts and held-out prompts); what grows with the buffer is the preference reward
model: reading the buffer window, choosing its training and held-out pairs, embedding
their prompts and training. This benchmark times exactly that path of
``FinetuneCycle.update_reward_model`` (``select_pair_rows`` -> ``pairs_from_rows`` ->
``reward_model_from_settings``, the fit ``FinetuneSettings`` asks for: by default the
probe's heads on a frozen copy of the generator, cross-validated) on synthetic buffers
of increasing size: Parquet segments of rows
with the buffer's schema, votes on random 5 s token clips spread over several policy
versions, the newest holding a round's worth. Results: ``results/cycle_cost.json``.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROUND_PREFERENCES = 230  # what one closed-loop round lands on the current policy


def synthetic_rows(n: int, n_frames: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` buffer rows; the newest ``ROUND_PREFERENCES`` on the current policy, the rest on older ones."""
    from musicrl.audio import codec
    from musicrl.corpus.dataset import make_corpus

    rng = np.random.default_rng(seed)
    prompts = [r.caption for r in make_corpus(200, seed=seed, split="train", duration_s=1.0)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(n):
        policy = "9" if i >= n - ROUND_PREFERENCES else str(1 + i * 8 // max(1, n - ROUND_PREFERENCES))
        tokens = rng.integers(0, codec.VOCAB_SIZE, size=(2, n_frames))
        rows.append(
            {
                "event_id": uuid.uuid4().hex,
                "generation_id": uuid.uuid4().hex,
                "clip_a_id": uuid.uuid4().hex,
                "clip_b_id": uuid.uuid4().hex,
                "choice": str(rng.choice(["a", "b", "tie"], p=[0.45, 0.45, 0.1])),
                "is_tie": False,
                "listen_a_s": 5.0,
                "listen_b_s": 5.0,
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
                "received_at": start + timedelta(seconds=i),
                "prompt": prompts[int(rng.integers(len(prompts)))],
                "temperature": 0.99,
                "top_k": 0,
                "policy_version": policy,
                "mixed_policy": False,
                "policy_version_a": policy,
                "policy_version_b": policy,
                "tokens_a": tokens[0].tolist(),
                "tokens_b": tokens[1].tolist(),
            }
        )
    return rows


def reward_model_cost(n_rows: int, work_dir: Path, settings, generator, embed, seed: int = 0) -> dict[str, Any]:
    """Seconds of the buffer-dependent part of one cycle on a buffer of ``n_rows`` preferences."""
    from finetune_worker.reward_model import pairs_from_rows, reward_model_from_settings, select_pair_rows
    from musicrl.audio import codec
    from musicrl.buffer import parquet_to_table, rows_to_parquet

    s = settings
    segment = rows_to_parquet(synthetic_rows(n_rows, codec.frames_for(s.finetune_duration_s), seed))
    started = time.perf_counter()
    rows = parquet_to_table(segment).to_pylist()  # what PreferenceBuffer.read returns for the window
    selected = select_pair_rows(
        rows, "9", max_pairs=s.finetune_rm_max_pairs, heldout_fraction=s.finetune_heldout_fraction, seed=s.finetune_seed
    )
    train, heldout = pairs_from_rows(selected.train, embed), pairs_from_rows(selected.heldout, embed)
    selected_s = time.perf_counter() - started
    metrics, _ = reward_model_from_settings(
        s, generator, train, heldout, None, work_dir / f"rm_{n_rows}", progress=False
    )
    return {
        "buffer_preferences": n_rows,
        "seconds": round(time.perf_counter() - started, 2),
        "read_and_select_s": round(selected_s, 2),
        "train_pairs": metrics["n_train_pairs"],
        "heldout_pairs": len(heldout.pairs),
        **{k: v for k, v in selected.stats.items() if k.startswith("n_")},
    }


def run_cycle_cost(sizes: list[int], work_dir: Path, repeats: int = 3) -> dict[str, Any]:
    import torch

    from finetune_worker.settings import FinetuneSettings
    from finetune_worker.stack_component import CHECKPOINTS
    from finetune_worker.train import make_embed
    from loadtests.closed_loop import machine
    from musicrl.models.generator import load_generator

    torch.set_num_threads(1)  # as the stack runs the worker
    settings = FinetuneSettings()
    generator, _ = load_generator(CHECKPOINTS / "generator")
    embed = make_embed(settings.finetune_text_encoder)
    embed(["warm-up"])  # loads the encoder's weights once, outside every timing (a worker has them loaded)
    points = []
    for n in sizes:  # each size timed ``repeats`` times, the median kept: single timings on 2 busy cores vary
        runs = [reward_model_cost(n, work_dir, settings, generator, embed) for _ in range(repeats)]
        point = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
        points.append(point | {"seconds_runs": [run["seconds"] for run in runs]})
    baseline = points[0]["seconds"]
    for point in points:
        point["ratio_to_smallest"] = round(point["seconds"] / baseline, 3)
    return {
        "benchmark": "cycle_cost",
        "machine": machine(),
        "points": points,
        "settings": {
            k: getattr(settings, k)
            for k in (
                "finetune_rm_fit",
                "finetune_rm_max_pairs",
                "finetune_rm_cv_folds",
                "finetune_rm_heads",
                "finetune_heldout_fraction",
                "finetune_duration_s",
            )
        },
        "flat_within_30_percent": all(p["ratio_to_smallest"] <= 1.3 for p in points),
        "note": (
            "the buffer-dependent part of a cycle (reward model); RL steps, gate and deploy do not depend on the buffer"
        ),
    }


def write_results(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
