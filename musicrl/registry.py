"""Model registry in the object store: versioned model directories with manifests.

Layout in the models bucket (``bucket_models``)::

    {kind}/{version}/<model files>            uploaded first
    {kind}/{version}/manifest.json            written last: a version exists once its manifest does
    {kind}/{version}/.reservation             claims the version number (conditional PUT)
    {kind}/current                            {"version", "previous", "updated_at"}, one PUT
    {kind}/rejected/{created_at}-{id}.json    candidates that failed the evaluation gate
    {kind}/canary                             the newest canary's record (docs/canary.md); the gateway polls it
    {kind}/canaries/{canary_id}.json          every canary's record: decision and the votes behind it

Kinds are ``generator``, ``reward/text_adherence``, ``reward/quality`` and
``reward/preference``. Versions are positive integers written as strings for every
kind, because generator versions double as Triton version directories and as the
policy version stamped on clips.

Why it is safe under crashes and concurrency:

- A publisher claims ``N = max + 1`` with an ``If-None-Match: *`` PUT of the
  reservation, so two publishers never share a number; the loser takes the next.
- The manifest (with the sha256 of every file) is written after every file is
  uploaded, so a publisher killed half-way leaves an invisible, unused version.
- ``current`` is a single small object replaced by one PUT, which S3 makes atomic.
- ``download`` writes into a temporary sibling directory, checks every hash and only
  then renames it into place, so readers never see a half-downloaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from musicrl.storage import ObjectNotFound, ObjectStore, PreconditionFailed

MANIFEST = "manifest.json"
RESERVATION = ".reservation"
CANARY_POINTER = "canary"  # {kind}/canary: the newest canary record (the gateway polls it)
CANARY_RECORDS = "canaries"  # {kind}/canaries/{canary_id}.json: every canary record
KINDS = ("generator", "reward/text_adherence", "reward/quality", "reward/preference")
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (unknown version, bad input)."""


class IntegrityError(RegistryError):
    """A downloaded file does not match the sha256 recorded in its manifest."""


DOWNLOAD_CHUNK_BYTES = 8 * 1024 * 1024


def download_verified(
    store: ObjectStore,
    bucket: str,
    prefix: str,
    files: dict[str, str | None],
    dest_dir: str | Path,
    label: str,
    *,
    manifest: dict | None = None,
) -> Path:
    """Stream ``files`` (name -> expected sha256, or None: unverified) under ``prefix`` into ``dest_dir``.

    The files land in a temporary sibling first and the directory is renamed into place only
    when every hash matched, so ``dest_dir`` is either complete or absent (an existing one is
    replaced); ``manifest``, when given, is written beside them. Raises ``IntegrityError`` on a
    mismatch or an unsafe file name. Objects are streamed in chunks, so a multi-GB checkpoint
    never sits in memory. The one downloader of the registry and of ``musicrl.weights``.
    """
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}-", dir=dest_dir.parent))
    try:
        for name, expected in files.items():
            if name.startswith("/") or ".." in Path(name).parts:
                raise IntegrityError(f"{label}: unsafe file name {name!r} in manifest")
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with target.open("wb") as handle:
                for chunk in store.iter_bytes(bucket, f"{prefix}/{name}" if prefix else name, DOWNLOAD_CHUNK_BYTES):
                    digest.update(chunk)
                    handle.write(chunk)
            actual = digest.hexdigest()
            if expected is not None and actual != expected:
                raise IntegrityError(f"{label}: {name} has sha256 {actual[:12]}..., manifest says {expected[:12]}...")
        if manifest is not None:
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if dest_dir.exists():
            shutil.rmtree(dest_dir)
        os.replace(staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest_dir


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_kind(kind: str) -> str:
    if not kind or kind.startswith("/") or kind.endswith("/") or ".." in kind:
        raise RegistryError(f"invalid model kind {kind!r}")
    return kind


def _check_version(version: str) -> str:
    if not _VERSION_RE.match(str(version)):
        raise RegistryError(f"invalid version {version!r}: versions are positive integers")
    return str(version)


def _local_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``local_dir`` (sorted, manifest excluded)."""
    names = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            name = path.relative_to(local_dir).as_posix()
            if name not in (MANIFEST, RESERVATION):
                names.append(name)
    return names


class Registry:
    """Versioned models in the object store (see the module docstring for the layout)."""

    def __init__(self, store: ObjectStore, bucket: str | None = None):
        self.store = store
        self.bucket = bucket or store.config.bucket_models

    # -- reading -------------------------------------------------------------------

    def versions(self, kind: str) -> list[str]:
        """Published versions of ``kind`` (those with a manifest), oldest first."""
        prefix = f"{_check_kind(kind)}/"
        found = set()
        for key in self.store.list_keys(self.bucket, prefix=prefix):
            rest = key[len(prefix) :].split("/")
            if len(rest) == 2 and rest[1] == MANIFEST and _VERSION_RE.match(rest[0]):
                found.add(rest[0])
        return sorted(found, key=int)

    def manifest(self, kind: str, version: str) -> dict[str, Any]:
        key = f"{_check_kind(kind)}/{_check_version(version)}/{MANIFEST}"
        try:
            return self.store.get_json(self.bucket, key)
        except ObjectNotFound as exc:
            raise RegistryError(f"{kind} version {version} is not published") from exc

    def pointer(self, kind: str) -> dict[str, Any] | None:
        """The whole ``current`` record (version, previous, updated_at), or None."""
        try:
            return self.store.get_json(self.bucket, f"{_check_kind(kind)}/current")
        except ObjectNotFound:
            return None

    def current(self, kind: str) -> str | None:
        record = self.pointer(kind)
        return None if record is None else str(record["version"])

    def history(self, kind: str) -> list[dict[str, Any]]:
        """Every published manifest of ``kind``, oldest first, with ``current`` marked."""
        current = self.current(kind)
        rows = []
        for version in self.versions(kind):
            manifest = self.manifest(kind, version)
            manifest["is_current"] = version == current
            rows.append(manifest)
        return rows

    def rejections(self, kind: str) -> list[dict[str, Any]]:
        prefix = f"{_check_kind(kind)}/rejected/"
        return [
            self.store.get_json(self.bucket, key) for key in sorted(self.store.list_keys(self.bucket, prefix=prefix))
        ]

    # -- writing -------------------------------------------------------------------

    def publish(
        self,
        kind: str,
        local_dir: str | Path,
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> str:
        """Upload every file of ``local_dir`` as a new version; returns the version.

        ``version`` pins the number (it must be free); otherwise the next integer is
        claimed. The ``current`` pointer is not moved: deploying is a separate step.
        """
        _check_kind(kind)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise RegistryError(f"{local_dir} is not a directory")
        names = _local_files(local_dir)
        if not names:
            raise RegistryError(f"{local_dir} holds no files to publish")
        files = {name: sha256_file(local_dir / name) for name in names}
        version = self._reserve(kind, version)
        for name in names:
            data = (local_dir / name).read_bytes()
            self.store.put_bytes(self.bucket, f"{kind}/{version}/{name}", data)
        manifest = {
            "kind": kind,
            "version": version,
            "created_at": _utcnow(),
            "files": files,
            "metrics": metrics or {},
            "lineage": lineage or {},
        }
        self.store.put_json(self.bucket, f"{kind}/{version}/{MANIFEST}", manifest)
        return version

    def set_current(self, kind: str, version: str) -> None:
        """Point ``current`` at a published version (one atomic PUT)."""
        version = _check_version(version)
        self.manifest(kind, version)  # refuses unpublished versions
        record = {"version": version, "previous": self.current(kind), "updated_at": _utcnow()}
        self.store.put_json(self.bucket, f"{kind}/current", record)

    def record_rejection(self, kind: str, report: dict[str, Any]) -> str:
        """Keep the gate report of a candidate that was not published; returns its key."""
        key = f"{_check_kind(kind)}/rejected/{_utcnow()}-{uuid.uuid4().hex[:8]}.json"
        self.store.put_json(self.bucket, key, {"recorded_at": _utcnow(), **report})
        return key

    # -- canaries (docs/canary.md) --------------------------------------------------

    def canary(self, kind: str) -> dict[str, Any] | None:
        """The newest canary's record (``{kind}/canary``), running or decided; None if there never was one."""
        try:
            return self.store.get_json(self.bucket, f"{_check_kind(kind)}/{CANARY_POINTER}")
        except ObjectNotFound:
            return None

    def record_canary(self, kind: str, record: dict[str, Any]) -> None:
        """Write a canary's record: its own ``{kind}/canaries/{canary_id}.json`` first (with ``event_ids``, the
        votes behind the decision), then the pointer the gateway polls (one PUT each, so a reader sees a whole
        record, old or new)."""
        canary_id = str(record.get("canary_id", ""))
        if not re.match(r"^[A-Za-z0-9_.-]{1,80}$", canary_id):
            raise RegistryError(f"invalid canary id {canary_id!r}")
        record = {**record, "updated_at": _utcnow()}
        self.store.put_json(self.bucket, f"{_check_kind(kind)}/{CANARY_RECORDS}/{canary_id}.json", record)
        # The pointer is polled by every gateway replica: the same record without the list of vote ids.
        self.store.put_json(
            self.bucket, f"{kind}/{CANARY_POINTER}", {k: v for k, v in record.items() if k != "event_ids"}
        )

    def canaries(self, kind: str) -> list[dict[str, Any]]:
        """Every canary's record, oldest first (by start time)."""
        prefix = f"{_check_kind(kind)}/{CANARY_RECORDS}/"
        records = [
            self.store.get_json(self.bucket, key)
            for key in self.store.list_keys(self.bucket, prefix=prefix)
            if key.endswith(".json")
        ]
        return sorted(records, key=lambda r: (str(r.get("started_at", "")), str(r.get("canary_id", ""))))

    def _reserve(self, kind: str, version: str | None) -> str:
        if version is not None:
            version = _check_version(version)
            try:
                self.store.put_bytes_conditional(self.bucket, f"{kind}/{version}/{RESERVATION}", b"{}", if_absent=True)
            except PreconditionFailed as exc:
                raise RegistryError(f"{kind} version {version} already exists") from exc
            return version
        candidate = self._highest_claimed(kind) + 1
        while True:
            try:
                self.store.put_bytes_conditional(
                    self.bucket, f"{kind}/{candidate}/{RESERVATION}", b"{}", if_absent=True
                )
                return str(candidate)
            except PreconditionFailed:
                candidate += 1

    def _highest_claimed(self, kind: str) -> int:
        prefix = f"{kind}/"
        highest = 0
        for key in self.store.list_keys(self.bucket, prefix=prefix):
            head = key[len(prefix) :].split("/", 1)[0]
            if _VERSION_RE.match(head):
                highest = max(highest, int(head))
        return highest

    # -- downloading ---------------------------------------------------------------

    def download(self, kind: str, version: str, dest_dir: str | Path) -> Path:
        """Fetch a version into ``dest_dir``, verifying every file's sha256.

        The files land in a temporary sibling first and the directory is renamed into
        place only when every hash matched, so ``dest_dir`` is either complete or absent.
        An existing ``dest_dir`` is replaced. Raises ``IntegrityError`` on a mismatch.
        """
        manifest = self.manifest(kind, version)
        return download_verified(
            self.store,
            self.bucket,
            f"{kind}/{version}",
            manifest["files"],
            dest_dir,
            f"{kind} {version}",
            manifest=manifest,
        )


def verify_dir(local_dir: str | Path) -> dict[str, Any]:
    """Check a downloaded version directory against its own manifest; returns the manifest."""
    local_dir = Path(local_dir)
    try:
        manifest = json.loads((local_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{local_dir}: no readable {MANIFEST}") from exc
    for name, expected in manifest["files"].items():
        path = local_dir / name
        if not path.is_file() or sha256_file(path) != expected:
            raise IntegrityError(f"{local_dir}: {name} is missing or does not match its sha256")
    return manifest
