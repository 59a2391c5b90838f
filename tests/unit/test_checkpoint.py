"""musicrl.checkpoint: atomic writes (the old file or the new one, never half), locked JSON merges, training state."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from musicrl.checkpoint import load_torch, merge_json, save_torch_atomic, write_atomic, write_json_atomic

pytestmark = pytest.mark.unit


def test_merge_keeps_other_components_keys(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"quality": {"spearman": 0.9}, "generator": {"old": True}}))
    merge_json(path, {"generator": {"parameters": 3}, "attribute_recovery": {}})
    assert json.loads(path.read_text()) == {
        "quality": {"spearman": 0.9},
        "generator": {"parameters": 3},
        "attribute_recovery": {},
    }


def _merge_many(path: str, worker: int) -> None:
    for i in range(20):
        merge_json(path, {f"w{worker}-{i}": i})


def test_concurrent_merges_lose_no_key(tmp_path):
    path = tmp_path / "results.json"
    processes = [multiprocessing.get_context("fork").Process(target=_merge_many, args=(str(path), w)) for w in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert len(json.loads(path.read_text())) == 60


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "run.json", {"status": "trained"})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("musicrl.checkpoint.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "{}")
    assert json.loads(path.read_text()) == {"status": "trained"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # the temporary file is removed too
    monkeypatch.undo()
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_training_state_round_trips(tmp_path):
    state = {"step": 7, "rng": torch.get_rng_state(), "history": [{"loss": 1.0}]}
    path = save_torch_atomic(state, tmp_path / "state" / "trainer_state.pt")
    loaded = load_torch(path)
    assert loaded["step"] == 7 and torch.equal(loaded["rng"], state["rng"]) and loaded["history"] == [{"loss": 1.0}]
