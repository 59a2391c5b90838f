"""Canary by preference (finetune_worker/canary.py): the sequential test, the votes it reads, the stage,
and the gateway following the registry's canary record without a restart."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from buffer_helpers import vote_row
from feedback_helpers import InMemoryStore
from prometheus_client import REGISTRY

from finetune_worker.canary import (
    CanaryRunner,
    best_finite,
    confidence_bounds,
    decision_at,
    describe,
    log_evidence,
    mixed_pair_votes,
    outcome_of,
    sequential_test,
)
from finetune_worker.deploy import DeployError
from finetune_worker.gate import Check, GateReport
from finetune_worker.settings import FinetuneSettings
from musicrl.buffer import PreferenceBuffer, rows_to_parquet, segment_key
from musicrl.registry import Registry
from serving.services.experiments import ExperimentArm, LiveExperiment, arm_of_canary
from serving.services.generations import candidate_models
from serving.settings import GatewaySettings

pytestmark = pytest.mark.unit

ALPHA = 0.05
CAP = 400


# --------------------------------------------------------------------------- the sequential test


def _decision_table(cap: int, alpha: float) -> np.ndarray:
    """decision_at for every (wins, losses) with wins + losses <= cap: +1 promote, -1 roll back, 0 go on."""
    table = np.zeros((cap + 1, cap + 1), dtype=np.int8)
    for wins in range(cap + 1):
        for losses in range(cap + 1 - wins):
            decision = decision_at(wins, losses, alpha)
            table[wins, losses] = 0 if decision is None else 1 if decision == "promote" else -1
    return table


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return _decision_table(CAP, ALPHA)


def _simulate(table: np.ndarray, p: float, reps: int, seed: int) -> tuple[float, float, float, float]:
    """Share of canaries promoted, rolled back and inconclusive at the cap, and the median decided votes used,
    for a candidate that wins each decided vote with probability ``p``."""
    cap = table.shape[0] - 1
    wins_each = np.random.default_rng(seed).random((reps, cap)) < p
    wins = np.cumsum(wins_each, axis=1)
    losses = np.arange(1, cap + 1) - wins
    decisions = table[wins, losses]
    stopped = (decisions != 0).any(axis=1)
    first = np.argmax(decisions != 0, axis=1)
    outcome = np.where(stopped, decisions[np.arange(reps), first], 0)
    used = np.where(stopped, first + 1, cap)
    return (
        float((outcome == 1).mean()),
        float((outcome == -1).mean()),
        float((outcome == 0).mean()),
        float(np.median(used)),
    )


def test_error_rates_by_simulation_stay_below_alpha(table):
    """The stated error rates, checked on 4,000 simulated canaries per win rate (fixed seeds)."""
    promoted, rolled_back, _, _ = _simulate(table, 0.5, 4000, seed=1)
    assert promoted + rolled_back <= ALPHA  # at exactly 50 %, both errors together
    promoted_worse, _, _, _ = _simulate(table, 0.45, 4000, seed=2)
    _, rolled_back_better, _, _ = _simulate(table, 0.55, 4000, seed=3)
    assert promoted_worse <= ALPHA and rolled_back_better <= ALPHA
    assert promoted_worse < promoted  # the further below 50 %, the rarer a wrong promotion


def test_power_within_the_vote_cap(table):
    promoted, rolled_back, _, median_used = _simulate(table, 0.65, 2000, seed=4)
    assert promoted >= 0.99 and rolled_back == 0 and median_used < 150
    promoted, rolled_back, _, median_used = _simulate(table, 0.30, 2000, seed=5)
    assert rolled_back >= 0.99 and promoted == 0 and median_used < 80
    promoted, _, inconclusive, _ = _simulate(table, 0.60, 2000, seed=6)
    assert promoted >= 0.8 and inconclusive <= 0.2


def test_a_wilson_interval_checked_after_every_vote_would_not_keep_its_error_rate():
    """Why a confidence sequence: looking at a fixed-sample 95 % interval after every vote promotes or rolls
    back a 50 % candidate far more often than 5 %."""
    rng = np.random.default_rng(7)
    cap, reps, z = CAP, 2000, 1.959964
    wins = np.cumsum(rng.random((reps, cap)) < 0.5, axis=1)
    n = np.arange(1, cap + 1)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    excluded = ((centre - half > 0.5) | (centre + half < 0.5))[:, 9:]  # from the 10th vote on
    assert excluded.any(axis=1).mean() > 3 * ALPHA


def test_bounds_are_the_confidence_sequence_and_match_the_decision():
    threshold = math.log(1 / ALPHA)
    for wins, losses in [(0, 0), (1, 0), (0, 7), (12, 3), (40, 20), (55, 45), (150, 120), (30, 90)]:
        lower, upper = confidence_bounds(wins, losses, ALPHA)
        n = wins + losses
        assert 0.0 <= lower <= upper <= 1.0
        if n:
            assert lower <= wins / n <= upper
            for bound in (lower, upper):
                if 1e-9 < bound < 1 - 1e-9:
                    assert log_evidence(wins, losses, bound) == pytest.approx(threshold, abs=1e-6)
        expected = "promote" if lower > 0.5 else "rollback" if upper < 0.5 else None
        assert decision_at(wins, losses, ALPHA) == expected
    with pytest.raises(ValueError):
        confidence_bounds(-1, 2, ALPHA)
    with pytest.raises(ValueError):
        log_evidence(1, 1, 1.0)


def test_sequential_test_stops_at_the_first_crossing_and_ignores_ties_and_later_votes():
    votes = ["tie", "win", "win", "tie"] + ["win"] * 60 + ["loss"] * 100
    result = sequential_test(votes, ALPHA, max_votes=CAP)
    assert result.decision == "promote" and result.losses == 0 and result.ties == 2
    assert decision_at(result.wins - 1, 0, ALPHA) is None  # one vote earlier it had not decided
    assert result.lower > 0.5 and result.used == result.wins + 2
    # The same start, then an even split to the cap: inconclusive, exactly max_votes decided votes used.
    even = sequential_test(["win", "loss"] * 300, ALPHA, max_votes=50)
    assert even.decision is None and even.at_cap and even.decided == 50 and even.win_rate == 0.5
    assert sequential_test(["loss"] * 40, ALPHA, max_votes=CAP).decision == "rollback"
    with pytest.raises(ValueError):
        sequential_test(["maybe"], ALPHA, max_votes=10)


# --------------------------------------------------------------------------- votes from the buffer


T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _row(
    i: int, choice: str, version_a: str, version_b: str, experiment: str | None, event_id: str | None = None
) -> dict:
    received = T0 + timedelta(seconds=i)
    return vote_row(
        event_id=event_id or f"e{i:04d}",
        generation_id=f"{i:032d}",
        choice=choice,
        received=received,
        version_a=version_a,
        version_b=version_b,
        offset=i,
        experiment=experiment,
    )


def _put_segment(store: InMemoryStore, rows: list[dict], partition: int = 0) -> None:
    first, last = rows[0]["kafka_offset"], rows[-1]["kafka_offset"]
    key = segment_key(rows[0]["policy_version"], partition, first, last)
    store.put_bytes(store.config.bucket_buffer, key, rows_to_parquet(rows))


def test_outcome_of_maps_positions_to_the_candidate():
    assert outcome_of({"policy_version_a": "5", "policy_version_b": "4", "choice": "a"}, "5", "4") == "win"
    assert outcome_of({"policy_version_a": "5", "policy_version_b": "4", "choice": "b"}, "5", "4") == "loss"
    assert outcome_of({"policy_version_a": "4", "policy_version_b": "5", "choice": "b"}, "5", "4") == "win"
    assert (
        outcome_of({"policy_version_a": "4", "policy_version_b": "5", "choice": "tie", "is_tie": True}, "5", "4")
        == "tie"
    )
    assert outcome_of({"policy_version_a": "5", "policy_version_b": "5", "choice": "a"}, "5", "4") is None
    assert outcome_of({"policy_version_a": "3", "policy_version_b": "5", "choice": "a"}, "5", "4") is None


def test_mixed_pair_votes_reads_the_canary_rows_in_arrival_order_once_each():
    store = InMemoryStore()
    rows = [
        _row(0, "b", "4", "5", "canary-v5-x"),  # win
        _row(1, "b", "5", "4", "canary-v5-x"),  # loss
        _row(2, "tie", "5", "4", "canary-v5-x"),  # tie
        _row(3, "a", "5", "5", "canary-v5-x"),  # fallback pair: both clips from the candidate, not a sample
        _row(4, "a", "5", "4", "other-experiment"),  # another experiment's pair
        _row(5, "a", "5", "4", None),  # a hot swap's mixed pair, no experiment
    ]
    _put_segment(store, rows[:3])
    _put_segment(store, rows[3:])
    _put_segment(
        store, [_row(1, "b", "5", "4", "canary-v5-x") | {"kafka_offset": 99}], partition=1
    )  # a duplicate event
    _put_segment(store, [_row(6, "a", "4", "4", "canary-v5-x")])  # the current policy's partition: not read
    votes = mixed_pair_votes(PreferenceBuffer(store), "canary-v5-x", "5", "4")
    assert votes == [("e0000", "win"), ("e0001", "loss"), ("e0002", "tie")]
    assert mixed_pair_votes(PreferenceBuffer(InMemoryStore()), "canary-v5-x", "5", "4") == []


# --------------------------------------------------------------------------- the stage


class FakeDeployer:
    def __init__(self, registry: Registry, fail_promote: bool = False):
        self.registry = registry
        self.calls: list[tuple] = []
        self.challenger: str | None = None
        self.fail_promote = fail_promote

    def deploy_challenger(self, version, challenger):
        self.calls.append(("challenger", version, challenger))
        self.challenger = version
        return {"version": version, "model_name": challenger, "deploy_s": 0.1}

    def challenger_ready(self, version, challenger):
        return self.challenger == version

    def retire_challenger(self, challenger):
        self.calls.append(("retire", challenger))
        self.challenger = None

    def deploy(self, version):
        self.calls.append(("deploy", version))
        if self.fail_promote:
            raise DeployError("Triton did not load it")
        self.registry.set_current("generator", version)
        return {"version": version, "deploy_s": 0.2}


class Clock:
    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def _registry_with_versions(tmp_path, store: InMemoryStore) -> Registry:
    registry = Registry(store)
    for version in ("4", "5"):
        directory = tmp_path / f"v{version}"
        directory.mkdir()
        (directory / "weights.pt").write_bytes(version.encode())
        registry.publish("generator", directory, version=version)
    registry.set_current("generator", "4")
    return registry


def _runner(registry, store, deployer, clock, votes_by_poll, **settings):
    """A runner whose every sleep lands the next batch of votes in the buffer (as the consumer would)."""
    s = FinetuneSettings(
        finetune_promotion="canary",
        finetune_canary_max_votes=settings.pop("max_votes", 400),
        finetune_canary_max_s=settings.pop("max_s", 3600.0),
        **settings,
    )
    offset = [0]

    def land(record_experiment: str) -> None:
        if not votes_by_poll:
            return
        batch = votes_by_poll.pop(0)
        rows = []
        for outcome in batch:
            i = offset[0]
            offset[0] += 1
            choice = {"win": "a", "loss": "b", "tie": "tie"}[outcome]
            rows.append(_row(i, choice, "5", "4", record_experiment))
        if rows:
            _put_segment(store, rows)

    runner = CanaryRunner(s, registry, PreferenceBuffer(store), deployer, clock=clock, poll_s=30.0)

    def sleep(seconds: float) -> None:
        clock.now += seconds
        land(runner._experiment)

    runner.sleep = sleep
    return runner, land


def test_a_better_candidate_is_promoted_by_the_votes_and_the_challenger_retired(tmp_path):
    store, clock = InMemoryStore(), Clock()
    registry = _registry_with_versions(tmp_path, store)
    deployer = FakeDeployer(registry)
    rng = np.random.default_rng(11)
    batches = [["win" if rng.random() < 0.8 else "loss" for _ in range(15)] for _ in range(20)]
    runner, _ = _runner(registry, store, deployer, clock, batches)
    record = runner.start("5", "4", run_id="r1")
    runner._experiment = record["experiment"]
    # While it runs, the gateway (which reads the pointer) serves current vs candidate in the canary's share.
    arm = arm_of_canary(registry.canary("generator"), now=clock.now)
    assert arm == ExperimentArm(record["experiment"], "generator_challenger", 0.5, "canary", "5")
    updates = []
    final = runner.run(record, on_update=lambda r: updates.append(r["state"]))
    assert final["state"] == "promoted" and final["decision"] == "promote" and final["lower"] > 0.5
    assert registry.current("generator") == "5"
    assert deployer.calls[0] == ("challenger", "5", "generator_challenger")
    assert deployer.calls[-2:] == [("deploy", "5"), ("retire", "generator_challenger")]
    stored = registry.canaries("generator")
    assert len(stored) == 1 and stored[0]["state"] == "promoted"
    assert len(stored[0]["event_ids"]) == stored[0]["votes"]["used"] > 0  # the votes behind the decision
    assert "event_ids" not in registry.canary("generator")  # the polled pointer stays small
    assert arm_of_canary(registry.canary("generator"), now=clock.now) is None  # the experiment is over
    assert "promoted" in describe(stored[0])


def test_a_worse_candidate_is_rolled_back_and_current_stays(tmp_path):
    store, clock = InMemoryStore(), Clock()
    registry = _registry_with_versions(tmp_path, store)
    deployer = FakeDeployer(registry)
    batches = [["loss", "loss", "win", "loss", "tie"] * 3 for _ in range(30)]
    runner, _ = _runner(registry, store, deployer, clock, batches)
    record = runner.start("5", "4")
    runner._experiment = record["experiment"]
    before = REGISTRY.get_sample_value("musicrl_finetune_canaries_total", {"outcome": "rolled_back"}) or 0.0
    final = runner.run(record)
    assert final["state"] == "rolled_back" and final["upper"] < 0.5
    assert REGISTRY.get_sample_value("musicrl_finetune_canaries_total", {"outcome": "rolled_back"}) == before + 1
    assert registry.current("generator") == "4" and ("deploy", "5") not in deployer.calls
    assert deployer.calls[-1] == ("retire", "generator_challenger")


def test_caps_end_the_canary_inconclusive_and_keep_current(tmp_path):
    store, clock = InMemoryStore(), Clock()
    registry = _registry_with_versions(tmp_path, store)
    # Vote cap: an even split never decides.
    runner, _ = _runner(
        registry, store, FakeDeployer(registry), clock, [["win", "loss"] * 10 for _ in range(10)], max_votes=60
    )
    record = runner.start("5", "4")
    runner._experiment = record["experiment"]
    final = runner.run(record)
    assert (
        final["state"] == "inconclusive" and final["votes"]["decided"] == 60 and "vote cap" in final["decision_reason"]
    )
    # Time cap: no votes at all; 3 polls of 30 s against a 90 s cap.
    runner, _ = _runner(registry, store, FakeDeployer(registry), clock, [], max_s=90.0)
    record = runner.start("5", "4")
    runner._experiment = record["experiment"]
    final = runner.run(record)
    assert final["state"] == "inconclusive" and "time cap" in final["decision_reason"] and final["polls"] == 4
    assert registry.current("generator") == "4"


def test_a_failed_promotion_keeps_current_and_records_it(tmp_path):
    store, clock = InMemoryStore(), Clock()
    registry = _registry_with_versions(tmp_path, store)
    deployer = FakeDeployer(registry, fail_promote=True)
    runner, _ = _runner(registry, store, deployer, clock, [["win"] * 80])
    record = runner.start("5", "4")
    runner._experiment = record["experiment"]
    final = runner.run(record)
    assert final["state"] == "deploy_failed" and registry.current("generator") == "4"
    assert deployer.calls[-1] == ("retire", "generator_challenger")


def test_a_resumed_canary_reloads_a_lost_challenger_and_keeps_its_start(tmp_path):
    store, clock = InMemoryStore(), Clock()
    registry = _registry_with_versions(tmp_path, store)
    deployer = FakeDeployer(registry)
    runner, _ = _runner(registry, store, deployer, clock, [["win"] * 80])
    record = runner.start("5", "4")
    runner._experiment = record["experiment"]
    started = record["started_epoch"]
    deployer.challenger = None  # Triton restarted while the worker was down
    final = runner.run(dict(record))
    assert [c for c in deployer.calls if c[0] == "challenger"] == [("challenger", "5", "generator_challenger")] * 2
    assert final["state"] == "promoted" and final["started_epoch"] == started


def test_canary_only_serves_the_best_finite_snapshot_when_none_passed_the_gate():
    def report(reward: float, finite: bool = True) -> GateReport:
        checks = [Check("finite", finite, ""), Check("reward_improved", False, "")]
        return GateReport(False, checks, {"reward": reward, "kl": 1.0}, {"reward": 0.0})

    assert best_finite([report(0.1), report(0.9, finite=False), report(0.5)]) == 2
    assert best_finite([report(0.9, finite=False)]) is None


def test_promotion_settings_validate():
    assert FinetuneSettings().finetune_promotion == "gate"  # the default keeps the offline gate alone
    for bad in (
        {"finetune_promotion": "votes"},
        {"finetune_canary_share": 0.0},
        {"finetune_canary_alpha": 0.5},
        {"finetune_canary_max_votes": 0},
    ):
        with pytest.raises(ValueError):
            FinetuneSettings(**bad)


# --------------------------------------------------------------------------- the gateway follows the record


def _record(**changes) -> dict:
    now = datetime.now(UTC)
    return {
        "canary_id": "c1",
        "state": "running",
        "experiment": "canary-v5-abc",
        "model_name": "generator_challenger",
        "share": 0.5,
        "version": "5",
        "ends_by": (now + timedelta(hours=1)).isoformat(),
    } | changes


def test_arm_of_canary_refuses_what_it_cannot_trust():
    assert arm_of_canary(_record()).name == "canary-v5-abc"
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    for bad in (
        {"state": "promoted"},
        {"share": 0},
        {"share": 1.5},
        {"share": True},
        {"model_name": ""},
        {"ends_by": past},
        {"ends_by": "soon"},
        {"experiment": None},
    ):
        assert arm_of_canary(_record(**bad)) is None, bad
    assert arm_of_canary(["not", "a", "dict"]) is None


def test_the_gateway_starts_and_stops_the_canary_without_a_restart():
    store = InMemoryStore()
    settings = GatewaySettings(gateway_canary_poll_s=5.0)
    ticks = [0.0]
    live = LiveExperiment(settings, store, clock=lambda: ticks[0])

    async def arm_after(seconds: float):
        ticks[0] += seconds
        first = await live.current()
        await asyncio.sleep(0)  # let the background refresh run
        if live._refreshing is not None:
            await live._refreshing
        return first, await live.current()

    assert asyncio.run(arm_after(0)) == (None, None)
    Registry(store).record_canary("generator", _record())
    # Within the poll interval the cached "no canary" stands; after it, the record is read.
    assert asyncio.run(arm_after(1.0))[1] is None
    _, arm = asyncio.run(arm_after(5.0))
    assert arm is not None and arm.name == "canary-v5-abc" and arm.source == "canary"
    experiment, models = candidate_models(settings, 3, 2, arm)
    share_hits = sum(candidate_models(settings, seed, 2, arm)[0] is not None for seed in range(400))
    assert 150 < share_hits < 250  # half of the requests
    assert experiment in (None, "canary-v5-abc") and set(models) <= {"generator", "generator_challenger"}
    store.down = True  # the store unreachable: the last record stands (until its ends_by)
    assert asyncio.run(arm_after(5.0))[1] == arm
    store.down = False
    Registry(store).record_canary("generator", _record(state="rolled_back"))
    assert asyncio.run(arm_after(5.0))[1] is None


def test_the_settings_experiment_runs_when_no_canary_does_and_poll_zero_ignores_the_registry():
    store = InMemoryStore()
    Registry(store).record_canary("generator", _record())
    static = GatewaySettings(gateway_experiment_name="v4-vs-v3", gateway_canary_poll_s=0)
    assert asyncio.run(LiveExperiment(static, store).current()).name == "v4-vs-v3"
    assert candidate_models(static, 1, 2)[0] == "v4-vs-v3"  # no arm given: the settings' experiment


def test_history_shows_each_canary_with_its_decision_and_votes(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import musicrl.storage
    from finetune_worker.cli import app

    store, clock = InMemoryStore(), Clock()
    registry = _registry_with_versions(tmp_path, store)
    runner, _ = _runner(registry, store, FakeDeployer(registry), clock, [["loss"] * 60])
    record = runner.start("5", "4")
    runner._experiment = record["experiment"]
    runner.run(record)
    monkeypatch.setattr(musicrl.storage, "ObjectStore", lambda settings: store)
    text = CliRunner().invoke(app, ["history"])
    assert text.exit_code == 0, text.output
    assert "canary v5 vs v4" in text.output and "rolled_back" in text.output and "upper bound" in text.output
    as_json = CliRunner().invoke(app, ["history", "--json"])
    canaries = json.loads(as_json.output)["canaries"]
    assert [c["state"] for c in canaries] == ["rolled_back"] and canaries[0]["votes"]["losses"] > 0


def test_the_cycle_stage_runs_the_canary_and_resumes_it_after_a_stop(tmp_path):
    from types import SimpleNamespace

    from finetune_worker import shutdown
    from finetune_worker.canary import run_canary_stage
    from finetune_worker.cycle import RunState

    store = InMemoryStore()  # run_canary_stage builds its runner on the real clock: no Clock to inject
    registry = _registry_with_versions(tmp_path, store)
    deployer = FakeDeployer(registry)
    saved = []
    cycle = SimpleNamespace(
        settings=FinetuneSettings(finetune_promotion="both", finetune_poll_interval_s=0.01),
        registry=registry,
        buffer=PreferenceBuffer(store),
        deployer=lambda: deployer,
        guard=lambda: None,
        save_state=lambda state: saved.append(state.status),
    )
    state = RunState(
        run_id="r1",
        created_at="2026-12-02T00:00:00Z",
        stage="U",
        trainer="reinforce",
        parent_version="4",
        reference_version="4",
        candidate_version="5",
        status="published",
    )
    shutdown.request("SIGTERM")  # stops at the first safe point between polls, after the canary started
    try:
        with pytest.raises(shutdown.ShutdownRequested):
            run_canary_stage(cycle, state)
    finally:
        shutdown.reset()
    assert state.status == "canary" and state.canary["state"] == "running" and "event_ids" not in state.canary
    assert arm_of_canary(registry.canary("generator")) is not None  # the gateway keeps the experiment on meanwhile
    started = {k: state.canary[k] for k in ("canary_id", "experiment", "started_epoch")}
    _put_segment(store, [_row(i, "a", "5", "4", state.canary["experiment"]) for i in range(60)])
    run_canary_stage(cycle, state)  # resumed: same canary, no second challenger deploy, decided on the votes
    assert {k: state.canary[k] for k in started} == started  # same start time: the time cap counts from it
    assert state.status == "deployed" and state.canary["state"] == "promoted" and registry.current("generator") == "5"
    assert [c[0] for c in deployer.calls] == ["challenger", "deploy", "retire"]
    assert len(registry.canaries("generator")) == 1
