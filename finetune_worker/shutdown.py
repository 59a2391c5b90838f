"""Graceful stop of the finetune worker: SIGTERM or SIGINT ends it at the next safe point.

The signal handler only sets a flag. The worker looks at it where stopping leaves
nothing half-done, and raises :class:`ShutdownRequested` there:

- in ``finetune loop``, between ticks (the poll wait wakes up at once);
- between the stages of a cycle (prepare, train, gate + publish, deploy), the run
  state saved, so the next start resumes at that stage;
- between training steps: a training checkpoint of the last finished step is written
  first (``finetune_worker.train``), so no step is lost;
- between the gate's snapshot evaluations (nothing is published before the last one).

Publishing and deploying are never interrupted: a signal that arrives during a deploy
(download, verify, install, ``load_model``, registry pointer) takes effect after it,
so the pod's ``terminationGracePeriodSeconds`` must cover ``finetune_deploy_timeout_s``
(k8s/base/finetune/deployment.yaml). The lease is released on the way out
(``run_cycle_with_lease``'s ``finally``) and ``finetune loop`` exits 0.

A second SIGINT (Ctrl-C twice) interrupts at once, as Python does by default; that is
as safe as a crash (SIGKILL), which every stage already survives.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_event = threading.Event()
_received: list[str] = []


class ShutdownRequested(BaseException):
    """A stop signal arrived and the worker reached a safe point.

    A ``BaseException`` (like ``KeyboardInterrupt``), so the ``except Exception`` that
    keeps the loop alive through a failed cycle does not swallow it.
    """


def request(reason: str = "requested") -> None:
    """Ask the worker to stop at its next safe point (what the signal handler does)."""
    _received.append(reason)
    _event.set()


def requested() -> bool:
    return _event.is_set()


def reason() -> str | None:
    return _received[0] if _received else None


def event() -> threading.Event:
    """The flag as an Event: ``finetune loop`` waits on it between ticks."""
    return _event


def check(where: str) -> None:
    """Raise :class:`ShutdownRequested` if a stop was asked for; call only at a safe point."""
    if _event.is_set():
        raise ShutdownRequested(f"stopped by {reason()} {where}")


def reset() -> None:
    """Forget a stop request (tests; a process that handled one and goes on)."""
    _event.clear()
    _received.clear()


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - the signal module's signature
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and _event.is_set():
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    request(name)


@contextmanager
def handle_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[threading.Event]:
    """Install the handler for ``signals`` (main thread only) and restore the previous ones on exit."""
    previous = {sig: signal.signal(sig, _handler) for sig in signals}
    try:
        yield _event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
