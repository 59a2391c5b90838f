"""The object store of the test stack is a real S3 server (SeaweedFS), driven through
``musicrl.storage.ObjectStore``."""

import uuid

import httpx
import pytest

from musicrl.schemas.generation import CLIP_GENERATION_ID_METADATA
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


@pytest.mark.parametrize("where", ["key", "bucket"])
def test_one_not_found_rule_for_every_read(object_store, where):
    """A missing key or bucket: ObjectNotFound from every read, False from exists, None from etag."""
    bucket = object_store.config.bucket_clips if where == "key" else f"missing-{uuid.uuid4().hex[:12]}"
    key = f"missing/{uuid.uuid4().hex}"
    for read in (
        object_store.get_bytes,
        object_store.get_bytes_and_metadata,
        object_store.stat,
        lambda b, k: list(object_store.iter_bytes(b, k)),
    ):
        with pytest.raises(ObjectNotFound):
            read(bucket, key)
    assert object_store.exists(bucket, key) is False
    assert object_store.etag(bucket, key) is None


def test_user_metadata_round_trips_without_the_header_prefix(object_store):
    bucket = object_store.config.bucket_clips
    key = f"stack-test/{uuid.uuid4().hex}.wav"
    generation_id = uuid.uuid4().hex
    object_store.put_bytes(bucket, key, b"RIFF....", "audio/wav", metadata={CLIP_GENERATION_ID_METADATA: generation_id})

    info = object_store.stat(bucket, key)
    assert info.metadata == {CLIP_GENERATION_ID_METADATA: generation_id}
    assert (info.size, info.content_type, info.etag) == (8, "audio/wav", object_store.etag(bucket, key))
    assert object_store.get_bytes_and_metadata(bucket, key) == (
        b"RIFF....",
        {CLIP_GENERATION_ID_METADATA: generation_id},
    )
    plain = f"stack-test/{uuid.uuid4().hex}.bin"
    object_store.put_bytes(bucket, plain, b"x")
    assert object_store.stat(bucket, plain).metadata == {}


def test_buckets_exist_and_ensure_bucket_is_idempotent(object_store):
    assert all(object_store.bucket_exists(bucket) for bucket in object_store.buckets())
    bucket = f"stack-test-{uuid.uuid4().hex[:12]}"
    assert not object_store.bucket_exists(bucket)
    object_store.ensure_bucket(bucket)
    object_store.ensure_bucket(bucket)
    assert object_store.bucket_exists(bucket)
    object_store.client.remove_bucket(bucket)
