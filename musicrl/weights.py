"""Pretrained weights from a local directory or the object store.

A setting that names pretrained weights (``reward_clap_path``, a policy to
install) holds either a local directory or ``s3://BUCKET/PREFIX``: the prefix
of a ``save_pretrained`` directory in the object store (the ``MUSICRL_S3_*``
endpoint). ``fetch_weights`` turns either into a local directory:

- a local directory is used in place;
- a prefix is downloaded into ``cache_dir``, one object at a time, streamed
  to disk. When the prefix holds a registry ``manifest.json`` (it is a
  ``musicrl.registry`` version directory), every file's sha256 is checked
  against it and a cached copy that still verifies is reused; without a
  manifest there is nothing to verify against, so the prefix is downloaded
  again each time (a warning says so).

The directory lands under a staging name and is renamed into place once
complete, so a reader never sees half a model. ``directory_digest`` names a
directory's exact content (the version of a model loaded from a path).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from musicrl.registry import MANIFEST, IntegrityError, download_verified, verify_dir

CHUNK_BYTES = 8 * 1024 * 1024
log = logging.getLogger(__name__)


def parse_s3_url(location: str) -> tuple[str, str] | None:
    """(bucket, prefix) of ``s3://BUCKET/PREFIX``; None for anything else (a local path)."""
    if not location.startswith("s3://"):
        return None
    bucket, _, prefix = location.removeprefix("s3://").strip("/").partition("/")
    if not bucket:
        raise ValueError(f"an object-store location is s3://BUCKET/PREFIX, got {location!r}")
    return bucket, prefix.strip("/")


def fetch_weights(location: str | Path, store=None, cache_dir: str | Path = ".data/weights") -> Path:
    """A local directory holding the weights ``location`` names (see the module docstring)."""
    s3 = parse_s3_url(str(location))
    if s3 is None:
        directory = Path(location)
        if not directory.is_dir():
            raise FileNotFoundError(f"no weights directory at {directory}")
        return directory
    if store is None:
        raise ValueError(f"{location} is in the object store: an ObjectStore is needed to fetch it")
    bucket, prefix = s3
    dest = Path(cache_dir) / bucket / (prefix or "_root")
    manifest = _manifest(store, bucket, prefix)
    if manifest is not None and _verifies(dest):
        return dest
    if manifest is None:
        log.warning("%s has no %s: downloading it unverified", location, MANIFEST)
    files = manifest["files"] if manifest is not None else {name: None for name in _names(store, bucket, prefix)}
    if not files:
        raise FileNotFoundError(f"nothing under {location}")
    return download_verified(store, bucket, prefix, files, dest, location, manifest=manifest)


def directory_digest(directory: str | Path, length: int = 10) -> str:
    """Hex sha256 over every file's relative name and content (hidden files and the manifest left out)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name == MANIFEST or any(part.startswith(".") for part in Path(name).parts):
            continue
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _manifest(store, bucket: str, prefix: str) -> dict | None:
    key = _key(prefix, MANIFEST)
    return json.loads(store.get_bytes(bucket, key)) if store.exists(bucket, key) else None


def _names(store, bucket: str, prefix: str) -> list[str]:
    start = f"{prefix}/" if prefix else ""
    return [key.removeprefix(start) for key in store.list_keys(bucket, start) if not key.endswith("/")]


def _verifies(directory: Path) -> bool:
    try:
        verify_dir(directory)
    except IntegrityError:
        return False
    return True
