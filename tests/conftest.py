"""Session fixtures: one real stack (SeaweedFS, Tansu, Triton) per test session.

The stack starts on free ports in a temporary directory the first time a test
asks for it and stops at the end of the session. Tansu keeps its data in
memory here. Kafka consumers in tests should set ``session_timeout_ms`` low
(2000 to 6000): Tansu's consumer-group join takes about half of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from musicrl.config import ObjectStoreConfig
from musicrl.stack import Stack, StackError, StackInfo, free_port_settings
from musicrl.storage import ObjectStore


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    local = Stack(free_port_settings(tmp_path_factory.mktemp("stack")), tied_to_parent=True)
    try:
        info = local.up()
    except StackError as err:
        local.down()
        pytest.fail(f"cannot start the test stack: {err}", pytrace=False)
    try:
        yield info
    finally:
        local.down()


@pytest.fixture(scope="session")
def object_store(stack: StackInfo) -> ObjectStore:
    store = ObjectStore(stack.settings_for(ObjectStoreConfig))
    store.ensure_buckets()
    return store


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: StackInfo) -> str:
    return stack.kafka_bootstrap
