"""The object store of the test stack is a real S3 server (SeaweedFS), driven with the minio client."""

import uuid

import httpx
import pytest

from musicrl.storage import ObjectNotFound

pytestmark = pytest.mark.integration


def test_put_get_list_and_presigned_get(object_store):
    bucket = object_store.config.bucket_clips
    prefix = f"stack-test/{uuid.uuid4().hex}/"
    payloads = {f"{prefix}{i}.bin": uuid.uuid4().bytes * (i + 1) for i in range(3)}
    for key, data in payloads.items():
        object_store.put_bytes(bucket, key, data)

    assert {key: object_store.get_bytes(bucket, key) for key in payloads} == payloads
    assert sorted(object_store.list_keys(bucket, prefix)) == sorted(payloads)

    key = next(iter(payloads))
    response = httpx.get(object_store.presigned_get(bucket, key, expires_s=60))
    assert response.status_code == 200
    assert response.content == payloads[key]


def test_presigned_url_is_signed(object_store):
    bucket = object_store.config.bucket_clips
    key = f"stack-test/{uuid.uuid4().hex}.bin"
    object_store.put_bytes(bucket, key, b"secret")
    unsigned = object_store.presigned_get(bucket, key).split("?")[0]
    assert httpx.get(unsigned).status_code == 403


def test_missing_key_is_a_clear_error(object_store):
    with pytest.raises(ObjectNotFound):
        object_store.get_bytes(object_store.config.bucket_clips, f"missing/{uuid.uuid4().hex}")


def test_buckets_exist(object_store):
    assert all(object_store.client.bucket_exists(bucket) for bucket in object_store.buckets())
