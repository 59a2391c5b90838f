"""Data-parallel REINFORCE: torchrun with 2 CPU processes on gloo (short)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_helpers import tiny_generator

from finetune_worker.configs import trainer_config
from finetune_worker.settings import FinetuneSettings
from finetune_worker.train import HISTORY_FILE, TrainJob
from musicrl.models.generator import load_generator, save_generator

pytestmark = pytest.mark.unit

HELPERS = Path(__file__).resolve().parents[1]  # tests/, home of finetune_helpers


def test_torchrun_two_gloo_processes_train_one_policy(tmp_path):
    policy = tiny_generator()
    save_generator(policy, tmp_path / "policy")
    settings = FinetuneSettings(
        finetune_steps=4,
        finetune_batch_size=4,
        finetune_duration_s=1.0,
        finetune_policy_lr=1e-2,
        finetune_optimizer="adamw",
        finetune_checkpoint_every=2,
        finetune_candidate_every=2,
        finetune_stage="R",
    )
    job = TrainJob(
        policy_dir=tmp_path / "policy",
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt",
        candidates_dir=tmp_path / "candidates",
        config=trainer_config(settings),
        captions=["calm piano", "fast drums"],
        reward="python:finetune_helpers:TokenFractionReward",
        text_encoder="python:finetune_helpers:embed",
    ).write(tmp_path / "job.json")
    env = {
        **os.environ,
        "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, "-m", "finetune_worker.train", str(job)], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]

    trained, meta = load_generator(tmp_path / "out")
    assert meta["world_size"] == 2 and meta["steps"] == 4
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "candidates").iterdir()) == ["step-0002", "step-0004"]  # rank 0 only
    changed = any(
        (a != b).any() for a, b in zip(trained.state_dict().values(), copy.deepcopy(policy).state_dict().values())
    )
    assert changed
