"""The generator's Triton Python backend, as the installed package ships it.

Triton's model repository is written by the finetune worker, so it holds data only:
each version directory has the weights, their ``manifest.json`` and a shim ``model.py``
(``serving.model_repository.SHIM_SOURCE``) that imports :class:`TritonPythonModel` from
here. The implementation is ``serving/model_repository/generator/model.py`` of the
installed package (read-only in the Triton image), loaded by its path, so the code that
serves a version is the image's, whatever an older deploy wrote into the repository.

Before the implementation loads a version, every file its manifest lists is checked
against the manifest's sha256 (the registry's, copied by the deployer, which verified the
download against the registry already): a version that is corrupt, truncated or half
written fails to load, and Triton keeps serving the version it had.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from musicrl.registry import IntegrityError, verify_dir
from serving.model_repository import BACKEND_FILE, TEMPLATE_DIR

IMPLEMENTATION = TEMPLATE_DIR / BACKEND_FILE
MODULE_NAME = "musicrl_generator_backend"


def load_implementation(path: Path = IMPLEMENTATION) -> ModuleType:
    """Import the backend implementation from the installed package (once per process)."""
    module = sys.modules.get(MODULE_NAME)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return module


def verify_version(version_dir: Path) -> dict:
    """Check ``version_dir`` against its ``manifest.json``; raises ``IntegrityError`` (the load fails)."""
    try:
        return verify_dir(version_dir)
    except (IntegrityError, KeyError, TypeError) as exc:
        raise IntegrityError(f"refusing to load {version_dir}: {exc}") from exc


class TritonPythonModel(load_implementation().TritonPythonModel):
    def initialize(self, args):
        verify_version(Path(args["model_repository"]) / str(args["model_version"]))
        super().initialize(args)
