"""Crash-safe deploys (issue 16): a deploy killed half-way is undone (or finished) by the next start, and the
repository keeps serving the previous version meanwhile. Local and object-store repositories, fake Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from feedback_helpers import InMemoryStore

from finetune_worker import deploy as deploy_module
from finetune_worker.deploy import Deployer, DeployInFlight
from musicrl.registry import Registry
from serving import model_repository
from serving.model_repository import (
    COMPLETE_MARKER,
    SHIM_SOURCE,
    clean_staging,
    install_version,
    installed_versions,
    version_complete,
)

pytestmark = pytest.mark.unit


class Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` runs, nothing is cleaned up."""


class FakeTritonDeployer(Deployer):
    """A Deployer whose Triton is a list of load calls (the checkpoint check is skipped: fake weights)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loads: list[str | None] = []
        self.fail_load: BaseException | None = None

    def _load_and_wait(self, version):
        self.loads.append(version)
        if self.fail_load is not None:
            raise self.fail_load


@pytest.fixture(autouse=True)
def no_checkpoint_check(monkeypatch):
    monkeypatch.setattr(deploy_module, "verify_checkpoint", lambda directory, text_dim: {})


def _publish(registry: Registry, tmp_path, seed: int) -> str:
    directory = tmp_path / f"checkpoint-{seed}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"text_dim": 384, "seed": seed}))
    (directory / "weights.pt").write_bytes(os.urandom(64))
    (directory / "meta.json").write_text("{}")
    return registry.publish("generator", directory)


@pytest.fixture(params=["local", "s3"])
def setup(request, tmp_path):
    store = InMemoryStore()
    registry = Registry(store)
    repo = tmp_path / "repo" if request.param == "local" else "s3://musicrl-models/triton"

    def make() -> FakeTritonDeployer:  # a fresh process: the same repository, work dir and registry
        return FakeTritonDeployer(registry, repo, "127.0.0.1:1", tmp_path / "work", model_name="generator")

    return make, registry, store, repo, tmp_path


def _latest(repo, store) -> int:
    """The version Triton's `latest 1` policy serves after a (re)load or a restart."""
    return max(installed_versions(repo, store=store))


def test_a_deploy_killed_mid_install_is_undone_and_the_previous_version_still_serves(setup, monkeypatch):
    make, registry, store, repo, tmp_path = setup
    first, second = _publish(registry, tmp_path, 1), _publish(registry, tmp_path, 2)
    make().deploy(first)
    assert registry.current("generator") == first

    # The worker dies while the second version's files are being written.
    if isinstance(repo, str):
        real_copy = store.copy
        copies = []

        def dying_copy(bucket, source, target):
            copies.append(target)
            if len(copies) == 2:
                raise Killed
            real_copy(bucket, source, target)

        monkeypatch.setattr(store, "copy", dying_copy)
    else:
        real_copy2 = model_repository.shutil.copy2
        calls = []

        def dying_copy2(source, dest, **kwargs):
            calls.append(dest)
            if len(calls) == 2:
                raise Killed
            return real_copy2(source, dest, **kwargs)

        monkeypatch.setattr(model_repository.shutil, "copy2", dying_copy2)
    deployer = make()
    with pytest.raises(Killed):
        deployer.deploy(second)
    monkeypatch.undo()
    monkeypatch.setattr(deploy_module, "verify_checkpoint", lambda directory, text_dim: {})

    # What the kill left: a journal, a staging directory (or a version without its marker), the pointer unmoved.
    journal = deployer.read_journal()
    assert journal["version"] == second and journal["previous"] == first and journal["phase"] == "installing"
    assert registry.current("generator") == first
    assert not version_complete(repo, second, store=store)
    if isinstance(repo, str):
        assert installed_versions(repo, store=store) == [1, 2]  # a half-copied version directory, no marker
        assert not store.exists("musicrl-models", f"triton/generator/{second}/{COMPLETE_MARKER}")
    else:
        assert installed_versions(repo) == [1]  # Triton never sees the staging directory
        assert (repo / "generator" / f".{second}.staging").is_dir()

    # The next start undoes it: nothing of version 2 left, Triton's policy picks version 1, as the registry says.
    restarted = make()
    result = restarted.recover()
    assert result["action"] == "undone" and result["phase"] == "installing"
    assert restarted.read_journal() is None and restarted.loads == []  # Triton never saw version 2: no reload
    assert installed_versions(repo, store=store) == [1] and _latest(repo, store) == 1
    assert version_complete(repo, first, store=store) and clean_staging(repo, store=store) == []
    assert registry.current("generator") == first
    assert restarted.recover() is None  # idempotent

    # and the interrupted deploy runs again, whole.
    assert make().deploy(second)["previous"] == first
    assert installed_versions(repo, store=store) == [1, 2] and registry.current("generator") == second


def test_a_deploy_killed_while_triton_loads_is_undone_and_triton_reloaded(setup):
    make, registry, _store, repo, tmp_path = setup
    store = registry.store
    first, second = _publish(registry, tmp_path, 1), _publish(registry, tmp_path, 2)
    make().deploy(first)
    deployer = make()
    deployer.fail_load = Killed()
    with pytest.raises(Killed):
        deployer.deploy(second)
    assert version_complete(repo, second, store=store) and deployer.read_journal()["phase"] == "loading"

    restarted = make()
    assert restarted.recover()["action"] == "undone"
    assert restarted.loads == [first]  # Triton may have loaded version 2: told to load what the repository holds again
    assert installed_versions(repo, store=store) == [1] and registry.current("generator") == first


def test_a_deploy_killed_after_the_pointer_moved_is_finished(setup, monkeypatch):
    make, registry, _store, repo, tmp_path = setup
    store = registry.store
    first, second = _publish(registry, tmp_path, 1), _publish(registry, tmp_path, 2)
    make().deploy(first)
    real_set_current = registry.set_current

    def set_then_die(kind, version):
        real_set_current(kind, version)
        raise Killed

    monkeypatch.setattr(registry, "set_current", set_then_die)
    with pytest.raises(Killed):
        make().deploy(second)
    monkeypatch.setattr(registry, "set_current", real_set_current)
    restarted = make()
    assert restarted.recover()["action"] == "finished"
    assert restarted.read_journal() is None and restarted.loads == []
    assert installed_versions(repo, store=store) == [1, 2] and registry.current("generator") == second


def test_a_rollback_killed_after_retiring_puts_the_newer_version_back(setup, monkeypatch):
    make, registry, _store, repo, tmp_path = setup
    store = registry.store
    first, second = _publish(registry, tmp_path, 1), _publish(registry, tmp_path, 2)
    make().deploy(first)
    make().deploy(second)
    monkeypatch.setattr(deploy_module, "install_version", lambda *args, **kwargs: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        make().rollback(first)
    assert installed_versions(repo, store=store) == [1]  # version 2 was moved aside, version 1 not reinstalled yet
    monkeypatch.setattr(deploy_module, "install_version", install_version)

    restarted = make()
    result = restarted.recover()
    assert result["action"] == "undone" and result["phase"] == "installing"
    assert installed_versions(repo, store=store) == [1, 2] and _latest(repo, store) == 2
    assert registry.current("generator") == second
    assert make().rollback(first)["previous"] == second and installed_versions(repo, store=store) == [1]


def test_a_version_is_reinstalled_from_the_registry_when_the_served_one_was_cut(setup, monkeypatch):
    """Redeploying the served version (a reinstall) and dying in the middle: the next start reinstalls it."""
    make, registry, _store, repo, tmp_path = setup
    store = registry.store
    first = _publish(registry, tmp_path, 1)
    make().deploy(first)
    deployer = make()
    deployer.fail_load = Killed()
    with pytest.raises(Killed):
        deployer.deploy(first)
    model_repository.remove_version(repo, first, store=store)  # as if cut in the middle of replacing it
    restarted = make()
    result = restarted.recover()
    assert result["action"] == "undone" and result["reinstalled_previous"]
    assert version_complete(repo, first, store=store) and restarted.loads == [first]


def test_a_live_deploy_is_left_alone(setup):
    make, registry, _store, _repo, tmp_path = setup
    first = _publish(registry, tmp_path, 1)
    deployer = make()
    deployer.deploy(first)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import socket

        deployer._write_journal(
            {
                "version": "2",
                "previous": first,
                "retired": [],
                "phase": "installing",
                "pid": sleeper.pid,
                "host": socket.gethostname(),
            }
        )
        with pytest.raises(DeployInFlight, match=str(sleeper.pid)):
            make().recover()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert make().recover()["action"] == "undone"  # its process is gone: the journal is recovered


def test_staging_leftovers_without_a_journal_are_removed(setup):
    make, registry, store, repo, tmp_path = setup
    first = _publish(registry, tmp_path, 1)
    make().deploy(first)
    if isinstance(repo, str):
        store.put_bytes("musicrl-models", "triton/generator/.2.staging/weights.pt", b"half")
    else:
        (repo / "generator" / ".2.staging").mkdir()
        (repo / "generator" / ".3.old-123").mkdir()
    result = make().recover()
    assert result["action"] == "cleaned" and result["staging"]
    assert clean_staging(repo, store=store) == [] and installed_versions(repo, store=store) == [1]


def test_object_store_install_writes_the_marker_last_and_model_py_just_before(tmp_path):
    store = InMemoryStore()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"text_dim": 384}))
    (checkpoint / "weights.pt").write_bytes(b"w")
    (checkpoint / "model.py").write_text("print('old backend code from an exported version')")
    written = []
    real_put, real_copy = store.put_bytes, store.copy
    store.put_bytes = lambda b, k, d, *a, **kw: (written.append(("put", k)), real_put(b, k, d, *a, **kw))[1]
    store.copy = lambda b, s, t: (written.append(("copy", t)), real_copy(b, s, t))[1]
    install_version("s3://models/triton", 4, checkpoint, store=store)
    final = [key for _, key in written if key.startswith("triton/generator/4/")]
    assert final[-2:] == ["triton/generator/4/model.py", f"triton/generator/4/{COMPLETE_MARKER}"]
    assert all(op == "put" for op, key in written if "/.4.staging/" in key)  # bytes go to the staging prefix
    assert not [k for _, k in store.objects if "staging" in k]  # and it is gone afterwards
    assert store.get_bytes("models", "triton/generator/4/model.py").decode() == SHIM_SOURCE
    assert version_complete("s3://models/triton", 4, store=store)
    model_repository.export_version("s3://models/triton", 4, tmp_path / "exported", store=store)
    assert not (tmp_path / "exported" / COMPLETE_MARKER).exists()
