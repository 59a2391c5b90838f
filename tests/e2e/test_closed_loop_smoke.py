"""A short closed loop on the real stack: the experiment's own code path, one small round.

The session's servers (SeaweedFS, Tansu, Triton) with the project's services started as
stack components (reward service, gateway, consumer: real subprocesses), a tiny servable
base generator and the committed reward checkpoints published by the stack's bootstrap;
training listeners vote through the gateway and Kafka, one finetune cycle runs with a
probe on the gateway, and held-out listeners judge the served policy against the base.
Every name (buckets, topics, consumer group, Triton model) is unique to this test.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from finetune_helpers import servable_generator

from loadtests.closed_loop import ClosedLoopConfig, loop_services, run_closed_loop, write_reports
from musicrl.models.generator import save_generator
from musicrl.stack.processes import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def loop_settings(stack, tmp_path, monkeypatch):
    for name in ("text_adherence", "quality"):
        if not (ROOT / "checkpoints" / name).is_dir():
            pytest.skip(f"checkpoints/{name} is not built yet")
        shutil.copytree(ROOT / "checkpoints" / name, tmp_path / "checkpoints" / name)
    save_generator(servable_generator(0), tmp_path / "checkpoints" / "generator")
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("MUSICRL_CONSUMER_GROUP_ID", f"loop-{tag}")
    settings = stack.settings.model_copy(
        update={
            "bucket_models": f"loop-models-{tag}",
            "bucket_buffer": f"loop-buffer-{tag}",
            "topic_preferences": f"loop-prefs-{tag}",
            "topic_dead_letter": f"loop-prefs-{tag}.dlq",
            "triton_model_name": f"loop_{tag}",
            "stack_gateway_port": free_port(),
            "stack_reward_port": free_port(),
            "stack_consumer_metrics_port": free_port(),
        }
    )
    return settings, tmp_path / "checkpoints"


def test_one_round_votes_train_swap_and_judge(loop_settings, tmp_path):
    settings, checkpoints = loop_settings
    config = ClosedLoopConfig(
        rounds=1,
        pairs_per_round=16,
        clip_s=2.0,
        eval_prompts=6,
        eval_samples=2,
        reward_eval_prompts=3,
        finetune={
            "finetune_steps": 3,
            "finetune_batch_size": 4,
            "finetune_duration_s": 2.0,
            "finetune_rm_min_pairs": 3,
            "finetune_eval_prompts": 4,
            "finetune_corpus_captions": 16,
            "finetune_optimizer": "adamw",
            "finetune_policy_lr": 1e-3,
            "finetune_gate_max_kl": 500.0,
            # a handful of votes cannot pass the reward model's held-out check, and then a cycle is skipped;
            # this test is about the plumbing of a whole round, so RL uses the committed preference model
            "finetune_train_reward_model": False,
        },
    )
    with loop_services(settings, checkpoints) as info:
        results = run_closed_loop(info, config, tmp_path / "work", progress=lambda message: None)
    paths = write_reports(results, tmp_path / "out")

    assert results["population"] == "default" and results["seed"] == 0
    settings = results["finetune_settings"]  # the effective settings, not only the overrides
    assert settings["finetune_steps"] == 3 and settings["finetune_duration_s"] == 2.0 and "finetune_stage" in settings
    assert set(results["algorithm_overrides"]) == {
        "finetune_batch_size",
        "finetune_optimizer",
        "finetune_policy_lr",
        "finetune_gate_max_kl",
        "finetune_train_reward_model",
    }
    base, round_1 = results["rounds"]
    assert base["policy_version"] == "1" and base["base_vs_base"]["wins"] + base["base_vs_base"]["losses"] > 0
    assert round_1["listener_failures"] == 0 and sum(round_1["votes"].values()) == 16
    assert round_1["preferences_round"] > 0  # votes went gateway -> Kafka -> consumer -> buffer
    assert round_1["cycle"]["status"] in ("deployed", "rejected"), round_1["cycle"]
    win = round_1["win_rate"]
    assert win["wins"] + win["losses"] + win["ties"] == 12
    assert 0.0 <= win["ci_low"] <= win["win_rate"] <= win["ci_high"] <= 1.0
    swap = round_1["hot_swap"]
    assert swap["steady"]["failed"] == 0 and swap["during_swap"]["failed"] == 0, swap
    if round_1["cycle"]["status"] == "deployed":
        assert round_1["policy_version"] == "2" and "2" in swap["versions_seen"]
        assert round_1["preference_to_deployed_s"] > 0
    else:
        assert round_1["policy_version"] == "1"
    assert json.loads(paths[0].read_text())["final"]["policy_version"] == round_1["policy_version"]
    assert "MusicRL-U round 1" in paths[1].read_text() and paths[2].stat().st_size > 10_000
