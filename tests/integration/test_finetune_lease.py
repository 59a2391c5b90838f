"""Single-flight lease on the real object store: exclusive, renewable, expiring, releasable."""

from __future__ import annotations

import time
import uuid

import pytest

from finetune_worker.lease import Lease, LeaseLost

pytestmark = pytest.mark.integration


@pytest.fixture()
def key() -> str:
    return f"locks/test-{uuid.uuid4().hex[:8]}.json"


def test_only_one_worker_holds_the_lease(object_store, key):
    first, second = Lease(object_store, ttl_s=30, key=key), Lease(object_store, ttl_s=30, key=key)
    assert first.acquire()
    assert not second.acquire()
    first.renew()
    assert not second.acquire()
    first.release()
    assert second.acquire() and second.holder()["owner"] == second.owner
    second.release()


def test_a_dead_workers_lease_expires_and_the_old_holder_cannot_renew(object_store, key):
    dead, alive = Lease(object_store, ttl_s=1.0, key=key), Lease(object_store, ttl_s=30, key=key)
    assert dead.acquire()
    assert not alive.acquire()
    time.sleep(1.2)
    assert alive.acquire()
    with pytest.raises(LeaseLost):
        dead.renew()
    alive.release()


def test_context_manager_renews_in_the_background_and_refuses_a_second_holder(object_store, key):
    with Lease(object_store, ttl_s=0.9, key=key) as lease:
        time.sleep(1.5)  # longer than the ttl: only the renewal thread keeps it
        assert lease.held and not Lease(object_store, ttl_s=30, key=key).acquire()
        with pytest.raises(LeaseLost, match="another worker"):
            with Lease(object_store, ttl_s=30, key=key):
                pass
    assert Lease(object_store, ttl_s=30, key=key).acquire()


def test_a_worker_whose_lease_was_taken_over_cannot_renew(object_store, key):
    """The cycle's guard (lease.renew) raises before any write others can see."""
    stale, other = Lease(object_store, ttl_s=0.5, key=key), Lease(object_store, ttl_s=30, key=key)
    assert stale.acquire()
    time.sleep(0.7)  # stale worker paused (GC, network) past its ttl
    assert other.acquire()
    with pytest.raises(LeaseLost, match=other.owner):
        stale.renew()
    other.release()
