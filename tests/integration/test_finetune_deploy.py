"""Deploy and rollback against the real Triton and object store of the test stack; a deploy signalled or
killed half-way (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from finetune_helpers import servable_generator

from finetune_worker.deploy import CheckpointRejected, Deployer
from musicrl.models.generator import Generator, GeneratorConfig, save_generator
from musicrl.registry import Registry
from serving.model_repository import installed_versions

pytestmark = pytest.mark.integration


@pytest.fixture()
def deployer(stack, object_store, tmp_path):
    """A registry bucket and a Triton model name of this test's own (the stack is shared)."""
    bucket = f"test-deploy-{uuid.uuid4().hex[:10]}"
    object_store.client.make_bucket(bucket)
    registry = Registry(object_store, bucket=bucket)
    name = f"ft_gen_{uuid.uuid4().hex[:8]}"
    deployer = Deployer(
        registry, stack.triton_repo, stack.triton_http_url, tmp_path / "work", model_name=name, timeout_s=120
    )
    yield deployer
    client = httpclient.InferenceServerClient(stack.triton_http_url)
    try:
        client.unload_model(name)
    finally:
        client.close()


def _publish(registry: Registry, tmp_path, seed: int, model: Generator | None = None) -> str:
    path = save_generator(model or servable_generator(seed), tmp_path / f"gen-{uuid.uuid4().hex[:6]}")
    return registry.publish("generator", path, metrics={}, lineage={"seed": seed})


def _served_version(stack, name: str) -> str:
    client = httpclient.InferenceServerClient(stack.triton_http_url)
    inputs = []
    for input_name, dtype, value in (
        ("PROMPT_EMBEDDING", "FP32", np.full((1, 384), 1 / np.sqrt(384), dtype=np.float32)),
        ("SEED", "INT64", np.array([[1]], dtype=np.int64)),
        ("N_FRAMES", "INT32", np.array([[8]], dtype=np.int32)),
        ("TEMPERATURE", "FP32", np.array([[0.99]], dtype=np.float32)),
        ("TOP_K", "INT32", np.array([[0]], dtype=np.int32)),
    ):
        tensor = httpclient.InferInput(input_name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    try:
        result = client.infer(name, inputs)
    finally:
        client.close()
    raw = result.as_numpy("POLICY_VERSION").reshape(-1)[0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def test_deploy_then_rollback_moves_triton_and_the_pointer(stack, deployer, tmp_path):
    registry = deployer.registry
    first, second = _publish(registry, tmp_path, 0), _publish(registry, tmp_path, 1)
    deployer.deploy(first)
    assert _served_version(stack, deployer.model_name) == first
    result = deployer.deploy(second)
    assert result["previous"] == first
    assert _served_version(stack, deployer.model_name) == second and registry.current("generator") == second

    back = deployer.rollback(first)
    assert back["retired"] and _served_version(stack, deployer.model_name) == first
    assert registry.current("generator") == first and registry.pointer("generator")["previous"] == second


def _damaged_version(registry: Registry, object_store, tmp_path, damage: str) -> str:
    if damage == "incompatible_text_dim":
        return _publish(
            registry,
            tmp_path,
            2,
            Generator(GeneratorConfig(text_dim=8, max_frames=16, n_layers=1, n_heads=2, d_model=32)),
        )
    if damage == "nan_weights":
        model = servable_generator(3)
        with torch.no_grad():
            model.lm_head.weight[0, 0] = float("nan")
        return _publish(registry, tmp_path, 3, model)
    path = save_generator(servable_generator(4), tmp_path / f"broken-{damage}")
    if damage == "garbage_weights":
        (path / "weights.pt").write_bytes(b"not a torch file")  # the manifest hash matches: loading must catch it
    version = registry.publish("generator", path)
    if damage == "tampered_after_publish":
        object_store.put_bytes(registry.bucket, f"generator/{version}/config.json", json.dumps({"d_model": 7}).encode())
    return version


def test_bad_checkpoints_are_rejected_and_the_old_version_keeps_serving(stack, deployer, object_store, tmp_path):
    registry = deployer.registry
    good = _publish(registry, tmp_path, 0)
    deployer.deploy(good)
    for damage in ("garbage_weights", "tampered_after_publish", "incompatible_text_dim", "nan_weights"):
        bad = _damaged_version(registry, object_store, tmp_path, damage)
        with pytest.raises(CheckpointRejected):
            deployer.deploy(bad)
        assert registry.current("generator") == good, damage
        assert not (stack.triton_repo / deployer.model_name / bad).exists(), damage
    assert _served_version(stack, deployer.model_name) == good


HELPER = Path(__file__).with_name("deploy_in_subprocess.py")
REPO = Path(__file__).resolve().parents[2]


def _deploy_in_subprocess(stack, deployer: Deployer, version: str, marker: Path, pause_s: float) -> subprocess.Popen:
    """`musicrl finetune rollback VERSION` in a process of its own, on this test's registry, model and work dir."""
    env = {
        **os.environ,
        **stack.env(),
        "MUSICRL_BUCKET_MODELS": deployer.registry.bucket,
        "MUSICRL_TRITON_MODEL_NAME": deployer.model_name,
        "MUSICRL_TRITON_HTTP_URL": stack.triton_http_url,
        "MUSICRL_FINETUNE_TRITON_REPO": str(stack.triton_repo),
        "MUSICRL_FINETUNE_WORK_DIR": str(deployer.work_dir),
        "MUSICRL_FINETUNE_DEPLOY_TIMEOUT_S": "120",
        "MUSICRL_ENV": "development",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(HELPER), version, str(marker), str(pause_s)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(marker: Path, process: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the deploy exited before installing ({process.returncode}): {process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the deploy did not reach the install in time")
        time.sleep(0.1)


def test_sigterm_during_a_deploy_lets_it_finish_and_triton_serves_the_old_version_until_the_load(
    stack, deployer, tmp_path
):
    registry = deployer.registry
    first, second = _publish(registry, tmp_path, 0), _publish(registry, tmp_path, 1)
    deployer.deploy(first)
    marker = tmp_path / "installing"
    process = _deploy_in_subprocess(stack, deployer, second, marker, pause_s=4.0)
    _wait_for(marker, process)
    process.send_signal(signal.SIGTERM)
    # Half of version 2 is written, under its staging name: Triton serves version 1, the pointer has not moved.
    assert _served_version(stack, deployer.model_name) == first and registry.current("generator") == first
    assert installed_versions(stack.triton_repo, deployer.model_name) == [int(first)]
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]  # the deploy was not cut short by the signal
    assert f"serving generator {second}" in output
    assert _served_version(stack, deployer.model_name) == second and registry.current("generator") == second
    assert deployer.read_journal() is None


def test_a_deploy_killed_half_way_leaves_the_old_version_serving_and_the_next_start_cleans_up(
    stack, deployer, tmp_path
):
    registry = deployer.registry
    first, second = _publish(registry, tmp_path, 0), _publish(registry, tmp_path, 1)
    deployer.deploy(first)
    marker = tmp_path / "installing"
    process = _deploy_in_subprocess(stack, deployer, second, marker, pause_s=120.0)
    _wait_for(marker, process)
    process.kill()  # SIGKILL: what is left after a grace period runs out
    process.wait(timeout=30)
    model_dir = stack.triton_repo / deployer.model_name
    assert (model_dir / f".{second}.staging").is_dir() and deployer.read_journal()["version"] == second
    assert installed_versions(stack.triton_repo, deployer.model_name) == [int(first)]
    assert _served_version(stack, deployer.model_name) == first and registry.current("generator") == first

    # The next start: the half-done deploy is undone; Triton still serves version 1, which the registry names.
    restarted = Deployer(
        registry,
        stack.triton_repo,
        stack.triton_http_url,
        deployer.work_dir,
        model_name=deployer.model_name,
        timeout_s=120,
    )
    result = restarted.recover()
    assert result["action"] == "undone" and result["staging"] == [f".{second}.staging"]
    assert not (model_dir / f".{second}.staging").exists() and restarted.read_journal() is None
    assert installed_versions(stack.triton_repo, deployer.model_name) == [int(first)]
    assert _served_version(stack, deployer.model_name) == first and registry.current("generator") == first
    # and the deploy, run again, completes.
    restarted.deploy(second)
    assert _served_version(stack, deployer.model_name) == second and registry.current("generator") == second
