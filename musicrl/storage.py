"""A thin object-store client over ``minio`` with the few verbs the services use.

Every request is bounded: ``s3_timeout_s`` to connect and per read, ``s3_retries`` retries
(instead of minio's 300 s and 5), so an object-store brownout costs a caller seconds, not a
thread for many minutes. With ``MUSICRL_ENV=production`` a store with the development
credentials is refused (``musicrl.config.refuse_development_secrets``).

This class is the only way to the object store: services never call the minio client
(``.client``) themselves.

Not found, one rule: a verb that reads a missing object or a missing bucket raises
:class:`ObjectNotFound` (whatever S3 code the server answered with, see ``NOT_FOUND_CODES``).
Only the two questions whose answer covers absence say so instead: ``exists`` (False) and
``etag`` (None). ``delete`` of a missing key succeeds, as in S3.

User metadata (``put_bytes(..., metadata=...)``) is read back by name without the
``x-amz-meta-`` prefix S3 adds, lower case (``stat(...).metadata``,
``get_bytes_and_metadata``); the names the services use live in ``musicrl.schemas``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource
from minio.error import S3Error

from musicrl.config import ObjectStoreConfig, refuse_development_secrets

RETRY_STATUSES = (500, 502, 503, 504)
POOL_MAXSIZE = 10  # minio's default connections per host
# Every code an S3 server (SeaweedFS, MinIO, AWS) or minio-py answers a missing bucket or key with:
# GET answers NoSuchKey/NoSuchBucket in its XML body; a bodiless HEAD gets a code from minio-py.
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
BUCKET_TAKEN_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
USER_METADATA_PREFIX = "x-amz-meta-"


def http_client(config: ObjectStoreConfig) -> urllib3.PoolManager:
    """The bounded urllib3 pool the minio client uses (timeouts and retries from the settings)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=config.s3_timeout_s, read=config.s3_timeout_s),
        maxsize=POOL_MAXSIZE,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=config.s3_retries, backoff_factor=0.2, status_forcelist=RETRY_STATUSES),
    )


class ObjectNotFound(KeyError):
    """The bucket or key does not exist."""


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists (if-absent) or changed (if-match)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What ``stat`` knows of an object without reading it."""

    size: int
    etag: str
    content_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata, names without x-amz-meta-, lower case


def user_metadata(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The user metadata among response headers, by name without ``x-amz-meta-``, lower case."""
    n = len(USER_METADATA_PREFIX)
    return {k.lower()[n:]: v for k, v in (headers or {}).items() if k.lower().startswith(USER_METADATA_PREFIX)}


@contextmanager
def _not_found_as(bucket: str, key: str = "") -> Iterator[None]:
    """Turn the S3 errors of ``NOT_FOUND_CODES`` into :class:`ObjectNotFound`."""
    try:
        yield
    except S3Error as err:
        if err.code in NOT_FOUND_CODES:
            raise ObjectNotFound(f"{bucket}/{key}" if key else bucket) from err
        raise


class ObjectStore:
    def __init__(self, config: ObjectStoreConfig):
        refuse_development_secrets(config, "object store")
        self.config = config
        self.client = Minio(
            config.s3_endpoint,
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
            secure=config.s3_secure,
            region=config.s3_region,
            http_client=http_client(config),
        )

    def buckets(self) -> list[str]:
        c = self.config
        return [c.bucket_clips, c.bucket_generations, c.bucket_buffer, c.bucket_models]

    def ensure_buckets(self) -> None:
        for bucket in self.buckets():
            self.ensure_bucket(bucket)

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` unless it exists (another process creating it first is fine)."""
        if self.client.bucket_exists(bucket):
            return
        try:
            self.client.make_bucket(bucket)
        except S3Error as err:
            if err.code not in BUCKET_TAKEN_CODES:
                raise

    def bucket_exists(self, bucket: str) -> bool:
        return self.client.bucket_exists(bucket)

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data``; ``metadata`` is user metadata (US-ASCII values), read back by ``stat``."""
        self.client.put_object(
            bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=dict(metadata or {}) or None
        )

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.get_bytes_and_metadata(bucket, key)[0]

    def get_bytes_and_metadata(self, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
        """The object and its user metadata, in one GET."""
        with _not_found_as(bucket, key):
            response = self.client.get_object(bucket, key)
        try:
            return response.read(), user_metadata(response.headers)
        finally:
            response.close()
            response.release_conn()

    def iter_bytes(self, bucket: str, key: str, chunk_size: int = 8 * 1024 * 1024) -> Iterator[bytes]:
        """The object in chunks, so a multi-gigabyte file never sits in memory whole."""
        with _not_found_as(bucket, key):
            response = self.client.get_object(bucket, key)
        try:
            yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        """Size, ETag, content type and user metadata of the object (a HEAD, no body)."""
        with _not_found_as(bucket, key):
            obj = self.client.stat_object(bucket, key)
        return ObjectInfo(
            size=int(obj.size or 0),
            etag=(obj.etag or "").strip('"'),
            content_type=obj.content_type,
            metadata=user_metadata(obj.metadata),
        )

    def put_json(self, bucket: str, key: str, obj: Any) -> None:
        self.put_bytes(bucket, key, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def exists(self, bucket: str, key: str) -> bool:
        return self.etag(bucket, key) is not None

    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
            yield obj.object_name

    def delete(self, bucket: str, key: str) -> None:
        self.client.remove_object(bucket, key)

    def copy(self, bucket: str, source_key: str, target_key: str) -> None:
        """Server-side copy inside ``bucket``: no bytes through this process (CopyObject up to 5 GiB,
        a multipart UploadPartCopy above)."""
        self.client.compose_object(bucket, target_key, [ComposeSource(bucket, source_key)])

    def presigned_get(self, bucket: str, key: str, expires_s: int = 3600) -> str:
        return self.client.presigned_get_object(bucket, key, expires=timedelta(seconds=expires_s))

    def put_bytes_conditional(
        self, bucket: str, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """PUT that succeeds only if the key is absent or still has ETag ``if_match``; returns the new ETag.

        S3 conditional writes (SeaweedFS and MinIO honour ``If-None-Match``/``If-Match``) make
        compare-and-swap possible: version reservation in the registry, leases for single-flight
        workers. minio-py's public ``put_object`` cannot send these headers, hence ``_execute``.
        """
        headers = {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        if if_absent:
            headers["If-None-Match"] = "*"
        if if_match is not None:
            headers["If-Match"] = f'"{if_match.strip(chr(34))}"'
        try:
            response = self.client._execute("PUT", bucket, key, body=data, headers=headers)
        except S3Error as err:
            if err.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise PreconditionFailed(f"{bucket}/{key}") from err
            raise
        return (response.headers.get("ETag") or "").strip('"')

    def etag(self, bucket: str, key: str) -> str | None:
        """The object's ETag, or None when it does not exist."""
        try:
            return self.stat(bucket, key).etag
        except ObjectNotFound:
            return None
