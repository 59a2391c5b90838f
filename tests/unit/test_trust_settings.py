"""Trust (issue 16), settings side: every service refuses the development secrets in production, and the
object-store client is bounded (timeouts and retries from the settings, not minio's 300 s and 5)."""

from __future__ import annotations

import pytest
import urllib3
from typer.testing import CliRunner

from feedback_consumer.settings import ConsumerSettings
from finetune_worker.settings import FinetuneSettings
from musicrl.config import (
    DEV_S3_ACCESS_KEY,
    DEV_S3_SECRET_KEY,
    InsecureSettings,
    ObjectStoreConfig,
    refuse_development_secrets,
)
from musicrl.storage import ObjectStore
from reward_service.settings import RewardSettings
from serving.settings import GatewaySettings

pytestmark = pytest.mark.unit

REAL = {"s3_access_key": "finetune-user", "s3_secret_key": "a-real-secret"}


def test_the_object_store_client_is_bounded_by_the_settings():
    store = ObjectStore(ObjectStoreConfig(s3_timeout_s=3.5, s3_retries=1))
    pool = store.client._http
    assert isinstance(pool, urllib3.PoolManager)
    timeout, retries = pool.connection_pool_kw["timeout"], pool.connection_pool_kw["retries"]
    assert timeout.connect_timeout == 3.5 and timeout.read_timeout == 3.5
    assert retries.total == 1 and set(retries.status_forcelist) == {500, 502, 503, 504}
    default = ObjectStore(ObjectStoreConfig()).client._http.connection_pool_kw
    assert default["timeout"].read_timeout == 10.0 and default["retries"].total == 2  # not minio's 300 s / 5


def test_an_unreachable_store_fails_within_the_bound(monkeypatch):
    """A black-holed endpoint costs about (1 + retries) x timeout, not minutes."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers: a read timeout on every attempt
    try:
        store = ObjectStore(
            ObjectStoreConfig(s3_endpoint=f"127.0.0.1:{listener.getsockname()[1]}", s3_timeout_s=0.3, s3_retries=1)
        )
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - urllib3's MaxRetryError or minio's wrapper
            store.get_bytes("musicrl-models", "generator/current")
        assert time.monotonic() - started < 5
    finally:
        listener.close()


@pytest.mark.parametrize(
    "settings_class", [ObjectStoreConfig, GatewaySettings, RewardSettings, ConsumerSettings, FinetuneSettings]
)
def test_every_service_refuses_the_development_object_store_keys_in_production(settings_class):
    with pytest.raises(InsecureSettings, match="MUSICRL_S3_ACCESS_KEY is the development default"):
        refuse_development_secrets(settings_class(env="production"), "service")
    with pytest.raises(InsecureSettings, match="MUSICRL_S3_SECRET_KEY"):
        refuse_development_secrets(settings_class(env="production", s3_access_key="own-user"), "service")
    # in development the same settings are allowed, and the problems listed (a warning at startup)
    assert refuse_development_secrets(settings_class(), "service")[:2] == [
        "MUSICRL_S3_ACCESS_KEY is the development default",
        "MUSICRL_S3_SECRET_KEY is the development default",
    ]
    assert (
        ObjectStoreConfig().s3_access_key == DEV_S3_ACCESS_KEY
        and ObjectStoreConfig().s3_secret_key == DEV_S3_SECRET_KEY
    )


@pytest.mark.parametrize("settings_class", [RewardSettings, ConsumerSettings, FinetuneSettings])
def test_services_with_their_own_keys_start_in_production(settings_class):
    assert refuse_development_secrets(settings_class(env="production", **REAL), "service") == []


def test_the_object_store_itself_refuses_development_keys_in_production():
    """The choke point every service goes through (the reward service included) on its way to the store."""
    with pytest.raises(InsecureSettings, match="object store"):
        ObjectStore(RewardSettings(env="production"))
    ObjectStore(RewardSettings(env="production", **REAL))


def test_the_gateway_lists_the_object_store_keys_with_its_own_secrets():
    problems = GatewaySettings(env="production").production_problems()
    assert "MUSICRL_S3_SECRET_KEY is the development default" in problems
    assert "MUSICRL_GATEWAY_VOTE_TOKEN_KEY is the development default" in problems


def test_the_reward_admin_token_has_no_default_to_refuse():
    """Unset means the reload API answers 403; there is no development token that production could keep."""
    assert RewardSettings().reward_admin_token is None
    assert FinetuneSettings().finetune_reward_admin_token is None


@pytest.mark.parametrize(
    "command", [["consumer", "run"], ["finetune", "loop"], ["finetune", "run-once"], ["finetune", "history"]]
)
def test_service_commands_exit_1_in_production_with_development_keys(monkeypatch, command):
    from musicrl.cli import app

    for name in ("MUSICRL_S3_ACCESS_KEY", "MUSICRL_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MUSICRL_ENV", "production")
    monkeypatch.setattr("musicrl.logging.configure_logging", lambda *args, **kwargs: None)  # keep the test's logging
    result = CliRunner().invoke(app, command)  # refused before any server is contacted
    assert result.exit_code == 1, result.output
    assert "MUSICRL_S3_ACCESS_KEY is the development default" in result.output


def test_the_reward_service_refuses_too(monkeypatch):
    """Through ObjectStore, the first thing its startup builds (reward_service is not changed here)."""
    from musicrl.cli import app

    for name in ("MUSICRL_S3_ACCESS_KEY", "MUSICRL_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MUSICRL_ENV", "production")
    monkeypatch.setattr("musicrl.logging.configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("the reward service must not serve"))
    result = CliRunner().invoke(app, ["reward", "serve", "--port", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, InsecureSettings) and "MUSICRL_S3_ACCESS_KEY" in str(result.exception)
