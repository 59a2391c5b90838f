"""SIGTERM/SIGINT stop the finetune worker at a safe point (issue 16): between training steps (checkpointed),
between a cycle's stages, after a deploy, never inside one; the lease is released and `finetune loop` exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune_worker import shutdown
from finetune_worker.cycle import FinetuneCycle, RunState
from finetune_worker.train import stop_between_steps
from finetune_worker.trainers.base import DistributedContext, OnlineTrainer, TrainerArgs

pytestmark = pytest.mark.unit

HELPER = Path(__file__).with_name("finetune_shutdown_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_flag():
    shutdown.reset()
    yield
    shutdown.reset()


# ----------------------------------------------------------------------------- the handler


def test_the_handler_only_sets_a_flag_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with shutdown.handle_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert stop.is_set() and shutdown.requested() and shutdown.reason() == "SIGTERM"
        with pytest.raises(shutdown.ShutdownRequested, match="SIGTERM before step 2"):
            shutdown.check("before step 2")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # already stopping: Ctrl-C again stops now
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    assert not issubclass(shutdown.ShutdownRequested, Exception)  # `except Exception` never swallows it


# ----------------------------------------------------------------------------- the real loop, a fake cycle


def _worker(tmp_path: Path, mode: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MUSICRL_FINETUNE_WORK_DIR": str(tmp_path),
        "MUSICRL_FINETUNE_POLL_INTERVAL_S": "0.2",
        "MUSICRL_LOG_JSON": "true",
        "MUSICRL_FINETUNE_METRICS_PORT": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(tmp_path), mode],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(tmp_path: Path, process: subprocess.Popen, predicate, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(_events(tmp_path)):
        if process.poll() is not None:
            pytest.fail(f"the worker exited early ({process.returncode}): {process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the worker did not get there in time")
        time.sleep(0.05)


def _lease(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "store" / "musicrl-models" / "locks" / "finetune.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_loop_between_training_steps_and_releases_the_lease(tmp_path, sig):
    process = _worker(tmp_path, "train")
    _wait_for(tmp_path, process, lambda events: sum(e["event"] == "step" for e in events) >= 3)
    assert _lease(tmp_path)["expires_at"] > time.time()  # held while the cycle runs
    process.send_signal(sig)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
    events = _events(tmp_path)
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert 3 <= steps[-1] < 100 and steps == list(range(1, steps[-1] + 1))  # stopped at the next step boundary
    assert not [e for e in events if e["event"] == "deploy_started"]
    assert _lease(tmp_path)["expires_at"] == 0.0  # released: another worker may take over at once
    assert "loop.stopping" in output and signal.Signals(sig).name in output


def test_a_signal_during_a_deploy_waits_for_it_then_exits_zero(tmp_path):
    process = _worker(tmp_path, "deploy")
    _wait_for(tmp_path, process, lambda events: any(e["event"] == "deploy_started" for e in events))
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
    events = {e["event"]: e["t"] for e in _events(tmp_path)}
    assert events["deploy_done"] > signalled  # the deploy ran to its end after the signal
    assert events["exited"] - events["deploy_done"] < 5  # and the worker left right after, without another cycle
    assert _lease(tmp_path)["expires_at"] == 0.0


# ----------------------------------------------------------------------------- training steps


class CountingTrainer(OnlineTrainer):
    """A trainer whose step adds 1 to a weight; asks for a stop while running step ``stop_at``."""

    def __init__(self, checkpoint_dir, steps: int = 10, stop_at: int | None = None):
        args = TrainerArgs(
            steps=steps,
            batch_size=1,
            seed=0,
            device="cpu",
            mixed_precision=False,
            max_grad_norm=1.0,
            checkpoint_every=5,
            candidate_every=5,
        )
        super().__init__(args, checkpoint_dir, DistributedContext())
        self.weight = torch.zeros(1)
        self.stop_at = stop_at
        self.calls = 0

    def step(self):
        self.calls += 1
        self.weight += 1
        if self.global_step + 1 == self.stop_at:
            shutdown.request("SIGTERM")
        return {"loss": float(self.weight)}

    def state_dict(self):
        return {"weight": self.weight.clone()}

    def load_state_dict(self, state):
        self.weight = state["weight"].clone()

    @property
    def model(self):
        return torch.nn.Linear(1, 1)


def test_training_stops_between_steps_with_a_checkpoint_and_resumes_there(tmp_path):
    trainer = CountingTrainer(tmp_path, stop_at=3)
    stop_between_steps(trainer, DistributedContext())
    with pytest.raises(shutdown.ShutdownRequested, match="after step 3"):
        trainer.train()
    assert trainer.calls == 3  # step 3 finished, step 4 never started
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == 3 and float(state["weight"]) == 3.0 and len(state["history"]) == 3

    shutdown.reset()
    resumed = CountingTrainer(tmp_path)
    stop_between_steps(resumed, DistributedContext())
    out = resumed.train()
    assert out.resumed_from == 3 and resumed.calls == 7 and float(resumed.weight) == 10.0 and out.step == 10


# ----------------------------------------------------------------------------- stages of a cycle


def _cycle(tmp_path: Path, status: str) -> tuple[FinetuneCycle, list[str]]:
    cycle = FinetuneCycle.__new__(FinetuneCycle)
    cycle.settings = type("S", (), {"finetune_auto_deploy": True})()
    cycle.run_dir = tmp_path / "run"
    cycle.run_dir.mkdir()
    ran: list[str] = []

    def stage(name: str, next_status: str):
        def run(state):
            ran.append(name)
            state.status = next_status

        return run

    cycle.train, cycle.gate_and_publish, cycle.deploy = (
        stage("train", "trained"),
        stage("gate", "published"),
        stage("deploy", "deployed"),
    )
    cycle.finish = lambda state: state.model_dump()
    cycle.save_state(
        RunState(
            run_id="r",
            status=status,
            created_at="now",
            stage="U",
            trainer="reinforce",
            parent_version="1",
            reference_version="1",
        )
    )
    return cycle, ran


def test_a_cycle_stops_before_its_next_stage_and_resumes_there(tmp_path):
    cycle, ran = _cycle(tmp_path, "trained")
    shutdown.request("SIGTERM")
    with pytest.raises(shutdown.ShutdownRequested, match="before gating"):
        cycle.run_once()
    assert ran == [] and cycle.load_state().status == "trained"
    shutdown.reset()
    assert cycle.run_once()["status"] == "deployed" and ran == ["gate", "deploy"]


def test_a_signal_during_a_stage_stops_before_the_next_one(tmp_path):
    cycle, ran = _cycle(tmp_path, "training")
    train = cycle.train

    def train_then_signal(state):
        train(state)
        shutdown.request("SIGTERM")  # arrives while training: training finishes its step, the gate waits

    cycle.train = train_then_signal
    with pytest.raises(shutdown.ShutdownRequested):
        cycle.run_once()
    assert ran == ["train"] and cycle.load_state().status == "trained"
