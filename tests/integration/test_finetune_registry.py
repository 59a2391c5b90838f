"""Model registry against the real object store (SeaweedFS started by the test session)."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from musicrl.registry import IntegrityError, Registry, RegistryError, verify_dir
from musicrl.storage import ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture()
def registry(object_store: ObjectStore) -> Registry:
    """A registry on a bucket of its own, so tests never see each other's versions."""
    bucket = f"test-registry-{uuid.uuid4().hex[:12]}"
    object_store.client.make_bucket(bucket)
    return Registry(object_store, bucket=bucket)


def _model_dir(tmp_path, name: str, payload: bytes):
    model = tmp_path / name
    (model / "sub").mkdir(parents=True)
    (model / "weights.pt").write_bytes(payload)
    (model / "config.json").write_text(json.dumps({"d_model": 8}))
    (model / "sub" / "extra.bin").write_bytes(b"\x00\x01" * 100)
    return model


def test_publish_download_roundtrip_with_manifest(registry, tmp_path):
    model = _model_dir(tmp_path, "m", b"weights-1")
    version = registry.publish("generator", model, metrics={"reward": 0.5}, lineage={"parent": None})
    assert version == "1"
    assert registry.versions("generator") == ["1"]
    manifest = registry.manifest("generator", "1")
    assert set(manifest["files"]) == {"weights.pt", "config.json", "sub/extra.bin"}
    assert manifest["metrics"] == {"reward": 0.5} and manifest["kind"] == "generator"

    out = registry.download("generator", "1", tmp_path / "dl")
    assert (out / "weights.pt").read_bytes() == b"weights-1"
    assert (out / "sub" / "extra.bin").read_bytes() == b"\x00\x01" * 100
    assert verify_dir(out)["version"] == "1"


def test_versions_increase_and_pointer_moves_atomically(registry, tmp_path):
    assert registry.current("reward/preference") is None
    first = registry.publish("reward/preference", _model_dir(tmp_path, "a", b"a"))
    second = registry.publish("reward/preference", _model_dir(tmp_path, "b", b"b"))
    assert (first, second) == ("1", "2")
    registry.set_current("reward/preference", second)
    registry.set_current("reward/preference", first)
    pointer = registry.pointer("reward/preference")
    assert pointer["version"] == "1" and pointer["previous"] == "2"
    assert [row["is_current"] for row in registry.history("reward/preference")] == [True, False]
    # kinds are independent
    assert registry.versions("reward/quality") == []


def test_pointer_refuses_unpublished_version(registry, tmp_path):
    with pytest.raises(RegistryError):
        registry.set_current("generator", "7")
    with pytest.raises(RegistryError):
        registry.set_current("generator", "../x")
    assert registry.current("generator") is None


def test_tampered_file_fails_download_and_leaves_no_directory(registry, object_store, tmp_path):
    version = registry.publish("generator", _model_dir(tmp_path, "m", b"good"))
    object_store.put_bytes(registry.bucket, f"generator/{version}/weights.pt", b"evil")
    dest = tmp_path / "dl"
    with pytest.raises(IntegrityError, match="weights.pt"):
        registry.download("generator", version, dest)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dl")] == []


def test_local_tamper_is_detected(registry, tmp_path):
    version = registry.publish("generator", _model_dir(tmp_path, "m", b"good"))
    out = registry.download("generator", version, tmp_path / "dl")
    (out / "config.json").write_text("{}")
    with pytest.raises(IntegrityError):
        verify_dir(out)


def test_half_published_version_is_invisible_and_skipped(registry, object_store, tmp_path):
    # a publisher that died after claiming version 1 and uploading one file
    object_store.put_bytes(registry.bucket, "generator/1/.reservation", b"{}")
    object_store.put_bytes(registry.bucket, "generator/1/weights.pt", b"partial")
    assert registry.versions("generator") == []
    with pytest.raises(RegistryError):
        registry.download("generator", "1", tmp_path / "dl")
    assert registry.publish("generator", _model_dir(tmp_path, "m", b"x")) == "2"


def test_concurrent_publishers_get_distinct_versions(registry, tmp_path):
    results: list[str] = []
    dirs = [_model_dir(tmp_path, f"m{i}", bytes([i])) for i in range(4)]

    def publish(path):
        results.append(registry.publish("generator", path))

    threads = [threading.Thread(target=publish, args=(d,)) for d in dirs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=int) == ["1", "2", "3", "4"]
    assert registry.versions("generator") == ["1", "2", "3", "4"]


def test_pinned_version_must_be_free_and_bad_input_is_rejected(registry, tmp_path):
    assert registry.publish("generator", _model_dir(tmp_path, "m", b"x"), version="5") == "5"
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish("generator", _model_dir(tmp_path, "n", b"y"), version="5")
    with pytest.raises(RegistryError):
        registry.publish("generator", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no files"):
        registry.publish("generator", tmp_path / "empty")
    assert registry.publish("generator", _model_dir(tmp_path, "o", b"z")) == "6"


def test_rejections_are_recorded_apart_from_versions(registry, tmp_path):
    registry.record_rejection("generator", {"reason": "kl 0.9 > bound 0.5", "metrics": {"kl": 0.9}})
    assert registry.versions("generator") == []
    [rejection] = registry.rejections("generator")
    assert rejection["reason"].startswith("kl")
