"""`musicrl stack up|status|down` as a user runs it: a second, private stack on free
ports, with Tansu storing topics and offsets in SeaweedFS so they survive a restart."""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from kafka import KafkaConsumer, KafkaProducer

from musicrl.stack import free_port_settings

pytestmark = pytest.mark.integration

MUSICRL = [sys.executable, "-m", "musicrl.cli", "stack"]


@pytest.fixture
def stack_env(tmp_path):
    settings = free_port_settings(tmp_path / "stack")
    env = {
        **os.environ,
        **{
            f"MUSICRL_{name.upper()}": str(value)
            for name, value in settings.model_dump().items()
            if name.startswith("stack_") and value is not None
        },
        "MUSICRL_STACK_KAFKA_STORAGE": "s3",
        "MUSICRL_STACK_SERVICES": "false",  # the servers only: the services' components are tested in tests/e2e
    }
    yield settings, env
    subprocess.run([*MUSICRL, "down"], env=env, capture_output=True, timeout=120)


def run(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*MUSICRL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def recorded_pids(data_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (data_dir / "run").glob("*.pid")]


def test_up_status_down_and_kafka_data_survives_a_restart(stack_env):
    settings, env = stack_env
    bootstrap = f"127.0.0.1:{settings.stack_kafka_port}"

    first = run(env, "up")
    assert first.returncode == 0, first.stderr
    assert "already running" not in first.stdout
    again = run(env, "up")
    assert again.returncode == 0 and again.stdout.count("already running") == 3
    assert run(env, "status").returncode == 0

    topic = settings.topic_preferences
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    producer.send(topic, key=b"k", value=b"kept").get(timeout=30)
    producer.close()
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    received = [r.value for batch in consumer.poll(timeout_ms=10000).values() for r in batch]
    consumer.commit()
    consumer.close()
    assert received == [b"kept"]

    pids = recorded_pids(settings.data_dir)
    assert len(pids) == 3
    down = run(env, "down")
    assert down.returncode == 0
    assert not any(psutil.pid_exists(pid) for pid in pids), "stack down left a process behind"
    assert run(env, "status").returncode == 1

    assert run(env, "up").returncode == 0
    late = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"late-{group}",
        auto_offset_reset="earliest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    resumed = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    assert [r.value for batch in late.poll(timeout_ms=10000).values() for r in batch] == [b"kept"]
    assert [r.value for batch in resumed.poll(timeout_ms=4000).values() for r in batch] == []
    late.close()
    resumed.close()


def test_taken_port_is_one_clear_error(stack_env):
    settings, env = stack_env
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", settings.stack_kafka_port))
        blocker.listen()
        result = run(env, "up")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"error: tansu: port {settings.stack_kafka_port} (kafka) is already in use by another process"
    )
    assert recorded_pids(settings.data_dir) == [], "a failed up must stop what it started"
