"""The canary experiment: do users' votes on mixed pairs promote a better candidate and stop a worse one?

``musicrl experiment canary`` (docs/canary.md):

1. start a private stack on free ports (SeaweedFS, Tansu, Triton, then the gateway and the
   feedback consumer, the stack's own components; the gateway reads the registry's canary
   record every second), serving the committed base generator as version 1;
2. make two candidates from the base, once, with the worker's own REINFORCE (``run_job``, stage U)
   and a reward that is the simulated listeners' mean taste (``TowardListeners``: trained to win
   their votes) or its negative (``AgainstListeners``: trained to lose them); their win rate against
   the base is measured offline by held-out judges (``HeldOutJudge``), so the truth is known;
3. for each candidate, ``runs`` times: publish it as a new registry version, run the finetune
   worker's canary (``CanaryRunner``: challenger into Triton, the registry's canary record, the
   sequential test on the votes in the buffer, then promote by a hot swap or retire it) while
   simulated listeners ask the real gateway for pairs, download both clips, judge them and vote
   through ``POST /v1/feedback`` (-> Kafka -> consumer -> buffer) until the canary is decided;
   after a promotion the base is deployed again, so every run starts from the base.

The voters listen to both clips in full and always give a verdict (a, b or tie), as the paper's
raters did and as the closed-loop experiment's judges do: the test's inputs are decided votes, and
listeners who often abstain would only make a run longer in wall-clock time, not change what is
decided. The experiment's canary uses a share of 1.0 (every pair mixed) for the same reason; the
worker's default is 0.5. Results: ``results/canary.json``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

Progress = Callable[[str], None]
SERVICE_NAMES = ("gateway", "consumer")  # of the stack's services; no reward service: nothing is scored
KINDS = ("worse", "better")


@dataclass
class CanaryExperimentConfig:
    runs: int = 5  # canaries per candidate
    clip_s: float = 5.0
    concurrency: int = 4  # listeners asking and voting at once
    share: float = 1.0  # of pairs in the canary (the worker's default is 0.5; see the module docstring)
    alpha: float = 0.05  # the worker's default
    max_votes: int = 400  # the worker's default cap on decided votes
    max_s: float = 600.0  # time cap of one canary (the worker's default is 2 h; a run takes about a minute)
    poll_s: float = 2.0  # how often the worker reads the votes during a canary
    train_steps: int = 30  # REINFORCE steps that make each candidate
    train_kl_target: float = 16.0  # nats per clip the candidates may move from the base
    population: str = "default"
    population_size: int = 200
    listener_prompts: int = 200
    seed: int = 0

    def finetune_overrides(self) -> dict[str, Any]:
        return {
            "finetune_promotion": "canary",
            "finetune_canary_share": self.share,
            "finetune_canary_alpha": self.alpha,
            "finetune_canary_max_votes": self.max_votes,
            "finetune_canary_max_s": self.max_s,
            "finetune_poll_interval_s": self.poll_s,
            "finetune_torch_threads": 1,
        }


# --------------------------------------------------------------------------- candidates


class TowardListeners:
    """Reward of the candidate trained to win the listeners' votes: the default population's mean taste."""

    sign = 1.0

    def __init__(self) -> None:
        from musicrl.listeners import ListenerConfig, Population

        self.listener = Population(ListenerConfig.for_taste("default"), seed=0).mean_listener()

    def __call__(self, prompts: list[str], tokens: np.ndarray) -> dict[str, np.ndarray]:
        from musicrl.audio import codec

        return {
            "preference": np.array([self.sign * self.listener.utility(codec.decode(np.asarray(t))) for t in tokens])
        }


class AgainstListeners(TowardListeners):
    """Reward of the candidate trained to lose their votes: minus their mean taste."""

    sign = -1.0


def train_candidate(base_dir: Path, out_dir: Path, kind: str, config: CanaryExperimentConfig) -> dict[str, Any]:
    """REINFORCE from the base with the worker's trainer and defaults, on the listeners' taste (or against it)."""
    from finetune_worker.configs import trainer_config
    from finetune_worker.settings import FinetuneSettings
    from finetune_worker.train import TrainJob, run_job
    from musicrl.corpus.dataset import make_corpus

    reward = {"better": "TowardListeners", "worse": "AgainstListeners"}[kind]
    settings = FinetuneSettings(
        finetune_steps=config.train_steps,
        finetune_duration_s=config.clip_s,
        finetune_checkpoint_every=0,
        finetune_candidate_every=config.train_steps,
        finetune_kl_target=config.train_kl_target,
        finetune_kl_budget=config.train_kl_target * 1.5,
        finetune_gate_max_kl=max(50.0, config.train_kl_target * 2),
        finetune_seed=config.seed,
    )
    work = out_dir.parent / f".{out_dir.name}-work"
    job = TrainJob(
        trainer="reinforce",
        policy_dir=base_dir,
        output_dir=out_dir,
        checkpoint_dir=work / "checkpoints",
        candidates_dir=work / "candidates",
        config=trainer_config(settings),
        user_prompts=[],
        captions=[r.caption for r in make_corpus(256, seed=config.seed, split="train", duration_s=1.0)],
        user_fraction=0.0,
        reward=f"python:loadtests.canary:{reward}",
        text_encoder="minilm",
        meta={"experiment": "canary", "candidate": kind},
    )
    started = time.monotonic()
    history = run_job(job)
    last = history[-1] if history else {}
    return {
        "kind": kind,
        "reward": reward,
        "steps": len(history),
        "train_s": round(time.monotonic() - started, 1),
        "kl_to_base": last.get("kl"),
        "last_reward": last.get("reward"),
        "how": f"REINFORCE (the worker's trainer, stage U) from the base, {config.train_steps} steps, KL target "
        f"{config.train_kl_target} nats per clip, reward {'' if kind == 'better' else 'minus '}the mean "
        f"listener's utility of the '{config.population}' population",
    }


# --------------------------------------------------------------------------- the stack


@contextlib.contextmanager
def canary_stack(work_dir: Path) -> Iterator[Any]:
    """Servers, then the gateway and the consumer (no reward service: nothing is scored), base served as v1."""
    from feedback_consumer.settings import ConsumerSettings
    from finetune_worker.stack_component import CHECKPOINTS, serve_current_generator
    from loadtests.closed_loop import PRIVATE_SERVICE_ENV, _environ, _with_env
    from musicrl.config import ObjectStoreConfig
    from musicrl.kafka import ensure_topics
    from musicrl.stack import Stack, free_port_settings
    from musicrl.stack.processes import wait_until_healthy
    from musicrl.stack.stack import COMPONENTS, SERVICES, StackInfo
    from musicrl.storage import ObjectStore

    servers = Stack(free_port_settings(work_dir / "stack"), COMPONENTS, tied_to_parent=True)
    try:
        settings = servers.up().settings
        ObjectStore(StackInfo(settings).settings_for(ObjectStoreConfig)).ensure_buckets()
        ensure_topics(StackInfo(settings).settings_for(ConsumerSettings))
        components = [c for c in SERVICES if c.name in SERVICE_NAMES]
        components = [
            _with_env(c, {"MUSICRL_GATEWAY_CANARY_POLL_S": "1"}) if c.name == "gateway" else c for c in components
        ]
        services = Stack(settings, components, tied_to_parent=True)
        try:
            with _environ(PRIVATE_SERVICE_ENV):
                info = services.up()
            if serve_current_generator(settings, CHECKPOINTS) is None:
                raise RuntimeError("no base generator: train it first (musicrl models train-generator)")
            wait_until_healthy(info.gateway_url + "/readyz", 300, name="gateway", interval_s=1.0)
            yield info
        finally:
            services.down()
    finally:
        servers.down()


# --------------------------------------------------------------------------- voters


@dataclass
class Voting:
    pairs: int = 0
    mixed_pairs: int = 0
    votes: Counter = None  # type: ignore[assignment]
    failures: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.votes = Counter()
        self.failures = []


def vote_until(
    stop: threading.Event, gateway_url: str, api_key: str, config: CanaryExperimentConfig, stream: int
) -> Voting:
    """Listeners ask for pairs, hear both clips in full and vote through the gateway until ``stop`` is set."""
    from loadtests.closed_loop import hear_pair, send_vote
    from musicrl.corpus.dataset import make_corpus
    from musicrl.listeners import ListenerConfig, Population
    from serving.client import api_key_headers

    population = Population(ListenerConfig.for_taste(config.population, size=config.population_size), seed=config.seed)
    prompts = [
        r.caption for r in make_corpus(config.listener_prompts, seed=config.seed + 100, split="train", duration_s=1.0)
    ]
    voting = Voting()
    lock = threading.Lock()

    def worker(index: int) -> None:
        rng = np.random.default_rng([config.seed, stream, index])
        with httpx.Client(base_url=gateway_url, timeout=180, headers=api_key_headers(api_key)) as http:
            while not stop.is_set():
                listener = population.sample(rng)
                prompt = prompts[int(rng.integers(len(prompts)))]
                try:
                    body, waves = hear_pair(http, prompt, config.clip_s, int(rng.integers(1 << 40)), "canary")
                    p = listener.outcome_probabilities(listener.utility(waves[0]), listener.utility(waves[1]))
                    draw = rng.random()
                    choice = "tie" if draw < p["tie"] else "a" if draw < p["tie"] + p["a"] else "b"
                    a, b = body["clips"][:2]
                    send_vote(
                        http, body, choice, a["duration_s"], b["duration_s"], listener.id, "canary"
                    ).raise_for_status()
                    with lock:
                        voting.pairs += 1
                        voting.mixed_pairs += body.get("experiment") is not None
                        voting.votes[choice] += 1
                except httpx.HTTPError as err:
                    with lock:
                        voting.failures.append(f"{type(err).__name__}: {err}"[:300])
                    stop.wait(1.0)

    with ThreadPoolExecutor(config.concurrency) as pool:
        list(pool.map(worker, range(config.concurrency)))
    return voting


# --------------------------------------------------------------------------- the experiment


def run_canary_experiment(
    work_dir: Path,
    config: CanaryExperimentConfig,
    progress: Progress = print,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    from finetune_worker.canary import CanaryRunner
    from finetune_worker.deploy import Deployer
    from finetune_worker.train import make_embed
    from loadtests.closed_loop import ClosedLoopConfig, HeldOutJudge, finetune_settings, machine
    from musicrl.buffer import PreferenceBuffer
    from musicrl.registry import Registry
    from musicrl.storage import ObjectStore

    started = time.monotonic()
    results: dict[str, Any] = {"experiment": "canary", "config": asdict(config), "machine": machine(), "runs": []}
    with canary_stack(work_dir) as info:
        settings = finetune_settings(info, work_dir, config.finetune_overrides())
        store = ObjectStore(settings)
        registry, buffer = Registry(store), PreferenceBuffer(store)
        deployer = Deployer.from_settings(settings, registry)
        base = registry.current("generator")
        progress(f"stack up in {time.monotonic() - started:.0f} s, serving the base v{base}")
        base_dir = registry.download("generator", base, work_dir / "policies" / base)

        candidates, judged = {}, {}
        judge = HeldOutJudge(
            base_dir,
            ClosedLoopConfig(
                clip_s=config.clip_s,
                population=config.population,
                seed=config.seed,
                population_size=config.population_size,
            ),
            make_embed("minilm"),
        )
        for kind in KINDS:
            out = work_dir / "candidates" / kind
            info_row = train_candidate(base_dir, out, kind, config)
            info_row["offline_win_rate_vs_base"] = judge.win_rate(out).to_dict()
            candidates[kind], judged[kind] = out, info_row
            wr = info_row["offline_win_rate_vs_base"]
            progress(
                f"candidate {kind}: {info_row['steps']} steps in {info_row['train_s']:.0f} s, "
                f"KL {info_row['kl_to_base']:.1f}; "
                f"held-out judges prefer it to the base {wr['win_rate']:.1%} [{wr['ci_low']:.1%}, {wr['ci_high']:.1%}] "
                f"(expected {wr['expected_win_rate']:.3f})"
            )
        results["candidates"] = judged

        for kind in KINDS:
            for run in range(1, config.runs + 1):
                run_started = time.monotonic()
                if registry.current("generator") != base:
                    deployer.deploy(base)  # the previous run promoted its candidate: start again from the base
                version = registry.publish(
                    "generator",
                    candidates[kind],
                    metrics={},
                    lineage={"parent_version": base, "experiment": "canary", "candidate": kind, "run": run},
                )
                runner = CanaryRunner(settings, registry, buffer, deployer, poll_s=config.poll_s)
                record = runner.start(version, base, run_id=f"canary-experiment-{kind}-{run}")
                stop = threading.Event()
                voters: dict[str, Voting] = {}
                thread = threading.Thread(
                    target=lambda voters=voters, stop=stop, stream=1000 * KINDS.index(kind) + run: voters.setdefault(
                        "v", vote_until(stop, info.gateway_url, info.api_key, config, stream=stream)
                    ),
                    daemon=True,
                )
                thread.start()
                try:
                    record = runner.run(record)
                finally:
                    stop.set()
                    thread.join(timeout=300)
                voting = voters.get("v", Voting())
                votes = record.get("votes") or {}
                row = {
                    "candidate": kind,
                    "run": run,
                    "version": version,
                    "outcome": record["state"],
                    "decision_reason": record.get("decision_reason"),
                    "wins": votes.get("wins"),
                    "losses": votes.get("losses"),
                    "ties": votes.get("ties"),
                    "decided_votes_used": votes.get("decided"),
                    "votes_used": votes.get("used"),
                    "win_rate": record.get("win_rate"),
                    "lower": record.get("lower"),
                    "upper": record.get("upper"),
                    "canary_s": record.get("elapsed_s"),
                    "run_s": round(time.monotonic() - run_started, 1),
                    "challenger_deploy_s": record.get("challenger_deploy_s"),
                    "promotion_deploy_s": (record.get("deploy") or {}).get("deploy_s"),
                    "pairs_sent": voting.pairs,
                    "mixed_pairs_sent": voting.mixed_pairs,
                    "votes_sent": dict(voting.votes),
                    "request_failures": len(voting.failures),
                    "first_failure": voting.failures[0] if voting.failures else None,
                    "served_after": registry.current("generator"),
                    "canary_id": record["canary_id"],
                }
                results["runs"].append(row)
                progress(
                    f"{kind} run {run}: {row['outcome']} after {row['decided_votes_used']} decided votes "
                    f"({row['wins']}-{row['losses']}-{row['ties']}), {row['canary_s']:.0f} s; {row['decision_reason']}"
                )
                results.update(summarize(results["runs"], config), elapsed_s=round(time.monotonic() - started, 1))
                if on_run is not None:
                    on_run(results)
    results.update(summarize(results["runs"], config), elapsed_s=round(time.monotonic() - started, 1))
    return results


def summarize(runs: list[dict[str, Any]], config: CanaryExperimentConfig) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        rows = [r for r in runs if r["candidate"] == kind]
        outcomes = Counter(r["outcome"] for r in rows)
        decided = [r["decided_votes_used"] for r in rows if r["decided_votes_used"] is not None]
        seconds = [r["canary_s"] for r in rows if r["canary_s"] is not None]
        by_kind[kind] = {
            "runs": len(rows),
            "promoted": outcomes.get("promoted", 0),
            "rolled_back": outcomes.get("rolled_back", 0),
            "inconclusive": outcomes.get("inconclusive", 0),
            "other": sum(v for k, v in outcomes.items() if k not in ("promoted", "rolled_back", "inconclusive")),
            "median_decided_votes": statistics.median(decided) if decided else None,
            "max_decided_votes": max(decided) if decided else None,
            "median_canary_s": statistics.median(seconds) if seconds else None,
        }
    worse, better = by_kind["worse"], by_kind["better"]
    needed = -(-4 * config.runs // 5)  # 4 of 5, rounded up for other numbers of runs
    within_cap = all(
        r["decided_votes_used"] <= config.max_votes
        for r in runs
        if r["candidate"] == "better" and r["outcome"] == "promoted"
    )
    return {
        "summary": by_kind,
        "targets": {
            "worse_never_promoted": worse["runs"] == config.runs and worse["promoted"] == 0,
            "better_promoted_at_least_4_of_5": better["runs"] == config.runs
            and better["promoted"] >= needed
            and within_cap,
            "vote_cap": config.max_votes,
        },
    }


def write_results(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
