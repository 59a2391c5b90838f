import socket
import sys

import httpx
import psutil
import pytest

from musicrl.stack import binaries
from musicrl.stack.binaries import PinnedFile, StackError, sha256_of, verified_path
from musicrl.stack.processes import ManagedProcess, RunDir, Supervisor, free_port, serve_process, wait_until_healthy

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_binary(tmp_path, monkeypatch):
    path = tmp_path / "site" / "fake" / "server"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"#!/bin/sh\n")
    monkeypatch.setattr(binaries, "_site_packages", lambda: tmp_path / "site")

    def pin(digest: str) -> None:
        monkeypatch.setitem(binaries.PINNED, "fake", PinnedFile("fake", "fake==1.0", "fake/server", {"x86_64": digest}))

    return path, pin


def test_binary_with_the_pinned_hash_is_returned(fake_binary):
    path, pin = fake_binary
    pin(sha256_of(path))
    assert verified_path("fake") == path


def test_wrong_hash_is_refused(fake_binary):
    path, pin = fake_binary
    pin("0" * 64)
    with pytest.raises(StackError, match=r"^fake: sha256 of .* does not match the pinned value for fake==1.0$"):
        verified_path("fake")


def test_missing_binary_is_refused(fake_binary):
    path, pin = fake_binary
    pin(sha256_of(path))
    path.unlink()
    with pytest.raises(StackError, match=r"^fake: binary not found at .* \(install fake==1.0\)$"):
        verified_path("fake")


def test_installed_server_binaries_match_their_pins():
    for name in binaries.PINNED:
        assert verified_path(name).is_file()


def http_server(port: int) -> ManagedProcess:
    return ManagedProcess(
        "web",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health=lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200,
        ports={"http": port},
    )


def test_start_is_idempotent_and_stop_ends_the_process(tmp_path):
    supervisor = Supervisor(RunDir(tmp_path))
    spec = http_server(free_port())
    proc, started = supervisor.start(spec, timeout_s=20)
    again, started_again = supervisor.start(spec, timeout_s=20)
    assert started and not started_again and again.pid == proc.pid
    assert supervisor.healthy(spec)

    assert supervisor.stop("web") is True
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    assert not RunDir(tmp_path).pid_file("web").exists()
    assert supervisor.stop("web") is False


def test_taken_port_is_refused_before_starting(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(StackError, match=rf"^web: port {port} \(http\) is already in use by another process$"):
            Supervisor(RunDir(tmp_path)).start(http_server(port), timeout_s=5)


def test_process_that_exits_during_start_is_reported(tmp_path):
    spec = ManagedProcess("crash", [sys.executable, "-c", "raise SystemExit(3)"], health=lambda: False)
    with pytest.raises(StackError, match=r"^crash: exited during start-up, see .*crash.log$"):
        Supervisor(RunDir(tmp_path)).start(spec, timeout_s=10)


def test_stale_pid_file_of_another_process_is_not_signalled(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.pid_file("web").parent.mkdir(parents=True)
    # Our own pid with a wrong start time: the recorded process is gone, whoever holds the pid now.
    run_dir.pid_file("web").write_text(f'{{"pid": {psutil.Process().pid}, "create_time": 1.0, "argv": []}}')
    assert Supervisor(run_dir).stop("web") is False


def test_serve_process_yields_once_the_url_answers_and_stops_the_process_after(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with serve_process(argv, f"http://127.0.0.1:{port}/", name="web", log_path=tmp_path / "web.log") as process:
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    assert process.poll() is not None


def test_serve_process_that_exits_during_start_is_reported_at_once(tmp_path):
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(StackError, match=r"^crash: exited during start-up, see .*crash.log$"):
        with serve_process(
            argv, f"http://127.0.0.1:{free_port()}/", name="crash", log_path=tmp_path / "crash.log", timeout_s=60
        ):
            pass


def test_wait_until_healthy_polls_a_check_and_times_out():
    answers = iter([False, RuntimeError("refused"), True])

    def check():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    wait_until_healthy(check, 5, interval_s=0.01)
    with pytest.raises(StackError, match=r"^nothing: not healthy after 0 s$"):
        wait_until_healthy(lambda: False, 0.05, name="nothing", interval_s=0.01)
