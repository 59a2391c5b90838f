"""Start, watch and stop the processes of the local stack, by PID file only.

A :class:`ManagedProcess` says how to run one server: its command line, its
environment, the ports it must find free, and how to tell that it is healthy.
Each started process leads its own process group and gets a PID file holding
its pid and start time; stopping signals that group only if the process with
that pid is still the one we started (never by process name).

The one place for "start a server and wait until it is healthy": :func:`free_port` picks a
port, :func:`wait_until_healthy` polls a URL or a check (failing fast when the process dies),
:func:`serve_process` runs a child process for the length of a ``with`` block. The stack, the
benchmarks, the load tests and the test fixtures all use these.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from musicrl.stack.binaries import StackError

HealthCheck = Callable[[], bool]
Health = str | HealthCheck  # a URL that must answer 200, or a check that must return true
HEALTH_TIMEOUT_S = 2.0  # per health request


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    health: HealthCheck
    ports: dict[str, int] = field(default_factory=dict)  # role -> port, all must be free before start
    env: dict[str, str] = field(default_factory=dict)  # added to the parent's environment
    cwd: Path | None = None
    host: str = "127.0.0.1"  # where `ports` are bound
    stop_timeout_s: float = 20.0


@dataclass(frozen=True)
class RunDir:
    """Where PID files and logs live (``<data_dir>/run`` and ``<data_dir>/logs``)."""

    root: Path

    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def http_ok(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """``url`` answers 200."""
    return httpx.get(url, timeout=timeout_s).status_code == 200


def is_healthy(health: Health) -> bool:
    """``health`` holds (a URL answers 200, a check returns true); any error means no."""
    try:
        return bool(http_ok(health) if isinstance(health, str) else health())
    except Exception:  # a server still starting refuses, resets or times out in many ways
        return False


def wait_until_healthy(
    health: Health,
    timeout_s: float,
    *,
    name: str | None = None,
    alive: Callable[[], bool] | None = None,
    log: Path | str | None = None,
    interval_s: float = 0.1,
) -> None:
    """Poll ``health`` (a URL that must answer 200, or a check) until it holds.

    Raises :class:`StackError` ("NAME: exited during start-up" as soon as ``alive()`` is
    false, "NAME: not healthy after N s" at the timeout; both end with ", see LOG" when a
    log is given), so a server that died is reported at once, not after the timeout.
    """
    name = name or (health if isinstance(health, str) else "server")
    see = f", see {log}" if log is not None else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise StackError(f"{name}: exited during start-up{see}")
        if is_healthy(health):
            return
        time.sleep(interval_s)
    raise StackError(f"{name}: not healthy after {timeout_s:.0f} s{see}")


@contextmanager
def serve_process(
    argv: Sequence[str],
    health: Health,
    *,
    name: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    log_path: Path | None = None,
    timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` as a child for the length of the block, yielded once ``health`` holds.

    ``env`` is the child's whole environment (None: this process's); its output goes to
    ``log_path`` (appended) or else to this process's. On leaving the block, or when it never
    becomes healthy (:class:`StackError`, see :func:`wait_until_healthy`), the child gets
    SIGTERM, then SIGKILL after ``stop_timeout_s``.
    """
    log = log_path.open("ab") if log_path is not None else None
    try:
        process = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
        try:
            wait_until_healthy(health, timeout_s, name=name, alive=lambda: process.poll() is None, log=log_path)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        if log is not None:
            log.close()


@dataclass
class RunningProcess:
    name: str
    pid: int
    create_time: float

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            # The same pid with another start time is a different process.
            return abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def stop(self, timeout_s: float) -> None:
        if not self.alive():
            return
        self._signal_group(signal.SIGTERM)
        if not self._wait_gone(timeout_s):
            self._signal_group(signal.SIGKILL)
            self._wait_gone(5.0)

    def _signal_group(self, sig: int) -> None:
        # Each process was started as the leader of its own group (start_new_session),
        # so the group also holds its children (Triton's python backend stubs).
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(self.pid, os.WNOHANG)  # reap it if it is our child
            except ChildProcessError:
                pass
            if not self.alive() and not _group_alive(self.pid):
                return True
            time.sleep(0.05)
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): the child is signalled when its parent dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Supervisor:
    """Starts and stops managed processes and records them in PID files under ``run_dir``.

    With ``tied_to_parent`` (test sessions) the processes also get SIGTERM when
    the process that started them dies, so a killed test run leaves no server behind.
    """

    def __init__(self, run_dir: RunDir, tied_to_parent: bool = False):
        self.run_dir = run_dir
        self.tied_to_parent = tied_to_parent

    def running(self, name: str) -> RunningProcess | None:
        pid_file = self.run_dir.pid_file(name)
        try:
            record = json.loads(pid_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        proc = RunningProcess(name, int(record["pid"]), float(record["create_time"]))
        return proc if proc.alive() else None

    def start(self, spec: ManagedProcess, timeout_s: float) -> tuple[RunningProcess, bool]:
        """Start ``spec`` unless it already runs; wait until healthy. Returns (process, started_now)."""
        existing = self.running(spec.name)
        if existing is not None:
            self.wait_healthy(spec, existing, timeout_s)
            return existing, False
        self.run_dir.pid_file(spec.name).unlink(missing_ok=True)
        for role, port in spec.ports.items():
            if port_in_use(spec.host, port):
                raise StackError(f"{spec.name}: port {port} ({role}) is already in use by another process")

        log_path = self.run_dir.log_file(spec.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.run_dir.pid_file(spec.name).parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                spec.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **spec.env},
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.tied_to_parent else None,
            )
        proc = RunningProcess(spec.name, popen.pid, psutil.Process(popen.pid).create_time())
        self.run_dir.pid_file(spec.name).write_text(
            json.dumps({"pid": proc.pid, "create_time": proc.create_time, "argv": spec.argv})
        )
        try:
            self.wait_healthy(spec, proc, timeout_s)
        except StackError:
            self.stop(spec.name, spec.stop_timeout_s)
            raise
        return proc, True

    def wait_healthy(self, spec: ManagedProcess, proc: RunningProcess, timeout_s: float) -> None:
        wait_until_healthy(
            spec.health, timeout_s, name=spec.name, alive=proc.alive, log=self.run_dir.log_file(spec.name)
        )

    def healthy(self, spec: ManagedProcess) -> bool:
        return is_healthy(spec.health)

    def stop(self, name: str, timeout_s: float = 20.0) -> bool:
        """Stop the process recorded under ``name``; True if one was running."""
        proc = self.running(name)
        if proc is not None:
            proc.stop(timeout_s)
        self.run_dir.pid_file(name).unlink(missing_ok=True)
        return proc is not None
