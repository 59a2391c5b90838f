"""The stack's own loop, as shipped: does ``musicrl stack up`` turn votes into better policies by itself?

Unlike the closed-loop experiment, nothing here runs a finetune cycle: the stack's own
``finetune loop`` service (the worker's defaults, its data trigger, its lease) decides when
to train and what to deploy. This harness only plays the users and watches:

1. start every component ``musicrl stack up`` starts (servers and services) on free ports
   under ``work_dir``, with the stack's default settings;
2. per round, training listeners ask the gateway for pairs and vote through
   ``POST /v1/feedback`` until ``votes_per_round`` votes (a, b or tie) were sent;
3. wait until the finetune loop has finished a cycle (its archived run record, whatever the
   outcome: deployed, rejected by the gate, skipped);
4. at the end, held-out listeners judge every deployed version against the base
   (``HeldOutJudge``: same prompts and seeds for both, full listens, a verdict on every pair).

Results: ``results/stack_loop.json`` for one seed; with ``--seeds N`` one file per seed in
``results/stack_loop_runs/`` and their summary (``summarize_seeds``: how many seeds met the target,
the median and range of the last version's win rate) in ``results/stack_loop_summary.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.closed_loop import ClosedLoopConfig, HeldOutJudge, collect_votes, machine

Progress = Callable[[str], None]


@dataclass
class StackLoopConfig:
    rounds: int = 3
    votes_per_round: int = 320  # votes (a, b or tie) sent per round; abstentions are not votes
    pairs_per_batch: int = 80  # listeners are sent in batches until the round has its votes
    clip_s: float = 5.0
    population: str = "default"
    seed: int = 0
    cycle_timeout_s: float = 900.0  # per round: from the last vote to a deployed or refused cycle

    def listeners(self) -> ClosedLoopConfig:
        return ClosedLoopConfig(
            pairs_per_round=self.pairs_per_batch,
            clip_s=self.clip_s,
            population=self.population,
            seed=self.seed,
            hot_swap_probe=False,
        )


def votes_sent(votes: Counter) -> int:
    return sum(count for choice, count in votes.items() if choice != "none")


def finished_runs(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """The finetune loop's archived runs (``<work_dir>/runs/<run_id>/run.json``), by run id."""
    found = {}
    for path in sorted(runs_dir.glob("*/run.json")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being moved into place right now: read it next time
            continue
    return found


def wait_for_cycle(runs_dir: Path, seen: set[str], timeout_s: float, poll_s: float = 5.0) -> dict[str, Any]:
    """The record of the loop's next finished cycle (deployed, rejected, skipped, ...) not in ``seen``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = {run_id: record for run_id, record in finished_runs(runs_dir).items() if run_id not in seen}
        if new:
            run_id, record = sorted(new.items(), key=lambda item: item[1].get("created_at", ""))[0]
            seen.add(run_id)
            return {
                "status": record["status"],
                "run_id": run_id,
                "reason": record.get("reason"),
                "version": record.get("candidate_version") or record.get("parent_version"),
                "gate": {k: record.get("gate", {}).get(k) for k in ("passed", "chosen_step", "candidate", "baseline")},
                "reward_model": {
                    k: record.get("reward_model", {}).get(k) for k in ("published", "heldout_accuracy", "n_train_pairs")
                },
                "timings_s": record.get("timings_s"),
            }
        time.sleep(poll_s)
    return {"status": "timeout", "reason": f"no cycle finished within {timeout_s:.0f} s"}


def run_stack_loop(work_dir: Path, config: StackLoopConfig, progress: Progress = print) -> dict[str, Any]:
    from finetune_worker.stack_component import finetune_work_dir
    from finetune_worker.train import make_embed
    from musicrl.config import ObjectStoreConfig
    from musicrl.registry import Registry
    from musicrl.stack import Stack, free_port_settings
    from musicrl.stack.processes import wait_until_healthy
    from musicrl.stack.stack import default_components
    from musicrl.storage import ObjectStore

    started = time.monotonic()
    settings = free_port_settings(work_dir / "stack")
    stack = Stack(settings, default_components(settings), tied_to_parent=True)
    rounds: list[dict[str, Any]] = []
    try:
        info = stack.up()
        wait_until_healthy(info.gateway_url + "/readyz", 300, name="gateway", interval_s=1.0)
        registry = Registry(ObjectStore(info.settings_for(ObjectStoreConfig)))
        base = registry.current("generator")
        progress(
            f"stack up in {time.monotonic() - started:.0f} s, serving v{base}; "
            "the stack's finetune loop decides every cycle"
        )
        runs_dir = finetune_work_dir(settings) / "runs"  # the stack's finetune loop archives every cycle here
        seen = set(finished_runs(runs_dir))
        for round_index in range(1, config.rounds + 1):
            parent = registry.current("generator")
            votes: Counter = Counter()
            batch = 0
            while votes_sent(votes) < config.votes_per_round:
                batch += 1
                collection = collect_votes(
                    info.gateway_url,
                    config.pairs_per_batch,
                    config.listeners(),
                    round_index * 1000 + batch,
                    api_key=info.api_key,
                )
                if collection.failures:
                    raise RuntimeError(
                        f"{len(collection.failures)} listener requests failed, first: {collection.failures[0]}"
                    )
                votes.update(collection.votes)
            last_vote = time.monotonic()
            progress(
                f"round {round_index}: {votes_sent(votes)} votes on v{parent} sent ({dict(votes)}); "
                "waiting for the loop"
            )
            outcome = wait_for_cycle(runs_dir, seen, config.cycle_timeout_s)
            outcome.update(
                {
                    "round": round_index,
                    "parent": parent,
                    "votes": dict(votes),
                    "vote_to_outcome_s": round(time.monotonic() - last_vote, 1),
                }
            )
            rounds.append(outcome)
            progress(
                f"round {round_index}: {outcome['status']} v{outcome.get('version')} "
                f"({outcome['vote_to_outcome_s']:.0f} s after the last vote)"
                f"{' - ' + str(outcome.get('reason')) if outcome.get('reason') else ''}"
            )
            if outcome["status"] == "timeout":
                break
        policies = work_dir / "policies"
        base_dir = registry.download("generator", base, policies / base)
        judge = HeldOutJudge(
            base_dir,
            ClosedLoopConfig(clip_s=config.clip_s, population=config.population, seed=config.seed),
            make_embed("minilm"),
        )
        for row in rounds:
            if row["status"] == "deployed":
                row["win_rate_vs_base"] = judge.win_rate(
                    registry.download("generator", row["version"], policies / row["version"])
                ).to_dict()
    finally:
        stack.down()
    deployed = [r for r in rounds if r["status"] == "deployed"]
    final = deployed[-1]["win_rate_vs_base"] if deployed else None
    return {
        "experiment": "stack_loop",
        "config": asdict(config),
        "machine": machine(),
        "base_version": rounds[0]["parent"] if rounds else None,
        "rounds": rounds,
        "deployed": len(deployed),
        "final_version": deployed[-1]["version"] if deployed else None,
        "final_win_rate_vs_base": final,
        "target_met": bool(len(deployed) >= 2 and final and final["ci_low"] > 0.5),
        "elapsed_s": round(time.monotonic() - started, 1),
        "note": "finetune cycles run by the stack's own `finetune loop` service with FinetuneSettings defaults; "
        "votes only through POST /v1/feedback",
    }


def write_results(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def summarize_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the seeds' results: per seed the deployed versions and the last one's win rate against the base,
    then how many seeds met the target (at least 2 deployed, the last one's interval above 50 %), and the
    median and range of the last version's win rate (a seed that deployed nothing counts as 50 %: the base)."""
    seeds = []
    for run in sorted(runs, key=lambda r: r["config"]["seed"]):
        final = run.get("final_win_rate_vs_base") or {}
        seeds.append(
            {
                "seed": run["config"]["seed"],
                "deployed": run["deployed"],
                "rounds": len(run["rounds"]),
                "final_version": run.get("final_version"),
                "final_win_rate": final.get("win_rate", 0.5),
                "ci_low": final.get("ci_low"),
                "ci_high": final.get("ci_high"),
                "win_rate_by_round": [r.get("win_rate_vs_base", {}).get("win_rate") for r in run["rounds"]],
                "reward_model_check": [r.get("reward_model", {}).get("heldout_accuracy") for r in run["rounds"]],
                "target_met": run["target_met"],
                "elapsed_min": round(run["elapsed_s"] / 60, 1),
            }
        )
    finals = [s["final_win_rate"] for s in seeds]
    return {
        "experiment": "stack_loop_summary",
        "n_seeds": len(seeds),
        "seeds": seeds,
        "target": "per seed: at least 2 new versions deployed in 3 rounds of 320 votes and the last one's "
        "95 % interval against the base above 50 % for held-out listeners",
        "seeds_meeting_target": sum(s["target_met"] for s in seeds),
        "final_win_rate": {
            "median": statistics.median(finals) if finals else None,
            "min": min(finals, default=None),
            "max": max(finals, default=None),
        },
        "deployed_total": sum(s["deployed"] for s in seeds),
        "rounds_total": sum(s["rounds"] for s in seeds),
        "max_elapsed_min": max((s["elapsed_min"] for s in seeds), default=None),
    }
