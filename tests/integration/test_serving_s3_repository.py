"""Triton serves the generator from an object-store model repository (issue 9).

A second tritonserver (built by ``musicrl.stack.servers.triton_process``) reads
``s3://http://<stack S3>/<bucket>/models``; ``install_version`` uploads versions
there, ``load_model`` swaps the served one.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from finetune_helpers import servable_generator

from finetune_worker.deploy import Deployer
from musicrl.models.generator import Generator, GeneratorConfig, save_generator
from musicrl.registry import Registry
from musicrl.stack.processes import RunDir, Supervisor, free_port
from musicrl.stack.servers import triton_process
from serving.model_repository import (
    BatchingConfig,
    init_repository,
    install_version,
    installed_versions,
    load,
    s3_repository,
)

pytestmark = pytest.mark.integration

MODEL = "generator_s3"


@pytest.fixture
def s3_repo(object_store) -> str:
    bucket = f"triton-{uuid.uuid4().hex[:8]}"
    object_store.client.make_bucket(bucket)
    init_repository(f"s3://{bucket}/models", store=object_store)  # Triton will not start on an empty prefix
    yield f"s3://{bucket}/models"
    for key in list(object_store.list_keys(bucket)):
        object_store.delete(bucket, key)
    object_store.client.remove_bucket(bucket)


def _private_triton(stack, s3_repo, tmp_path, extra_args: tuple[str, ...] = ()):
    """A tritonserver of its own on free ports, model repository in the object store."""
    settings = stack.settings.model_copy(
        update={
            "stack_data_dir": tmp_path / "triton-s3",
            "stack_triton_http_port": free_port(stack.host),
            "stack_triton_grpc_port": free_port(stack.host),
            "stack_triton_metrics_port": free_port(stack.host),
        }
    )
    repository = s3_repository(s3_repo).triton_url(stack.s3_endpoint)
    assert repository.startswith("s3://http://")
    spec = triton_process(settings, repository=repository, extra_args=extra_args)
    supervisor = Supervisor(RunDir(settings.data_dir), tied_to_parent=True)
    supervisor.start(spec, timeout_s=60)
    try:
        yield f"{stack.host}:{settings.stack_triton_http_port}"
    finally:
        supervisor.stop(spec.name, timeout_s=20)  # the process group


@pytest.fixture
def s3_triton(stack, s3_repo, tmp_path):
    yield from _private_triton(stack, s3_repo, tmp_path)


ADMIN_KEY = "test-admin-key"


@pytest.fixture
def s3_triton_restricted(stack, s3_repo, tmp_path):
    """As the Kubernetes manifests run Triton: model control (HTTP and gRPC) only with the admin key."""
    restricted = f"model-repository,model-config:triton-admin-key={ADMIN_KEY}"
    yield from _private_triton(
        stack, s3_repo, tmp_path, (f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}")
    )


def _checkpoint(directory, seed: int) -> str:
    torch.manual_seed(seed)
    config = GeneratorConfig(n_layers=1, n_heads=2, d_model=32, max_frames=16)
    return str(save_generator(Generator(config), directory, {"note": f"random init {seed}, tests"}))


def _infer(url: str) -> tuple[np.ndarray, str]:
    arrays = {
        "PROMPT_EMBEDDING": (np.full((1, 384), 0.05, dtype=np.float32), "FP32"),
        "SEED": (np.array([[3]], dtype=np.int64), "INT64"),
        "N_FRAMES": (np.array([[4]], dtype=np.int32), "INT32"),
        "TEMPERATURE": (np.array([[1.0]], dtype=np.float32), "FP32"),
        "TOP_K": (np.array([[0]], dtype=np.int32), "INT32"),
    }
    inputs = []
    for name, (array, datatype) in arrays.items():
        inputs.append(httpclient.InferInput(name, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array)
    client = httpclient.InferenceServerClient(url, network_timeout=60)
    try:
        result = client.infer(MODEL, inputs)
    finally:
        client.close()
    version = result.as_numpy("POLICY_VERSION")[0, 0]
    return result.as_numpy("TOKENS"), version.decode() if isinstance(version, bytes) else str(version)


def test_triton_serves_and_swaps_versions_from_the_object_store(s3_triton, s3_repo, object_store, tmp_path):
    bucket = s3_repository(s3_repo).bucket
    installed = install_version(
        s3_repo,
        1,
        _checkpoint(tmp_path / "v1", 1),
        MODEL,
        BatchingConfig(max_batch_size=4, preferred_batch_sizes=[4], instance_count=1),
        store=object_store,
    )
    assert installed == f"{s3_repo}/{MODEL}/1"
    keys = set(object_store.list_keys(bucket, "models/"))
    assert {
        f"models/{MODEL}/config.pbtxt",
        f"models/{MODEL}/1/model.py",
        f"models/{MODEL}/1/weights.pt",
        f"models/{MODEL}/1/config.json",
    } <= keys
    assert installed_versions(s3_repo, MODEL, store=object_store) == [1]

    load(s3_triton, MODEL, timeout_s=60)
    tokens, version = _infer(s3_triton)
    assert tokens.shape == (1, 4) and version == "1"

    # Upload version 2 first, then load: Triton reads the object store only on load_model.
    install_version(s3_repo, 2, _checkpoint(tmp_path / "v2", 2), MODEL, store=object_store)
    assert installed_versions(s3_repo, MODEL, store=object_store) == [1, 2]
    load(s3_triton, MODEL, timeout_s=60)
    client = httpclient.InferenceServerClient(s3_triton)
    try:
        assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
    finally:
        client.close()
    tokens, version = _infer(s3_triton)
    assert tokens.shape == (1, 4) and version == "2"


def test_deployer_deploys_and_rolls_back_in_an_object_store_repository(s3_triton, s3_repo, object_store, tmp_path):
    registry_bucket = f"test-deploy-{uuid.uuid4().hex[:10]}"
    object_store.client.make_bucket(registry_bucket)
    registry = Registry(object_store, bucket=registry_bucket)
    deployer = Deployer(registry, s3_repo, s3_triton, tmp_path / "work", model_name=MODEL, timeout_s=60)
    first, second = (
        registry.publish(
            "generator",
            save_generator(servable_generator(seed), tmp_path / f"gen-{seed}"),
            metrics={},
            lineage={"seed": seed},
        )
        for seed in (0, 1)
    )
    deployer.deploy(first)
    deployer.deploy(second)
    assert _infer(s3_triton)[1] == second and installed_versions(s3_repo, MODEL, store=object_store) == [
        int(first),
        int(second),
    ]
    result = deployer.rollback(first)
    assert result["retired"] and _infer(s3_triton)[1] == first and registry.current("generator") == first
    # The newer version left the object store (kept under the work dir), so `latest 1` serves the rollback.
    assert installed_versions(s3_repo, MODEL, store=object_store) == [int(first)]
    for key in list(object_store.list_keys(registry_bucket)):
        object_store.delete(registry_bucket, key)
    object_store.client.remove_bucket(registry_bucket)


def test_model_control_needs_the_admin_key_and_versions_land_whole(
    s3_triton_restricted, s3_repo, object_store, tmp_path
):
    """Triton as the manifests run it: load without `triton-admin-key` is refused (the old version keeps serving),
    with it the deploy goes through; every version in the prefix carries its completion marker."""
    from finetune_worker.deploy import DeployError
    from serving.model_repository import COMPLETE_MARKER, version_complete

    registry_bucket = f"test-deploy-{uuid.uuid4().hex[:10]}"
    object_store.client.make_bucket(registry_bucket)
    registry = Registry(object_store, bucket=registry_bucket)
    first, second = (
        registry.publish("generator", save_generator(servable_generator(seed), tmp_path / f"gen-{seed}"))
        for seed in (0, 1)
    )
    admin = Deployer(
        registry, s3_repo, s3_triton_restricted, tmp_path / "work", model_name=MODEL, timeout_s=60, admin_key=ADMIN_KEY
    )
    admin.deploy(first)
    assert _infer(s3_triton_restricted)[1] == first
    stranger = Deployer(registry, s3_repo, s3_triton_restricted, tmp_path / "work", model_name=MODEL, timeout_s=20)
    with pytest.raises(DeployError):
        stranger.deploy(second)
    assert _infer(s3_triton_restricted)[1] == first and registry.current("generator") == first
    assert installed_versions(s3_repo, MODEL, store=object_store) == [int(first)]
    admin.deploy(second)
    assert _infer(s3_triton_restricted)[1] == second and registry.current("generator") == second
    bucket, prefix = s3_repository(s3_repo).bucket, s3_repository(s3_repo).prefix
    assert version_complete(s3_repo, second, MODEL, store=object_store)
    assert object_store.exists(bucket, f"{prefix}/{MODEL}/{second}/{COMPLETE_MARKER}")
    assert not [k for k in object_store.list_keys(bucket, f"{prefix}/{MODEL}/") if ".staging" in k]
    for key in list(object_store.list_keys(registry_bucket)):
        object_store.delete(registry_bucket, key)
    object_store.client.remove_bucket(registry_bucket)
