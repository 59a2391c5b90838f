"""Triton runs the installed package's backend, not code from the writable model repository, and loads a
version only when its files match the sha256 of its manifest (issue 16)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
from finetune_helpers import tiny_generator

from musicrl.models.generator import save_generator
from musicrl.registry import IntegrityError
from serving.model_repository import SHIM_SOURCE, TEMPLATE_DIR, install_version

pytestmark = pytest.mark.unit


@pytest.fixture
def backend(monkeypatch):
    """serving.triton_backend as the Python backend stub imports it (with a stand-in for Triton's utils module)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.delitem(sys.modules, "musicrl_generator_backend", raising=False)
    monkeypatch.delitem(sys.modules, "serving.triton_backend", raising=False)
    import serving.triton_backend as module

    return module


def _load_version_model_py(version_dir):
    """What Triton's stub does with <version>/model.py."""
    spec = importlib.util.spec_from_file_location(f"triton_model_{version_dir.name}", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_version_model_py_imports_the_packaged_backend(backend, tmp_path):
    repo = tmp_path / "repo"
    version_dir = install_version(repo, 3, save_generator(tiny_generator(), tmp_path / "checkpoint"))
    assert (version_dir / "model.py").read_text() == SHIM_SOURCE
    module = _load_version_model_py(version_dir)
    assert module.TritonPythonModel is backend.TritonPythonModel
    assert backend.IMPLEMENTATION == TEMPLATE_DIR / "model.py" and backend.IMPLEMENTATION.is_file()
    assert issubclass(backend.TritonPythonModel, sys.modules["musicrl_generator_backend"].TritonPythonModel)

    model = backend.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "generator"), "model_version": "3"})
    assert model.policy_version == b"3" and model.max_frames == tiny_generator().config.max_frames  # loaded


@pytest.mark.parametrize("damage", ["weights", "manifest", "missing"])
def test_a_version_whose_files_do_not_match_its_manifest_does_not_load(backend, tmp_path, damage):
    repo = tmp_path / "repo"
    version_dir = install_version(repo, 1, save_generator(tiny_generator(), tmp_path / "checkpoint"))
    if damage == "weights":
        data = bytearray((version_dir / "weights.pt").read_bytes())
        data[-1] ^= 0xFF
        (version_dir / "weights.pt").write_bytes(bytes(data))
    elif damage == "manifest":
        (version_dir / "manifest.json").unlink()
    else:
        (version_dir / "config.json").unlink()
    model = backend.TritonPythonModel()
    with pytest.raises(IntegrityError, match="refusing to load"):
        model.initialize({"model_repository": str(repo / "generator"), "model_version": "1"})
    assert not hasattr(model, "policy_version")  # the implementation's initialize never ran
