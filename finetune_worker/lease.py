"""Single flight across workers: a lease object in the object store with an expiry.

``locks/finetune.json`` in the models bucket holds ``{owner, expires_at}``. It is
taken with a conditional PUT (``If-None-Match: *`` when absent, ``If-Match: <etag>``
to take over an expired or released lease) and renewed with ``If-Match`` on the
ETag we wrote, so two workers can never both believe they hold it: whoever's
conditional write lands first wins, the other gets 412. A worker that dies stops
renewing and its lease expires after ``ttl_s``; ``ttl_s`` must exceed the clock
skew between workers and the renewal period (a third of it) by a wide margin.
Works on SeaweedFS and MinIO; a file lock would only cover one host.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from musicrl.logging import get_logger
from musicrl.storage import ObjectNotFound, ObjectStore, PreconditionFailed

log = get_logger(__name__)

LEASE_KEY = "locks/finetune.json"


class LeaseLost(RuntimeError):
    """Another worker holds the lease now; stop before writing anything."""


class Lease:
    def __init__(
        self,
        store: ObjectStore,
        ttl_s: float = 120.0,
        bucket: str | None = None,
        key: str = LEASE_KEY,
        owner: str | None = None,
    ):
        self.store = store
        self.bucket = bucket or store.config.bucket_models
        self.key = key
        self.ttl_s = ttl_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the renewal thread and the guard before a publish both renew
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None

    def _body(self, expires_at: float) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": expires_at, "written_at": time.time()}).encode()

    def holder(self) -> dict | None:
        try:
            return self.store.get_json(self.bucket, self.key)
        except ObjectNotFound:
            return None

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or released; False if another worker holds it."""
        try:
            self._etag = self.store.put_bytes_conditional(
                self.bucket, self.key, self._body(time.time() + self.ttl_s), if_absent=True
            )
            return True
        except PreconditionFailed:
            pass
        etag = self.store.etag(self.bucket, self.key)
        current = self.holder()
        if etag is None or current is None:
            return self.acquire()  # released and deleted in between
        if current.get("owner") != self.owner and float(current.get("expires_at", 0)) > time.time():
            return False
        try:
            self._etag = self.store.put_bytes_conditional(
                self.bucket, self.key, self._body(time.time() + self.ttl_s), if_match=etag
            )
        except PreconditionFailed:
            return False  # someone else took it over first
        log.info("lease.taken_over", previous=current.get("owner"), owner=self.owner)
        return True

    def renew(self) -> None:
        with self._lock:
            if self._etag is None:
                raise LeaseLost("lease not held")
            try:
                self._etag = self.store.put_bytes_conditional(
                    self.bucket, self.key, self._body(time.time() + self.ttl_s), if_match=self._etag
                )
            except PreconditionFailed as exc:
                self._etag = None
                raise LeaseLost(f"lease {self.key} was taken by {(self.holder() or {}).get('owner')}") from exc

    def release(self) -> None:
        self.stop_renewing()
        with self._lock:
            if self._etag is None:
                return
            try:
                self.store.put_bytes_conditional(self.bucket, self.key, self._body(0.0), if_match=self._etag)
            except PreconditionFailed:
                pass  # already expired and taken: nothing of ours to release
            self._etag = None

    def start_renewing(self) -> None:
        """Renew every ttl/3 from a daemon thread while long work runs in the foreground."""
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLost as exc:
                    log.error("lease.lost", error=str(exc))
                    return
                except Exception as exc:  # noqa: BLE001 - a transient store error; retry at the next tick
                    log.warning("lease.renew_failed", error=str(exc))

        self._thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Lease:
        if not self.acquire():
            raise LeaseLost(f"another worker holds {self.key}: {self.holder()}")
        self.start_renewing()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
