"""`musicrl finetune loop` (the real CLI, signal handling and loop) around a fake cycle, for
tests/unit/test_finetune_shutdown.py. Usage: python finetune_shutdown_worker.py WORK_DIR MODE

MODE ``train``: the cycle runs "training steps" with a safe point (``shutdown.check``) before each,
as ``finetune_worker.train`` does; ``deploy``: the cycle is inside a deploy (no safe point) for 2 s,
then returns a deployed record. Progress lines go to WORK_DIR/progress.jsonl; the lease is a file
under WORK_DIR/store, so the test can see that it was released.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from finetune_worker import cycle as cycle_module
from finetune_worker import shutdown
from finetune_worker.cli import app
from musicrl.config import ObjectStoreConfig
from musicrl.storage import ObjectNotFound, ObjectStore, PreconditionFailed

WORK, MODE = Path(sys.argv[1]), sys.argv[2]


def progress(**fields) -> None:
    with open(WORK / "progress.jsonl", "a") as handle:
        handle.write(json.dumps({**fields, "t": time.time()}) + "\n")


class FileStore(ObjectStore):
    """Objects as files, conditional PUTs with content ETags: what the lease needs."""

    def __init__(self, root: Path):
        self.config = ObjectStoreConfig()
        self.root = root

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    def get_bytes(self, bucket, key):
        try:
            return self._path(bucket, key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{bucket}/{key}") from None

    def iter_bytes(self, bucket, key, chunk_size=8 * 1024 * 1024):
        yield self.get_bytes(bucket, key)

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream"):
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def etag(self, bucket, key):
        try:
            return hashlib.md5(self.get_bytes(bucket, key)).hexdigest()
        except ObjectNotFound:
            return None

    def put_bytes_conditional(self, bucket, key, data, *, if_absent=False, if_match=None):
        current = self.etag(bucket, key)
        if (if_absent and current is not None) or (if_match is not None and current != if_match):
            raise PreconditionFailed(f"{bucket}/{key}")
        self.put_bytes(bucket, key, data)
        return hashlib.md5(data).hexdigest()


class FakeCycle:
    def __init__(self, settings):
        self.settings = settings
        self.store = FileStore(WORK / "store")
        self.work_dir = WORK
        self.registry = SimpleNamespace(current=lambda kind: "1")
        self.buffer = SimpleNamespace(counts_by_policy=lambda: {})
        self.guard = lambda: None
        self.done = False

    def load_state(self):
        return None if self.done else SimpleNamespace(status="training", run_id="fake")

    def deployer(self):
        return SimpleNamespace(read_journal=lambda: None, recover=lambda: None)

    def run_once(self):
        progress(event="cycle_started", lease=self.store.get_json("musicrl-models", "locks/finetune.json"))
        if MODE == "train":
            for step in range(1, 10_000):
                shutdown.check(f"before step {step}")
                time.sleep(0.05)
                progress(event="step", step=step)
        progress(event="deploy_started")
        time.sleep(2.0)  # a deploy: the signal arrives here and must wait for it
        progress(event="deploy_done")
        self.done = True
        return {"run_id": "fake", "status": "deployed", "parent_version": "1", "n_preferences": 0}


cycle_module.FinetuneCycle = FakeCycle  # what `finetune loop` builds
try:
    app(["loop"])
finally:
    progress(event="exited")
