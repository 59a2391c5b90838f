"""Canary by preference: users' votes on mixed pairs promote a candidate or roll it back (docs/canary.md).

A published candidate is served as the challenger model in Triton beside the current policy; the
gateway, which polls the registry's canary record, makes a share of its pairs current vs candidate
(one clip each, positions drawn at random). Each vote on such a pair is a win of the candidate, a
loss, or a tie. The worker reads those votes from the on-policy buffer in the order they arrived
and runs a sequential test on the decided ones (wins and losses; ties are recorded, they carry no
information about which clip is preferred):

**The test: a time-uniform confidence sequence for the win rate** (Robbins' method of mixtures,
as in Howard, Ramdas et al. 2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences"). For a win rate p0, the mixture likelihood ratio of the first n decided votes (W wins,
L losses) under a Beta(a, a) mixing distribution,

    M_n(p0) = B(a + W, a + L) / B(a, a) / (p0^W (1 - p0)^L),

is a nonnegative martingale with mean 1 if p0 is the true win rate, so by Ville's inequality
P(M_n(p0) >= 1/alpha for some n) <= alpha. The set {p0 : M_n(p0) < 1/alpha} is therefore a
confidence sequence: it holds the true win rate at every n at once with probability >= 1 - alpha,
which is what makes it safe to look at the votes after every poll (a Wilson interval checked
repeatedly is not: its error grows with every look). It is an interval around W / n.

- **promote** when its lower bound is above 0.5 (equivalently M_n(0.5) >= 1/alpha with W > L);
- **roll back** when its upper bound is below 0.5;
- **inconclusive** when ``finetune_canary_max_votes`` decided votes or ``finetune_canary_max_s``
  seconds are reached first: the current policy stays.

Error rates, stated: a candidate whose true win rate is at most 50 % is promoted with probability
at most alpha; one whose win rate is at least 50 % is rolled back with probability at most alpha
(at exactly 50 % both together at most alpha). That holds for any number of looks and up to any
cap; the caps only make it smaller. Power depends on the true win rate and the cap; with the
defaults (alpha 0.05, a = ``PRIOR_STRENGTH`` = 10, 400 votes) simulation gives (tests/unit/test_finetune_canary.py,
docs/canary.md): win rate 0.65 promoted in all of 4,000 simulated canaries after a median of 87 decided votes,
0.60 in 88.5 % (median 188 votes); at 0.50, 1.1 % promoted and 1.1 % rolled back. The assumption
behind it: votes are independent draws from the users' population (one user's many votes are not;
the gateway's per-user vote rate limits that).

Why not Wald's SPRT: it is optimal between two point hypotheses (say 0.45 vs 0.55), but its
error rates are stated only at those two points and it says nothing about a win rate's bounds;
the confidence sequence decides exactly "lower bound above 50 %" and stays valid whatever the true
win rate is. The mixing Beta(10, 10) (standard deviation 0.11 around 0.5) puts its weight on the
effects one cycle makes (win rates 0.55 to 0.75 in the closed-loop experiment); it changes how
fast a decision comes, never the error rates.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from prometheus_client import Counter

from finetune_worker import shutdown
from finetune_worker.deploy import CheckpointRejected, Deployer, DeployError
from musicrl.buffer import PreferenceBuffer, newest_policy
from musicrl.logging import get_logger
from musicrl.registry import Registry

log = get_logger(__name__)

GENERATOR = "generator"
PRIOR_STRENGTH = 10.0  # a of the Beta(a, a) mixing distribution (see the module docstring)
Outcome = Literal["win", "loss", "tie"]
Decision = Literal["promote", "rollback"]
# Canary record states; "running" is the only one the gateway acts on.
STATES = ("running", "promoted", "rolled_back", "inconclusive", "deploy_failed", "rejected")
# The cycle's status after each decided canary.
RUN_STATUS = {
    "promoted": "deployed",
    "rolled_back": "rolled_back",
    "inconclusive": "inconclusive",
    "deploy_failed": "deploy_failed",
    "rejected": "rejected",
}
CANARIES = Counter(
    "musicrl_finetune_canaries",
    "Canaries decided, by outcome (promoted, rolled_back, inconclusive, deploy_failed).",
    ["outcome"],
)
VOTE_COLUMNS = ["event_id", "experiment", "choice", "is_tie", "policy_version_a", "policy_version_b", "received_at"]


def promotion(settings) -> str:
    """``finetune_promotion`` (``gate`` for a settings object without it: the behaviour before canaries)."""
    return getattr(settings, "finetune_promotion", "gate")


def canary_enabled(settings) -> bool:
    return promotion(settings) in ("canary", "both")


def gate_enforced(settings) -> bool:
    return promotion(settings) in ("gate", "both")


# --------------------------------------------------------------------------- the sequential test


def _lbeta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def log_evidence(wins: int, losses: int, p0: float = 0.5, prior: float = PRIOR_STRENGTH) -> float:
    """log M_n(p0): the Beta(prior, prior) mixture likelihood ratio of the votes against win rate ``p0``."""
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    return _lbeta(prior + wins, prior + losses) - _lbeta(prior, prior) - wins * math.log(p0) - losses * math.log1p(-p0)


def confidence_bounds(wins: int, losses: int, alpha: float, prior: float = PRIOR_STRENGTH) -> tuple[float, float]:
    """(lower, upper) of the confidence sequence {p0 : M_n(p0) < 1/alpha} after ``wins`` and ``losses``."""
    if wins < 0 or losses < 0:
        raise ValueError("vote counts are not negative")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = wins + losses
    if n == 0:
        return 0.0, 1.0
    threshold = math.log(1.0 / alpha)
    centre = min(max(wins / n, 1e-12), 1 - 1e-12)  # inside the set: M_n at the MLE is at most 1

    def outside(p: float) -> bool:
        return log_evidence(wins, losses, p, prior) >= threshold

    def boundary(inner: float, outer: float, edge: float) -> float:
        if not outside(outer):  # the set reaches the edge (no win, or no loss, yet)
            return edge
        for _ in range(60):
            middle = (inner + outer) / 2
            inner, outer = (inner, middle) if outside(middle) else (middle, outer)
        return (inner + outer) / 2

    return boundary(centre, 1e-12, 0.0), boundary(centre, 1 - 1e-12, 1.0)


def decision_at(wins: int, losses: int, alpha: float, prior: float = PRIOR_STRENGTH) -> Decision | None:
    """ "promote" when the lower bound is above 0.5, "rollback" when the upper bound is below, else None."""
    if wins == losses or log_evidence(wins, losses, 0.5, prior) < math.log(1.0 / alpha):
        return None
    return "promote" if wins > losses else "rollback"


@dataclass
class SequentialResult:
    """Where the test stopped on a sequence of votes."""

    decision: Decision | None  # None: no decision (yet, or at the vote cap)
    wins: int
    losses: int
    ties: int
    at_cap: bool  # the vote cap was reached without a decision
    used: int  # votes (ties included) up to the stopping point
    lower: float
    upper: float

    @property
    def decided(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.decided if self.decided else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decided": self.decided, "win_rate": self.win_rate}


def sequential_test(
    outcomes: Iterable[Outcome], alpha: float, max_votes: int, prior: float = PRIOR_STRENGTH
) -> SequentialResult:
    """Walk the votes in arrival order and stop at the first decision or at ``max_votes`` decided votes.

    The result does not depend on how often the worker looked: the stopping point is a function of
    the sequence. Votes after the stopping point are not used.
    """
    wins = losses = ties = used = 0
    decision: Decision | None = None
    for outcome in outcomes:
        if wins + losses >= max_votes:
            break
        used += 1
        if outcome == "tie":
            ties += 1
            continue
        if outcome == "win":
            wins += 1
        elif outcome == "loss":
            losses += 1
        else:
            raise ValueError(f"unknown vote outcome {outcome!r}")
        decision = decision_at(wins, losses, alpha, prior)
        if decision is not None:
            break
    lower, upper = confidence_bounds(wins, losses, alpha, prior)
    return SequentialResult(
        decision, wins, losses, ties, decision is None and wins + losses >= max_votes, used, lower, upper
    )


# --------------------------------------------------------------------------- votes from the buffer


def outcome_of(row: dict[str, Any], candidate: str, baseline: str) -> Outcome | None:
    """The candidate's result in one buffer row of a mixed pair, or None when the row is not one."""
    version_a, version_b = str(row.get("policy_version_a")), str(row.get("policy_version_b"))
    if {version_a, version_b} != {candidate, baseline} or candidate == baseline:
        return None
    if row.get("is_tie") or row.get("choice") == "tie":
        return "tie"
    if row.get("choice") not in ("a", "b"):
        return None
    chosen = version_a if row["choice"] == "a" else version_b
    return "win" if chosen == candidate else "loss"


def mixed_pair_votes(
    buffer: PreferenceBuffer, experiment: str, candidate: str, baseline: str
) -> list[tuple[str, Outcome]]:
    """(event id, outcome) of every vote on the canary's mixed pairs, in arrival order.

    A mixed pair's row lands in the buffer partition of the newer of its two versions (``policy_version``),
    so one partition is read; the rows are those the gateway stamped with the canary's experiment name.
    """
    policy = newest_policy(candidate, baseline)
    if not buffer.segments([policy]):
        return []
    table = buffer.read(min_policy=policy, max_policy=policy, columns=VOTE_COLUMNS)  # deduplicated, by received_at
    votes = []
    for row in table.to_pylist():
        if row.get("experiment") != experiment:
            continue
        outcome = outcome_of(row, candidate, baseline)
        if outcome is not None:
            votes.append((row["event_id"], outcome))
    return votes


# --------------------------------------------------------------------------- the stage


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class CanaryRunner:
    """Serve a candidate as the challenger, wait for the votes, decide, then promote or retire it.

    Every change of the canary's state is written to the registry (``Registry.record_canary``) and
    handed to ``on_update`` (the cycle saves it in its run state), so a worker killed at any point
    resumes the same canary: same experiment name, same start time (the time cap counts from it).
    """

    def __init__(
        self,
        settings,
        registry: Registry,
        buffer: PreferenceBuffer,
        deployer: Deployer,
        guard: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
        poll_s: float | None = None,
    ):
        self.settings = settings
        self.registry = registry
        self.buffer = buffer
        self.deployer = deployer
        self.guard = guard
        self.clock = clock
        self.poll_s = settings.finetune_poll_interval_s if poll_s is None else poll_s
        self.sleep = sleep or (lambda seconds: shutdown.event().wait(seconds))

    # ---- start

    def start(self, version: str, baseline: str, run_id: str | None = None) -> dict[str, Any]:
        """Load the candidate as the challenger, then write the ``running`` record the gateway acts on."""
        s = self.settings
        version, baseline = str(version), str(baseline)
        if version == baseline:
            raise ValueError(f"the candidate {version} is the current version")
        self.guard()
        deploy = self.deployer.deploy_challenger(version, s.finetune_canary_model_name)
        now = self.clock()
        canary_id = f"{int(now)}-v{version}-{uuid.uuid4().hex[:6]}"
        record = {
            "canary_id": canary_id,
            "run_id": run_id,
            "kind": GENERATOR,
            "version": version,
            "baseline_version": baseline,
            "experiment": f"canary-v{version}-{canary_id.rsplit('-', 1)[1]}",
            "model_name": s.finetune_canary_model_name,
            "share": s.finetune_canary_share,
            "state": "running",
            "started_at": _iso(now),
            "started_epoch": now,
            "ends_by": _iso(now + s.finetune_canary_max_s),
            "alpha": s.finetune_canary_alpha,
            "prior_strength": PRIOR_STRENGTH,
            "max_votes": s.finetune_canary_max_votes,
            "max_s": s.finetune_canary_max_s,
            "test": "beta-binomial mixture confidence sequence (docs/canary.md)",
            "challenger_deploy_s": round(deploy["deploy_s"], 2),
            "polls": 0,
        }
        self.registry.record_canary(GENERATOR, record)
        log.info(
            "canary.started",
            version=version,
            baseline=baseline,
            experiment=record["experiment"],
            share=record["share"],
            max_votes=record["max_votes"],
            max_s=record["max_s"],
        )
        return record

    # ---- watch

    def observe(self, record: dict[str, Any]) -> SequentialResult:
        """The test on the votes so far; updates the record's counts (not its state)."""
        votes = mixed_pair_votes(self.buffer, record["experiment"], record["version"], record["baseline_version"])
        result = sequential_test(
            (outcome for _, outcome in votes),
            record["alpha"],
            record["max_votes"],
            record.get("prior_strength", PRIOR_STRENGTH),
        )
        record.update(
            {
                "votes": {
                    "wins": result.wins,
                    "losses": result.losses,
                    "ties": result.ties,
                    "decided": result.decided,
                    "used": result.used,
                    "seen": len(votes),
                },
                "win_rate": result.win_rate,
                "lower": result.lower,
                "upper": result.upper,
                "elapsed_s": round(self.clock() - record["started_epoch"], 1),
                "event_ids": [event_id for event_id, _ in votes[: result.used]],
            }
        )
        return result

    def run(
        self, record: dict[str, Any], on_update: Callable[[dict[str, Any]], None] = lambda r: None
    ) -> dict[str, Any]:
        """Poll the votes until a decision or a cap, then act on it; returns the final record.

        Between polls the worker stops safely on SIGTERM (``shutdown.check``): the record stays
        ``running``, the challenger keeps serving, and the next start resumes here.
        """
        if record.get("state") == "running" and record.get("decision") is None:
            if not self.deployer.challenger_ready(record["version"], record["model_name"]):
                log.warning("canary.challenger_reloaded", version=record["version"])
                self.deployer.deploy_challenger(record["version"], record["model_name"])
            while True:
                self.guard()
                result = self.observe(record)
                record["polls"] = int(record.get("polls", 0)) + 1
                timed_out = self.clock() - record["started_epoch"] >= record["max_s"]
                if result.decision is not None or result.at_cap or timed_out:
                    record["decision"] = result.decision or "inconclusive"
                    record["decision_reason"] = self._reason(result, timed_out)
                    record["decided_at"] = _iso(self.clock())
                    break
                self.registry.record_canary(GENERATOR, record)
                on_update(record)
                shutdown.check("between the canary's polls")
                self.sleep(self.poll_s)
            self.registry.record_canary(GENERATOR, record)  # the decision, before acting on it
            on_update(record)
        if record.get("state") == "running":
            self.act(record)
            on_update(record)
        return record

    def _reason(self, result: SequentialResult, timed_out: bool) -> str:
        bounds = f"[{result.lower:.3f}, {result.upper:.3f}]"
        tally = f"{result.wins}-{result.losses}-{result.ties} (W-L-T)"
        if result.decision == "promote":
            return f"lower bound of the win rate above 50 %: {bounds} after {tally}"
        if result.decision == "rollback":
            return f"upper bound of the win rate below 50 %: {bounds} after {tally}"
        cap = "vote cap" if result.at_cap else "time cap" if timed_out else "cap"
        return f"{cap} reached without a decision: {bounds} after {tally}"

    # ---- act

    def act(self, record: dict[str, Any]) -> None:
        """Promote (the normal hot swap of ``Deployer.deploy``) or not; then retire the challenger."""
        decision = record["decision"]
        self.guard()
        if decision == "promote":
            try:
                record["deploy"] = self.deployer.deploy(record["version"])
                record["state"] = "promoted"
            except (CheckpointRejected, DeployError) as exc:
                record["state"], record["deploy_error"] = "deploy_failed", str(exc)
        else:
            record["state"] = "rolled_back" if decision == "rollback" else "inconclusive"
        # The gateway stops the experiment at its next poll; until then a request for the retired
        # challenger falls back to the current model (not an experiment sample).
        self.registry.record_canary(GENERATOR, record)
        self.deployer.retire_challenger(record["model_name"])
        CANARIES.labels(record["state"]).inc()
        log.info(
            "canary.decided",
            version=record["version"],
            state=record["state"],
            reason=record.get("decision_reason"),
            votes=record.get("votes"),
            elapsed_s=record.get("elapsed_s"),
        )


def run_canary_stage(cycle, state) -> None:
    """The cycle's canary stage (``FinetuneCycle.run_once`` with ``finetune_promotion`` canary or both):
    sets ``state.status`` to deployed, rolled_back, inconclusive, deploy_failed or rejected."""
    runner = CanaryRunner(cycle.settings, cycle.registry, cycle.buffer, cycle.deployer(), guard=cycle.guard)

    def save(record: dict[str, Any]) -> None:
        state.canary = {k: v for k, v in record.items() if k != "event_ids"}
        cycle.save_state(state)

    record = dict(state.canary) if state.canary else None
    if record is not None and record.get("canary_id"):
        # The run state keeps the record without its vote ids; the registry has the whole record.
        stored = next(
            (r for r in reversed(cycle.registry.canaries(GENERATOR)) if r.get("canary_id") == record["canary_id"]), None
        )
        record = stored or record
    if record is None or not record.get("canary_id"):
        state.status = "canary"
        cycle.save_state(state)
        try:
            record = runner.start(state.candidate_version, state.parent_version, state.run_id)
        except CheckpointRejected as exc:
            state.status, state.reason = "rejected", f"checkpoint rejected before the canary: {exc}"
            cycle.registry.record_rejection(
                GENERATOR, {"reason": state.reason, "version": state.candidate_version, "run_id": state.run_id}
            )
            return
        except DeployError as exc:
            state.status, state.reason = "deploy_failed", f"challenger not served: {exc}"
            cycle.registry.record_rejection(
                GENERATOR, {"reason": state.reason, "version": state.candidate_version, "run_id": state.run_id}
            )
            return
        save(record)
    record = runner.run(record, on_update=save)
    save(record)
    state.status = RUN_STATUS[record["state"]]
    if record["state"] == "promoted":
        state.deploy = record.get("deploy", {})
    else:
        state.reason = f"canary {record['state']}: {record.get('decision_reason') or record.get('deploy_error')}"
    if record["state"] in ("rolled_back", "deploy_failed"):
        cycle.registry.record_rejection(
            GENERATOR,
            {
                "reason": state.reason,
                "version": state.candidate_version,
                "run_id": state.run_id,
                "canary_id": record["canary_id"],
            },
        )


def best_finite(reports) -> int | None:
    """Canary only (``finetune_promotion=canary``): the snapshot the canary serves when none passed the gate,
    the one with the highest target reward among those whose weights and metrics are finite (the only
    check kept: a non-finite model is never served). None when no snapshot is finite."""
    finite = [i for i, report in enumerate(reports) if all(c.passed for c in report.checks if c.name == "finite")]
    return max(finite, key=lambda i: (reports[i].candidate["reward"], -i)) if finite else None


def describe(record: dict[str, Any]) -> str:
    """One line for ``musicrl finetune history``."""
    votes = record.get("votes") or {}
    bounds = (
        f" win rate {record['win_rate']:.3f} [{record['lower']:.3f}, {record['upper']:.3f}]"
        if record.get("win_rate") is not None
        else ""
    )
    elapsed = f", {record['elapsed_s'] / 60:.1f} min" if record.get("elapsed_s") is not None else ""
    return (
        f"canary v{record.get('version')} vs v{record.get('baseline_version')} ({record.get('started_at')}): "
        f"{record.get('state')}, {votes.get('wins', 0)}-{votes.get('losses', 0)}-{votes.get('ties', 0)} (W-L-T) "
        f"of {record.get('max_votes')} max,{bounds}{elapsed}"
    )
