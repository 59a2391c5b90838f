"""Whole finetuning cycles on the real object store and Triton, with a fake reward function:
train -> gate -> publish -> deploy; a rejected candidate; SIGKILL mid-training and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from finetune_helpers import servable_generator
from typer.testing import CliRunner

from finetune_worker.cli import app as cli
from finetune_worker.cycle import FinetuneCycle
from finetune_worker.loop import Trigger, loop, run_cycle_with_lease
from finetune_worker.settings import FinetuneSettings
from musicrl.models.generator import save_generator
from musicrl.registry import Registry

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).resolve().parents[1]


def _overrides(tmp_path: Path, model_name: str, bucket: str, buffer_bucket: str, **extra) -> dict:
    return {
        "bucket_models": bucket,
        "bucket_buffer": buffer_bucket,
        "triton_model_name": model_name,
        "finetune_work_dir": tmp_path / "work",
        "finetune_reward": "python:finetune_helpers:ParityReward",
        "finetune_text_encoder": "hashing",
        "finetune_stage": "R",
        "finetune_trainer": "reinforce",
        "finetune_steps": 10,
        "finetune_batch_size": 8,
        "finetune_duration_s": 1.5,
        "finetune_optimizer": "adamw",
        "finetune_policy_lr": 3e-2,
        "finetune_checkpoint_every": 2,
        "finetune_eval_prompts": 6,
        "finetune_corpus_captions": 16,
        "finetune_gate_max_kl": 1000.0,
        "finetune_gate_max_other_drop": 0.25,
        "finetune_deploy_timeout_s": 120.0,
        "finetune_lease_ttl_s": 4.0,
        "finetune_torch_threads": 1,
        **extra,
    }


@pytest.fixture()
def env(stack, object_store, tmp_path):
    """Buckets and a Triton model name of this test's own, generator version 1 published and current."""
    bucket, buffer_bucket = f"test-ft-{uuid.uuid4().hex[:10]}", f"test-ftbuf-{uuid.uuid4().hex[:10]}"
    for name in (bucket, buffer_bucket):
        object_store.client.make_bucket(name)
    model_name = f"ft_cycle_{uuid.uuid4().hex[:8]}"
    overrides = _overrides(tmp_path, model_name, bucket, buffer_bucket, finetune_triton_repo=stack.triton_repo)
    settings = stack.settings_for(FinetuneSettings, **overrides)
    registry = Registry(object_store, bucket=bucket)
    registry.set_current(
        "generator", registry.publish("generator", save_generator(servable_generator(0), tmp_path / "base"))
    )
    yield settings, registry, overrides
    client = httpclient.InferenceServerClient(stack.triton_http_url)
    try:
        client.unload_model(model_name)
    except Exception:  # noqa: BLE001 - never loaded (the test failed before deploying)
        pass
    finally:
        client.close()


def test_one_cycle_trains_gates_publishes_and_deploys(stack, env):
    settings, registry, _ = env
    record = run_cycle_with_lease(FinetuneCycle(settings))
    assert record["status"] == "deployed", record.get("reason")
    assert record["candidate_version"] == "2" and registry.current("generator") == "2"
    gate = record["gate"]
    assert gate["passed"] and gate["candidate"]["reward"] > gate["baseline"]["reward"]
    manifest = registry.manifest("generator", "2")
    lineage = manifest["lineage"]
    assert lineage["parent_version"] == "1" and lineage["reference_version"] == "1" and lineage["stage"] == "R"
    assert (
        lineage["run_id"] == record["run_id"] and lineage["training_config"]["steps"] == 10 and lineage["code_commit"]
    )
    assert "train_history.json" in manifest["files"]
    assert (stack.triton_repo / settings.triton_model_name / "2").is_dir()
    assert Path(record["archive"], "plots", "reward_vs_kl.png").is_file()

    cli_env = {
        **stack.env(),
        "MUSICRL_BUCKET_MODELS": settings.bucket_models,
        "MUSICRL_TRITON_MODEL_NAME": settings.triton_model_name,
        "MUSICRL_FINETUNE_TRITON_REPO": str(stack.triton_repo),
        "MUSICRL_FINETUNE_WORK_DIR": str(settings.finetune_work_dir),
    }
    history = CliRunner().invoke(cli, ["history", "--json"], env=cli_env)
    assert history.exit_code == 0, history.output
    versions = json.loads(history.output)["versions"]
    assert [(v["version"], v["is_current"]) for v in versions] == [("1", False), ("2", True)]
    missing = CliRunner().invoke(cli, ["rollback", "99"], env=cli_env)
    assert missing.exit_code == 1 and "not published" in missing.output and registry.current("generator") == "2"


def test_a_candidate_failing_the_gate_is_recorded_not_published(stack, env):
    settings, registry, _ = env
    strict = settings.model_copy(update={"finetune_gate_max_kl": 1e-6})
    record = run_cycle_with_lease(FinetuneCycle(strict))
    assert record["status"] == "rejected" and "kl_bounded" in record["reason"]
    assert registry.versions("generator") == ["1"] and registry.current("generator") == "1"
    [rejection] = registry.rejections("generator")
    assert "kl_bounded" in rejection["reason"] and rejection["lineage"]["run_id"] == record["run_id"]


def test_sigkill_mid_training_resumes_and_never_publishes_half_trained(stack, env, tmp_path):
    settings, registry, overrides = env
    environment = {
        **os.environ,
        **stack.env(),
        "PYTHONPATH": f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    environment.update({f"MUSICRL_{k.upper()}": str(v) for k, v in overrides.items()})
    environment.update(
        {
            "MUSICRL_FINETUNE_TRITON_REPO": str(stack.triton_repo),
            "MUSICRL_FINETUNE_STEPS": "30",
            "MUSICRL_FINETUNE_GATE_MAX_OTHER_DROP": "1.0",
            "MUSICRL_FINETUNE_AUTO_DEPLOY": "false",
            # a budget the fast test policy cannot exhaust, so the kill lands mid-training
            "MUSICRL_FINETUNE_KL_TARGET": "400",
            "MUSICRL_FINETUNE_KL_BUDGET": "500",
            "MUSICRL_LOG_JSON": "true",
        }
    )
    checkpoint = tmp_path / "work" / "run" / "checkpoints" / "trainer_state.pt"
    worker = subprocess.Popen(
        [sys.executable, "-m", "musicrl.cli", "finetune", "run-once"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.is_file():
            assert worker.poll() is None, f"worker exited early: {worker.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == -signal.SIGKILL
    assert registry.versions("generator") == ["1"], "nothing may be published by a killed worker"
    assert not (tmp_path / "work" / "run" / "candidate").exists()

    resumed = settings.model_copy(
        update={
            "finetune_steps": 30,
            "finetune_gate_max_other_drop": 1.0,
            "finetune_auto_deploy": False,
            "finetune_kl_target": 400.0,
            "finetune_kl_budget": 500.0,
        }
    )
    deadline = time.monotonic() + 30
    record = run_cycle_with_lease(FinetuneCycle(resumed))
    while record is None:  # the killed worker's lease has to expire first (ttl 4 s)
        assert time.monotonic() < deadline, "the dead worker's lease never expired"
        time.sleep(1)
        record = run_cycle_with_lease(FinetuneCycle(resumed))
    assert record["resumed_from_step"] >= 2
    assert record["status"] == "published", record.get("reason")  # auto-deploy off: deploying is tested elsewhere
    assert registry.versions("generator") == ["1", "2"] and registry.current("generator") == "1"
    assert registry.manifest("generator", "2")["lineage"]["run_id"] == record["run_id"]


def test_reference_policy_per_stage(env, tmp_path):
    settings, registry, _ = env
    for stage in ("R", "U"):
        registry.publish("generator", save_generator(servable_generator(1), tmp_path / stage), lineage={"stage": stage})
    cycle = FinetuneCycle(settings.model_copy(update={"finetune_stage": "RU"}))
    assert cycle.reference_version("3") == "2"  # RU: KL against the R policy
    assert FinetuneCycle(settings.model_copy(update={"finetune_stage": "U"})).reference_version("3") == "1"  # the base
    assert FinetuneCycle(settings.model_copy(update={"finetune_reference_version": "3"})).reference_version("3") == "3"


def test_ru_without_an_r_policy_is_a_clear_error(env):
    settings, _, _ = env
    with pytest.raises(RuntimeError, match="run stage R first"):
        FinetuneCycle(settings.model_copy(update={"finetune_stage": "RU"})).reference_version("1")


def _write_buffer_pairs(object_store, bucket: str, n: int = 32, policy: str = "1") -> None:
    """Pairs sampled by the policy, voted by a fake listener who likes even tokens, written as the consumer writes
    them."""
    import torch

    from musicrl.buffer import rows_to_parquet, segment_key
    from musicrl.text import HashingTextEncoder

    model = servable_generator(0)
    prompts = [f"prompt {i % 6}" for i in range(n)]
    cond = torch.from_numpy(HashingTextEncoder().embed(prompts))
    a, la = model.sample(cond, 12, 0.99, 0, seeds=list(range(n)))
    b, lb = model.sample(cond, 12, 0.99, 0, seeds=list(range(1000, 1000 + n)))
    rows = []
    for i in range(n):
        choice = "a" if (a[i] % 2 == 0).sum() >= (b[i] % 2 == 0).sum() else "b"
        rows.append(
            {
                "event_id": f"event{i:04d}",
                "generation_id": uuid.uuid4().hex,
                "clip_a_id": uuid.uuid4().hex,
                "clip_b_id": uuid.uuid4().hex,
                "choice": choice,
                "is_tie": False,
                "listen_a_s": 1.5,
                "listen_b_s": 1.5,
                "listen_a_frac": 1.0,
                "listen_b_frac": 1.0,
                "prompt": prompts[i],
                "temperature": 0.99,
                "top_k": 0,
                "policy_version": policy,
                "mixed_policy": False,
                "policy_version_a": policy,
                "policy_version_b": policy,
                "tokens_a": a[i].tolist(),
                "tokens_b": b[i].tolist(),
                "logprobs_a": la[i].tolist(),
                "logprobs_b": lb[i].tolist(),
                "kafka_partition": 0,
                "kafka_offset": i,
            }
        )
    object_store.put_bytes(bucket, segment_key(policy, 0, 0, n - 1), rows_to_parquet(rows))


def test_dpo_cycle_trains_on_the_buffer_pairs(stack, env, object_store):
    settings, registry, _ = env
    _write_buffer_pairs(object_store, settings.bucket_buffer)
    dpo = settings.model_copy(
        update={
            "finetune_trainer": "dpo",
            "finetune_stage": "R",
            "finetune_dpo_beta": 0.5,
            "finetune_policy_lr": 1e-2,
            "finetune_auto_deploy": False,
        }
    )
    record = run_cycle_with_lease(FinetuneCycle(dpo))
    assert record["trainer"] == "dpo" and record["n_preferences"] == 32
    assert record["train_history_last"]["rewards/accuracy"] > 0.5 and record["train_history_last"]["kl"] > 0
    assert record["status"] == "published", record.get("reason")
    assert registry.manifest("generator", "2")["lineage"]["trainer"] == "dpo" and registry.current("generator") == "1"


def test_loop_triggers_on_new_preferences_once_per_batch_of_data(env, object_store):
    settings, registry, _ = env
    looped = settings.model_copy(
        update={
            "finetune_trigger_min_preferences": 30,
            "finetune_poll_interval_s": 0.1,
            "finetune_auto_deploy": False,
            "finetune_steps": 2,
        }
    )
    cycle = FinetuneCycle(looped)
    trigger = Trigger(cycle)
    assert trigger.due()[0] is False  # empty buffer
    _write_buffer_pairs(object_store, settings.bucket_buffer, n=32)
    due, why, count = trigger.due()
    assert due and count == 32 and "32 new preferences on policy 1" in why
    [record] = loop(cycle, max_cycles=1)
    assert (
        record["status"] in ("published", "rejected") and record["n_preferences"] == 32
    )  # 2 steps: the gate may say no
    assert trigger.due()[0] is False  # the same data does not start another cycle, whatever the gate said
    assert Trigger(FinetuneCycle(looped.model_copy(update={"finetune_trigger_interval_s": 0.01}))).due()[0]


def test_a_worker_that_lost_its_lease_publishes_nothing_and_the_run_resumes(env):
    from finetune_worker.lease import LeaseLost

    settings, registry, _ = env
    quick = settings.model_copy(
        update={"finetune_steps": 2, "finetune_gate_min_reward_gain": -1.0, "finetune_auto_deploy": False}
    )
    cycle = FinetuneCycle(quick)

    def lost() -> None:
        raise LeaseLost("taken by another worker")

    cycle.guard = lost
    with pytest.raises(LeaseLost):
        cycle.run_once()
    stopped = cycle.load_state()
    assert registry.versions("generator") == ["1"] and stopped.status == "trained"
    record = run_cycle_with_lease(FinetuneCycle(quick))  # resumes the same run at the gate
    assert record["run_id"] == stopped.run_id and record["status"] == "published"
    assert registry.versions("generator") == ["1", "2"]


def test_a_preference_cycle_without_a_vote_trained_reward_model_is_skipped(env, tmp_path):
    """Stage U optimises the users' preference model; until one trained on votes has passed its held-out check
    (here: an empty buffer, and only the committed bootstrap model), the cycle trains nothing."""
    from musicrl.models.preference import PreferenceRewardModel, save_preference_model

    settings, registry, _ = env
    bootstrap = save_preference_model(
        PreferenceRewardModel.from_generator(servable_generator(0)), tmp_path / "pref", export_onnx=False
    )
    registry.set_current(
        "reward/preference",
        registry.publish("reward/preference", bootstrap, lineage={"source": "checkpoints/preference"}),
    )
    cycle = FinetuneCycle(settings.model_copy(update={"finetune_stage": "U"}))
    record = run_cycle_with_lease(cycle)
    assert record["status"] == "skipped" and "trained on users' votes" in record["reason"]
    assert registry.versions("generator") == ["1"] and not (Path(record["archive"]) / "candidate").exists()
    voted = registry.publish("reward/preference", bootstrap, lineage={"run_id": "abc", "buffer_segments": ["s"]})
    registry.set_current("reward/preference", voted)
    assert cycle.vote_trained_preference() == voted
