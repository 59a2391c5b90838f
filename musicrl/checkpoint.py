"""Writing state to disk so that a kill at any moment leaves the old file or the new one, never half of one.

One way for every writer in the project: the bytes go to a temporary file beside the target (its name
unique to the process), are flushed and fsynced, then ``os.replace`` swaps it in (atomic on POSIX).

- ``write_atomic`` / ``write_json_atomic``: a file or a JSON document (run records, the loop's
  trigger state, the deploy journal);
- ``save_torch_atomic`` / ``load_torch``: training state (optimizer, RNG, step) for resumable trainers;
- ``merge_json``: read-modify-write of a results file several components add keys to, under an
  exclusive lock, so two writers never lose each other's keys.

Model directories are written whole into a staging sibling and renamed
(``musicrl.models.generator.write_atomic``); registry downloads likewise (``musicrl.registry``).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside ``path``; on success it is fsynced and replaces ``path``, on
    failure it is removed (``path`` untouched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """``data`` into ``path`` via a fsynced temporary file and ``os.replace``."""
    path = Path(path)
    with _replacing(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` into ``path`` via a fsynced temporary file and ``os.replace``."""
    import torch  # noqa: PLC0415 - torch only where training state is written

    path = Path(path)
    with _replacing(path) as handle:
        torch.save(obj, handle)
    return path


def load_torch(path: str | Path) -> Any:
    """Training state written by ``save_torch_atomic`` (the project's own files: optimizer and RNG states are
    Python objects, so this is not ``weights_only``; never point it at a file from elsewhere)."""
    import torch  # noqa: PLC0415

    return torch.load(path, map_location="cpu", weights_only=False)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_json(path: str | Path, updates: dict) -> dict:
    """Add ``updates``'s top-level keys to the JSON object in ``path`` (created if missing) under an exclusive
    lock; other keys are kept. Returns the merged object."""
    path = Path(path)
    with _locked(path):
        current = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
        current.update(updates)
        write_json_atomic(path, current, sort_keys=True)
    return current
