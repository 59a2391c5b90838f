"""A thin object-store client over ``minio`` with the few verbs the services use."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any, Iterator

from minio import Minio
from minio.error import S3Error

from musicrl.config import ObjectStoreConfig


class ObjectNotFound(KeyError):
    """The bucket or key does not exist."""


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists (if-absent) or changed (if-match)."""


class ObjectStore:
    def __init__(self, config: ObjectStoreConfig):
        self.config = config
        self.client = Minio(
            config.s3_endpoint,
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
            secure=config.s3_secure,
            region=config.s3_region,
        )

    def buckets(self) -> list[str]:
        c = self.config
        return [c.bucket_clips, c.bucket_generations, c.bucket_buffer, c.bucket_models]

    def ensure_buckets(self) -> None:
        for bucket in self.buckets():
            if not self.client.bucket_exists(bucket):
                try:
                    self.client.make_bucket(bucket)
                except S3Error as err:  # another process created it first
                    if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        try:
            response = self.client.get_object(bucket, key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(f"{bucket}/{key}") from err
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put_json(self, bucket: str, key: str, obj: Any) -> None:
        self.put_bytes(bucket, key, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.stat_object(bucket, key)
            return True
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise

    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
            yield obj.object_name

    def delete(self, bucket: str, key: str) -> None:
        self.client.remove_object(bucket, key)

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
            return self.client.stat_object(bucket, key).etag.strip('"')
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return None
            raise
