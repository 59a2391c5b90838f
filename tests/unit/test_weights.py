"""Pretrained weights from a local directory or an s3:// prefix (in-memory object store)."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from feedback_helpers import InMemoryStore

from musicrl.registry import IntegrityError
from musicrl.weights import directory_digest, fetch_weights, parse_s3_url

pytestmark = pytest.mark.unit
FILES = {
    "config.json": b'{"model_type": "clap"}',
    "model.safetensors": b"\x00weights" * 1000,
    "sub/tokenizer.json": b"{}",
}


class CountingStore(InMemoryStore):
    def __init__(self):
        super().__init__()
        self.streamed: list[str] = []

    def iter_bytes(self, bucket, key, chunk_size=8 * 1024 * 1024):
        self.streamed.append(key)
        yield from super().iter_bytes(bucket, key, chunk_size=1000)  # many chunks: the download really streams


def upload(store, prefix: str, manifest: bool) -> None:
    for name, data in FILES.items():
        store.put_bytes("weights", f"{prefix}/{name}", data)
    if manifest:  # what musicrl.registry writes next to a version's files
        files = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
        store.put_bytes("weights", f"{prefix}/manifest.json", json.dumps({"files": files}).encode())


def test_a_local_directory_is_used_in_place(tmp_path):
    assert fetch_weights(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="no weights directory"):
        fetch_weights(tmp_path / "missing")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b") and parse_s3_url("/models/clap") is None
    with pytest.raises(ValueError, match="ObjectStore is needed"):
        fetch_weights("s3://weights/clap")


def test_a_registry_prefix_is_verified_against_its_manifest_and_cached(tmp_path):
    store = CountingStore()
    upload(store, "reward/text_adherence/3", manifest=True)
    directory = fetch_weights("s3://weights/reward/text_adherence/3", store, tmp_path)
    assert {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} == set(FILES) | {
        "manifest.json"
    }
    assert (directory / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert len(store.streamed) == 3
    assert fetch_weights("s3://weights/reward/text_adherence/3", store, tmp_path) == directory
    assert len(store.streamed) == 3  # a cached copy that still verifies is reused

    (directory / "model.safetensors").write_bytes(b"damaged")  # a damaged cache is fetched again
    fetch_weights("s3://weights/reward/text_adherence/3", store, tmp_path)
    assert len(store.streamed) == 6 and (directory / "model.safetensors").read_bytes() == FILES["model.safetensors"]

    store.put_bytes("weights", "reward/text_adherence/3/model.safetensors", b"tampered in the store")
    with pytest.raises(IntegrityError, match="model.safetensors has sha256"):
        fetch_weights("s3://weights/reward/text_adherence/3", store, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "weights" / "reward" / "text_adherence" / "3").exists()  # never half a model


def test_a_prefix_without_manifest_is_downloaded_unverified_with_a_warning(tmp_path, caplog):
    store = CountingStore()
    upload(store, "laion/clap-htsat-unfused", manifest=False)
    with caplog.at_level(logging.WARNING, logger="musicrl.weights"):
        directory = fetch_weights("s3://weights/laion/clap-htsat-unfused", store, tmp_path)
    assert "downloading it unverified" in caplog.text
    assert (directory / "sub" / "tokenizer.json").read_bytes() == b"{}" and not (directory / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="nothing under"):
        fetch_weights("s3://weights/nothing/here", store, tmp_path)


def test_the_digest_names_the_content(tmp_path):
    for name, data in FILES.items():
        (tmp_path / "a" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / name).write_bytes(data)
    before = directory_digest(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text("{}")  # bookkeeping, not content
    (tmp_path / "a" / ".cache").write_text("x")
    assert directory_digest(tmp_path / "a") == before
    (tmp_path / "a" / "config.json").write_text("{}")
    assert directory_digest(tmp_path / "a") != before
