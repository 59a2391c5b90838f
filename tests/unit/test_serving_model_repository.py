"""Rendering the Triton config of the generator and installing versions into a model repository."""

from __future__ import annotations

import json

import pytest

from musicrl.registry import verify_dir
from serving.model_repository import SHIM_SOURCE, BatchingConfig, install_version, installed_versions, render_config
from serving.settings import GatewaySettings

pytestmark = pytest.mark.unit


@pytest.fixture()
def checkpoint(tmp_path):
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"text_dim": 384, "max_frames": 64}))
    (directory / "weights.pt").write_bytes(b"weights")
    (directory / "meta.json").write_text("{}")
    return directory


def test_config_is_rendered_from_the_settings():
    settings = GatewaySettings(
        gateway_triton_max_batch_size=8,
        gateway_triton_preferred_batch_sizes=[2, 4, 16],
        gateway_triton_max_queue_delay_us=5000,
        gateway_triton_instances=3,
    )
    text = render_config("generator", BatchingConfig.from_settings(settings))
    assert 'name: "generator"' in text and "max_batch_size: 8" in text
    assert "preferred_batch_size: [ 2, 4 ]" in text  # sizes above the maximum are dropped
    assert "max_queue_delay_microseconds: 5000" in text
    assert "count: 3, kind: KIND_CPU" in text
    assert "version_policy: { latest: { num_versions: 1 } }" in text
    for name in (
        "PROMPT_EMBEDDING",
        "SEED",
        "N_FRAMES",
        "TEMPERATURE",
        "TOP_K",
        "TOKENS",
        "LOGPROBS",
        "AUDIO",
        "SAMPLE_RATE",
        "POLICY_VERSION",
    ):
        assert f'name: "{name}"' in text
    assert "dims: [ 384 ]" in text


def test_one_instance_per_core_by_default(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert GatewaySettings().triton_instance_count() == 6
    assert GatewaySettings(gateway_triton_instances=1).triton_instance_count() == 1


def test_install_version_copies_backend_and_checkpoint(tmp_path, checkpoint):
    repo = tmp_path / "repo"
    target = install_version(repo, 1, checkpoint)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "manifest.json",
        "meta.json",
        "model.py",
        "weights.pt",
    ]
    # model.py is the shim that imports the installed package's backend: no code of its own in the repository
    assert (target / "model.py").read_text() == SHIM_SOURCE and "class TritonPythonModel" not in SHIM_SOURCE
    assert verify_dir(target)["files"].keys() == {"config.json", "meta.json", "weights.pt"}  # a manifest of its own
    config = (repo / "generator" / "config.pbtxt").read_text()
    assert 'name: "generator"' in config

    # A deployer adding a version keeps the operator's batching; an explicit one replaces it.
    (repo / "generator" / "config.pbtxt").write_text(config.replace("max_batch_size: 16", "max_batch_size: 4"))
    install_version(repo, "2", checkpoint)
    assert "max_batch_size: 4" in (repo / "generator" / "config.pbtxt").read_text()
    install_version(repo, 3, checkpoint, batching=BatchingConfig(max_batch_size=32))
    assert "max_batch_size: 32" in (repo / "generator" / "config.pbtxt").read_text()
    assert installed_versions(repo) == [1, 2, 3]
    assert not any(p.name.startswith(".") for p in (repo / "generator").iterdir())


def test_install_under_another_model_name(tmp_path, checkpoint):
    install_version(tmp_path, 4, checkpoint, model_name="generator_challenger")
    assert 'name: "generator_challenger"' in (tmp_path / "generator_challenger" / "config.pbtxt").read_text()
    assert installed_versions(tmp_path, "generator_challenger") == [4]
    assert installed_versions(tmp_path, "missing") == []


@pytest.mark.parametrize("version", ["0", "-1", "v2", "1.5"])
def test_versions_are_positive_integers(tmp_path, checkpoint, version):
    with pytest.raises(ValueError, match="positive integer"):
        install_version(tmp_path, version, checkpoint)


def test_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a generator checkpoint"):
        install_version(tmp_path / "repo", 1, tmp_path)


def test_one_rule_chooses_an_object_store_repository():
    from pathlib import Path

    from serving.model_repository import S3Repository, s3_repository

    assert s3_repository("s3://musicrl-models/triton") == S3Repository("musicrl-models", "triton")
    assert s3_repository("s3://bucket") == S3Repository("bucket", "")
    assert s3_repository("s3://bucket/a/b/").key("generator", "2") == "a/b/generator/2"
    assert (
        S3Repository("musicrl-models", "triton").triton_url("minio:9000")
        == "s3://http://minio:9000/musicrl-models/triton"
    )
    assert s3_repository("/models") is None and s3_repository(Path("s3://x")) is None
    with pytest.raises(ValueError):
        s3_repository("s3://http://minio:9000/bucket")  # that is Triton's form, not the writer's
