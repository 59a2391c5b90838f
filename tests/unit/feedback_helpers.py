"""In-memory object store and record/event factories shared by the feedback unit tests."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

from urllib3.exceptions import MaxRetryError

from musicrl.config import ObjectStoreConfig
from musicrl.schemas.generation import GenerationRecord, generation_key
from musicrl.schemas.preference import PreferenceEvent
from musicrl.storage import ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class InMemoryStore(ObjectStore):
    """The ObjectStore verbs over a dict; ``down = True`` makes every call fail like a dead server.

    Every bucket exists; a missing key raises ``ObjectNotFound`` like the real store.
    """

    def __init__(self):
        super().__init__(ObjectStoreConfig())
        self.objects: dict[tuple[str, str], bytes] = {}
        self.metadata: dict[tuple[str, str], dict[str, str]] = {}  # user metadata, as stat() returns it
        self.content_types: dict[tuple[str, str], str] = {}
        self.down = False

    def _check(self):
        if self.down:
            raise MaxRetryError(None, "/", "connection refused")

    def ensure_buckets(self):
        self._check()

    def ensure_bucket(self, bucket):
        self._check()

    def bucket_exists(self, bucket):
        self._check()
        return True

    def put_bytes(self, bucket, key, data, content_type="application/octet-stream", metadata=None):
        self._check()
        self.objects[(bucket, key)] = bytes(data)
        self.content_types[(bucket, key)] = content_type
        self.metadata[(bucket, key)] = {k.lower(): v for k, v in (metadata or {}).items()}

    def put_bytes_conditional(self, bucket, key, data, *, if_absent=False, if_match=None):
        """The registry's create-if-absent PUT (reserving versions, the lease); ``if_match`` is not checked."""
        if if_absent and (bucket, key) in self.objects:
            raise PreconditionFailed(f"{bucket}/{key}")
        self.put_bytes(bucket, key, data)
        return "etag"

    def get_bytes(self, bucket, key):
        self._check()
        try:
            return self.objects[(bucket, key)]
        except KeyError:
            raise ObjectNotFound(f"{bucket}/{key}") from None

    def get_bytes_and_metadata(self, bucket, key):
        return self.get_bytes(bucket, key), dict(self.metadata.get((bucket, key), {}))

    def stat(self, bucket, key):
        data = self.get_bytes(bucket, key)
        return ObjectInfo(
            size=len(data),
            etag=hashlib.md5(data).hexdigest(),
            content_type=self.content_types.get((bucket, key)),
            metadata=dict(self.metadata.get((bucket, key), {})),
        )

    def iter_bytes(self, bucket, key, chunk_size=8 * 1024 * 1024):
        data = self.get_bytes(bucket, key)
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]

    def exists(self, bucket, key):
        self._check()
        return (bucket, key) in self.objects

    def list_keys(self, bucket, prefix=""):
        self._check()
        return iter(sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix)))

    def delete(self, bucket, key):
        self._check()
        self.objects.pop((bucket, key), None)
        self.metadata.pop((bucket, key), None)
        self.content_types.pop((bucket, key), None)

    def copy(self, bucket, source_key, target_key):
        self.put_bytes(bucket, target_key, self.get_bytes(bucket, source_key))


def hex_id() -> str:
    return uuid.uuid4().hex


def make_record(
    policy_versions=("1", "1"), duration_s: float = 10.0, n_tokens: int = 8, prompt: str = "calm piano"
) -> GenerationRecord:
    clips = [
        {
            "clip_id": hex_id(),
            "index": i,
            "seed": 100 + i,
            "policy_version": v,
            "tokens": list(range(i, i + n_tokens)),
            "logprobs": [-0.5 - i] * n_tokens,
            "duration_s": duration_s,
            "sample_rate": 16000,
            "audio_key": "clips/x.wav",
        }
        for i, v in enumerate(policy_versions)
    ]
    return GenerationRecord.model_validate(
        {
            "generation_id": hex_id(),
            "prompt": prompt,
            "params": {"duration_s": duration_s, "temperature": 0.99},
            "clips": clips,
        }
    )


def store_record(store: ObjectStore, record: GenerationRecord) -> None:
    store.put_json(store.config.bucket_generations, generation_key(record.generation_id), record.to_json())


def make_event(
    record: GenerationRecord,
    choice: str = "a",
    listen=(10.0, 10.0),
    event_id: str | None = None,
    received_at: datetime = T0,
    **overrides,
) -> PreferenceEvent:
    fields = dict(
        event_id=event_id or hex_id(),
        generation_id=record.generation_id,
        clip_a_id=record.clips[0].clip_id,
        clip_b_id=record.clips[1].clip_id,
        choice=choice,
        listen_a_s=listen[0],
        listen_b_s=listen[1],
        user_pseudonym="ab" * 32,
        client_ts=received_at - timedelta(seconds=1),
        received_at=received_at,
    )
    fields.update(overrides)
    return PreferenceEvent(**fields)
