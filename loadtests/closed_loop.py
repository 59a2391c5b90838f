"""The closed-loop experiment: does the served policy get better for its users, round after round?

From the base policy, each round:

1. **collect**: simulated listeners of the *training* population ask the real gateway
   for pairs (``POST /v1/generations``), download both clips through the gateway,
   judge what they hear and vote (``POST /v1/feedback`` -> Kafka -> feedback consumer
   -> on-policy buffer);
2. **finetune**: one cycle of the finetune worker (Bradley-Terry reward model on the
   buffer, published and hot-loaded by the reward service; KL-regularised REINFORCE
   on the user-preference reward scored by the reward service; gate; publish; hot swap
   into Triton while a probe keeps requesting clips);
3. **evaluate**: the win rate (wins / (wins + losses)) of the served policy against the
   base on a fixed set of held-out prompts, judged by the *held-out* population (same
   taste distribution, other people, never fed training), with a Wilson 95 % interval;
   plus reward-model accuracy, KL to the base and the other rewards.

Evaluation samples both policies in this process from their registry checkpoints
(``load_generator`` + ``codec.decode``) with the same fixed seeds per (prompt, sample),
so each comparison is a paired one and round after round is judged on the same base
clips. Evaluation raters listen to both clips in full and always answer (a, b or tie),
unlike the training population, who often abstain or stop listening early: the
paper's raters were asked for a verdict on every pair.

``run_closed_loop`` needs a stack whose gateway, reward service and consumer run
(``private_loop_stack`` starts one on free ports); results go to
``results/closed_loop.json``, ``results/closed_loop_winrate.png`` and
``results/closed_loop_table.md``. ``summarize_runs`` condenses repeated runs (one per
seed) into ``results/closed_loop_summary.{json,md,png}`` (``write_summary``).

The finetune cycles use the worker's own defaults (``FinetuneSettings``); the experiment
changes only the size of the work (``CLOSED_LOOP_SIZE``, fields in ``SIZE_FIELDS``). Any
other override is recorded in the results as ``algorithm_overrides``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from musicrl.logging import get_logger

log = get_logger(__name__)

LOOP_SERVICES = ("reward", "gateway", "consumer")  # the finetune cycles run in the experiment's process
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- configuration


@dataclass
class ClosedLoopConfig:
    """Everything that defines a run (written into the results)."""

    rounds: int = 3
    # Generation requests (pairs) listeners ask for per round: ~230 preferences. With 400 (~115) the reward
    # model was too weak to move generator v3, which follows its prompts and samples with half v2's entropy.
    pairs_per_round: int = 800
    clip_s: float = 5.0
    concurrency: int = 4  # listeners asking and voting at once
    listener_prompts: int = 200  # users' prompt pool (corpus "train" captions)
    eval_prompts: int = 48  # held-out prompts (corpus "test" captions, never trained on)
    eval_samples: int = 4  # paired samples per prompt and policy
    reward_eval_prompts: int = 16  # prompts for the reward / KL columns (x 2 samples)
    population_size: int = 200
    population: str = "default"  # taste preset of the training listeners and the judges (musicrl.listeners.TASTES)
    seed: int = 0
    # FinetuneSettings overrides (field names) on top of CLOSED_LOOP_SIZE; any outside SIZE_FIELDS is
    # recorded in the results as an algorithm override.
    finetune: dict[str, Any] = field(default_factory=dict)
    hot_swap_probe: bool = True  # keep requesting clips during each cycle; count failures, latency

    def finetune_overrides(self) -> dict[str, Any]:
        """What the experiment changes in the worker's defaults: the size of the work (rollouts as long as
        ``clip_s``), then ``finetune``."""
        return CLOSED_LOOP_SIZE | {"finetune_duration_s": self.clip_s} | self.finetune


# The only FinetuneSettings fields a harness (closed loop, demo, benchmarks) may change without saying so:
# how much work a cycle does, never how it learns. Anything else is an algorithm override.
SIZE_FIELDS: frozenset[str] = frozenset(
    {
        "finetune_steps",
        "finetune_duration_s",
        "finetune_eval_prompts",
        "finetune_corpus_captions",
        "finetune_torch_threads",
        "finetune_rm_min_pairs",
        "finetune_checkpoint_every",
    }
)

# The size of the experiment's cycles on 2 CPU cores; everything else is the worker's default.
# finetune_duration_s follows ClosedLoopConfig.clip_s.
CLOSED_LOOP_SIZE: dict[str, Any] = {
    "finetune_steps": 30,
    "finetune_duration_s": 5.0,
    "finetune_torch_threads": 1,
    "finetune_eval_prompts": 24,
    "finetune_corpus_captions": 256,
}


def algorithm_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change how the worker learns, not only how much (keys outside ``SIZE_FIELDS``)."""
    return {key: value for key, value in overrides.items() if key not in SIZE_FIELDS}


def overrides_warning(overrides: dict[str, Any]) -> str | None:
    """The line printed when a run does not use the shipped finetune defaults (None when it does)."""
    changed = algorithm_overrides(overrides)
    if not changed:
        return None
    return "not the shipped defaults: " + ", ".join(f"{key}={value}" for key, value in sorted(changed.items()))


def effective_finetune_settings(settings) -> dict[str, Any]:
    """Every ``finetune_*`` field of the ``FinetuneSettings`` actually used (secrets left out), JSON-ready."""
    from pydantic import SecretBytes, SecretStr

    def plain(value: Any) -> Any:
        return value if value is None or isinstance(value, bool | int | float | str) else str(value)

    return {
        key: plain(value)
        for key, value in settings.model_dump().items()
        if key.startswith("finetune_")
        and not isinstance(value, SecretStr | SecretBytes)
        and not any(word in key for word in ("token", "secret", "password"))
    }


# --------------------------------------------------------------------------- statistics


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass
class WinRate:
    wins: int
    losses: int
    ties: int
    expected: float  # mean P(win) / (P(win) + P(loss)) over the comparisons: the same, without vote noise

    @property
    def rate(self) -> float:
        decided = self.wins + self.losses
        return self.wins / decided if decided else float("nan")

    def to_dict(self) -> dict[str, float]:
        low, high = wilson_interval(self.wins, self.wins + self.losses)
        return {
            "win_rate": round(self.rate, 4),
            "ci_low": round(low, 4),
            "ci_high": round(high, 4),
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "expected_win_rate": round(self.expected, 4),
        }


# --------------------------------------------------------------------------- evaluation


class HeldOutJudge:
    """Win rate of a policy against the base, judged by the held-out population.

    The base clips (and what the judges hear in them) are computed once; every
    candidate is sampled with the same (prompt, seed) pairs, so comparison k always
    puts candidate clip k against base clip k, in a random order, before the same judge.
    """

    def __init__(self, base_dir: Path, config: ClosedLoopConfig, embed):
        from musicrl.corpus.dataset import make_corpus
        from musicrl.listeners import ListenerConfig, Population

        self.config = config
        self.embed = embed
        prompts = [
            r.caption for r in make_corpus(config.eval_prompts, seed=config.seed + 1000, split="test", duration_s=1.0)
        ]
        self.prompts = [p for p in prompts for _ in range(config.eval_samples)]
        self.seeds = [5_000_000 + i for i in range(len(self.prompts))]
        judges = Population(
            ListenerConfig.for_taste(config.population, size=config.population_size), seed=config.seed
        ).held_out()
        rng = np.random.default_rng([config.seed, 77])
        self.judges = [judges[int(i)] for i in rng.integers(len(judges), size=len(self.prompts))]
        self.base_first = rng.random(len(self.prompts)) < 0.5
        self.base_utilities = self._utilities(base_dir)

    def _waves(self, policy_dir: Path, seeds: list[int]) -> list[np.ndarray]:
        import torch

        from musicrl.audio import codec
        from musicrl.models.generator import load_generator

        model, _ = load_generator(policy_dir)
        model.eval()
        cond_all = np.asarray(self.embed(self.prompts), dtype=np.float32)
        waves = []
        with torch.no_grad():
            for start in range(0, len(self.prompts), 32):
                cond = torch.from_numpy(cond_all[start : start + 32])
                tokens, _ = model.sample(cond, codec.frames_for(self.config.clip_s), 0.99, 0, seeds[start : start + 32])
                waves.extend(codec.decode(row) for row in tokens.numpy())
        return waves

    def _utilities(self, policy_dir: Path, seeds: list[int] | None = None) -> np.ndarray:
        waves = self._waves(policy_dir, seeds or self.seeds)
        return np.array([judge.utility(wave) for judge, wave in zip(self.judges, waves)])

    def win_rate(self, policy_dir: Path, seeds: list[int] | None = None) -> WinRate:
        """Votes of the held-out judges, policy against base, each judge on full listens."""
        utilities = self._utilities(policy_dir, seeds)
        rng = np.random.default_rng([self.config.seed, 99])
        outcome: Counter[str] = Counter()
        expected = []
        for judge, u_policy, u_base, base_first in zip(self.judges, utilities, self.base_utilities, self.base_first):
            first, second = (u_base, u_policy) if base_first else (u_policy, u_base)
            p = judge.outcome_probabilities(first, second)
            p_policy, p_base = (p["b"], p["a"]) if base_first else (p["a"], p["b"])
            expected.append(p_policy / (p_policy + p_base))
            draw = rng.random()
            outcome["tie" if draw < p["tie"] else "win" if draw < p["tie"] + p_policy else "loss"] += 1
        return WinRate(outcome["win"], outcome["loss"], outcome["tie"], float(np.mean(expected)))

    def base_sanity(self, base_dir: Path) -> WinRate:
        """The base against itself with other seeds: should be about 50 %."""
        return self.win_rate(base_dir, [seed + 1_000_000 for seed in self.seeds])


def policy_rewards(policy_dir: Path, base_dir: Path, config: ClosedLoopConfig, embed, reward_fn) -> dict[str, float]:
    """Rewards of the policy's clips on held-out prompts (reward service) and its KL to the base."""
    from finetune_worker.evaluation import evaluate_policy
    from musicrl.audio import codec
    from musicrl.corpus.dataset import make_corpus
    from musicrl.models.generator import load_generator

    prompts = [
        r.caption
        for r in make_corpus(config.reward_eval_prompts, seed=config.seed + 1000, split="test", duration_s=1.0)
    ]
    policy, _ = load_generator(policy_dir)
    base, _ = load_generator(base_dir)
    scores = evaluate_policy(
        policy,
        base,
        prompts,
        embed,
        reward_fn,
        {"preference": 1.0},
        codec.frames_for(config.clip_s),
        samples_per_prompt=2,
        seed=config.seed + 4242,
    )
    return {key: round(float(value), 4) for key, value in scores.items()}


# --------------------------------------------------------------------------- collection through the real path


@dataclass
class Collection:
    votes: Counter
    requests: int
    failures: list[str]
    seconds: float
    last_vote_sent_at: float


def hear_pair(http: httpx.Client, prompt: str, clip_s: float, seed: int, app_id: str) -> tuple[dict, list[np.ndarray]]:
    """A listener's app asks the gateway for a pair and downloads both clips: (the answer, the two waveforms)."""
    from musicrl.audio.formats import decode_audio

    response = http.post(
        "/v1/generations", json={"prompt": prompt, "duration_s": clip_s, "seed": seed, "app_id": app_id}
    )
    response.raise_for_status()
    body = response.json()
    waves = []
    for clip in body["clips"][:2]:
        audio = http.get(clip["download_url"])
        audio.raise_for_status()
        waves.append(decode_audio(audio.content)[0])
    return body, waves


def send_vote(
    http: httpx.Client, body: dict, choice: str, listen_a_s: float, listen_b_s: float, user_id: str, app_id: str
) -> httpx.Response:
    """``POST /v1/feedback`` for the first two clips of the answer ``body``, with its vote token; the caller
    judges the answer (the harnesses raise on an error, the e2e test counts statuses)."""
    a, b = body["clips"][:2]
    return http.post(
        "/v1/feedback",
        json={
            "event_id": uuid.uuid4().hex,
            "generation_id": body["generation_id"],
            "clip_a_id": a["clip_id"],
            "clip_b_id": b["clip_id"],
            "choice": choice,
            "listen_a_s": listen_a_s,
            "listen_b_s": listen_b_s,
            "user_id": user_id,
            "app_id": app_id,
            "vote_token": body["vote_token"],
        },
    )


def collect_votes(
    gateway_url: str,
    n_pairs: int,
    config: ClosedLoopConfig,
    round_index: int,
    progress: Progress | None = None,
    api_key: str | None = None,
) -> Collection:
    """Training listeners ask for pairs, hear both clips and vote, all through the gateway.

    Listening time is simulated (the listener says how long it listened) rather than
    waited for, so a round takes as long as generating its clips. Requests carry
    ``api_key`` (default ``$MUSICRL_API_KEY``); each vote carries its pair's vote token.
    """
    from musicrl.corpus.dataset import make_corpus
    from musicrl.listeners import ListenerConfig, Population
    from serving.client import api_key_headers

    population = Population(ListenerConfig.for_taste(config.population, size=config.population_size), seed=config.seed)
    prompts = [
        r.caption for r in make_corpus(config.listener_prompts, seed=config.seed + 100, split="train", duration_s=1.0)
    ]
    votes: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    done = [0]
    last_vote = [0.0]
    started = time.monotonic()

    def one(i: int) -> None:
        rng = np.random.default_rng([config.seed, round_index, i])
        listener = population.sample(rng)
        prompt = prompts[int(rng.integers(len(prompts)))]
        try:
            with httpx.Client(base_url=gateway_url, timeout=180, headers=api_key_headers(api_key)) as http:
                body, waves = hear_pair(http, prompt, config.clip_s, int(rng.integers(1 << 40)), "closed-loop")
                vote = listener.judge(waves[0], waves[1], rng)
                send_vote(
                    http, body, vote.choice, vote.listen_a_s, vote.listen_b_s, listener.id, "closed-loop"
                ).raise_for_status()
            with lock:
                votes[vote.choice] += 1
                last_vote[0] = time.time()
        except httpx.HTTPError as err:
            with lock:
                failures.append(f"{type(err).__name__}: {err}"[:300])
        with lock:
            done[0] += 1
            if progress is not None and (done[0] % 20 == 0 or done[0] == n_pairs):
                progress(f"round {round_index}: {done[0]}/{n_pairs} pairs judged, votes {dict(votes)}")

    with ThreadPoolExecutor(config.concurrency) as pool:
        list(pool.map(one, range(n_pairs)))
    return Collection(votes, n_pairs, failures, time.monotonic() - started, last_vote[0])


def preferences_on(buffer, policy_version: str) -> int:
    """Preferences on ``policy_version`` in the buffer (zero before the first segment lands)."""
    return buffer.counts_by_policy().get(policy_version, 0) if buffer.segments() else 0


def wait_for_buffer(
    store, bucket: str, policy_version: str, previous: int, timeout_s: float = 180.0, settle_s: float = 8.0
) -> int:
    """Preferences on ``policy_version`` once the count has grown past ``previous`` and stopped changing."""
    from musicrl.buffer import PreferenceBuffer

    buffer = PreferenceBuffer(store, bucket)
    deadline = time.monotonic() + timeout_s
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = preferences_on(buffer, policy_version)
        if count != last:
            last, stable_since = count, time.monotonic()
        elif count > previous and time.monotonic() - stable_since > settle_s:
            return count
        time.sleep(1.0)
    raise TimeoutError(f"the buffer holds {last} preferences on policy {policy_version} after {timeout_s:.0f} s")


class SwapProbe:
    """A client requesting short clips all through a finetune cycle: latency and failures, with timestamps."""

    def __init__(self, gateway_url: str, interval_s: float = 0.5, api_key: str | None = None):
        self.gateway_url, self.interval_s, self.api_key = gateway_url, interval_s, api_key
        self.stop = threading.Event()
        self.samples: list[tuple[float, float, int, str]] = []  # (start, seconds, status, policy version)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from serving.client import api_key_headers

        with httpx.Client(base_url=self.gateway_url, timeout=120, headers=api_key_headers(self.api_key)) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.time()
                try:
                    response = http.post(
                        "/v1/generations", json={"prompt": f"probe {n}", "duration_s": 1.0, "app_id": "probe"}
                    )
                    status = response.status_code
                    version = response.json()["clips"][0]["policy_version"] if status == 201 else ""
                except httpx.HTTPError as err:
                    status, version = -1, type(err).__name__
                self.samples.append((started, time.time() - started, status, version))
                self.stop.wait(self.interval_s)

    def __enter__(self) -> SwapProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=150)

    def summary(self, swap_window: tuple[float, float] | None) -> dict[str, Any]:
        def stats(rows):
            latencies = [r[1] * 1000 for r in rows]
            return {
                "requests": len(rows),
                "failed": sum(r[2] != 201 for r in rows),
                "p50_ms": round(float(np.percentile(latencies, 50)), 1) if rows else None,
                "p99_ms": round(float(np.percentile(latencies, 99)), 1) if rows else None,
            }

        during = [r for r in self.samples if swap_window and r[0] + r[1] >= swap_window[0] and r[0] <= swap_window[1]]
        steady = [r for r in self.samples if r not in during]
        return {
            "steady": stats(steady),
            "during_swap": stats(during),
            "versions_seen": sorted({r[3] for r in self.samples if r[2] == 201}),
            "swap_window_s": round(swap_window[1] - swap_window[0], 2) if swap_window else None,
        }


# --------------------------------------------------------------------------- the stack


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Services of an experiment's private stack: votes land in the buffer within seconds.
PRIVATE_SERVICE_ENV = {
    "MUSICRL_CONSUMER_SEGMENT_MAX_AGE_S": "2",
    "MUSICRL_CONSUMER_SESSION_TIMEOUT_MS": "3000",
    "MUSICRL_CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
    "MUSICRL_REWARD_POLL_INTERVAL_S": "2",
    "MUSICRL_LOG_LEVEL": "WARNING",
}


ServiceEnv = dict[str, "dict[str, str] | Callable[[Any], dict[str, str]]"]


def _with_env(component, extra):
    """``component`` whose process also gets ``extra`` (a dict, or a function of the stack settings) in its
    environment."""
    from musicrl.stack.stack import Component

    def build(settings):
        process = component.process(settings)
        process.env = process.env | (extra(settings) if callable(extra) else extra)
        return process

    return Component(component.name, build, component.provision)


@contextlib.contextmanager
def loop_services(
    settings, checkpoints: Path | None = None, ready_timeout_s: float = 300.0, service_env: ServiceEnv | None = None
) -> Iterator[Any]:
    """Reward service, gateway and consumer (the stack's own components) on the servers ``settings`` name;
    the committed defaults published (base generator as version 1) and served. Yields the ``StackInfo``.

    ``service_env`` adds variables to a service's environment by component name (e.g. more API keys
    for the gateway: ``{"gateway": {"MUSICRL_GATEWAY_API_KEYS": ...}}``), after the stack's own."""
    from finetune_worker.stack_component import CHECKPOINTS, serve_current_generator
    from musicrl.config import ObjectStoreConfig
    from musicrl.kafka import ensure_topics
    from musicrl.stack import Stack
    from musicrl.stack.processes import wait_until_healthy
    from musicrl.stack.stack import SERVICES, StackInfo
    from musicrl.storage import ObjectStore

    ObjectStore(StackInfo(settings).settings_for(ObjectStoreConfig)).ensure_buckets()
    from feedback_consumer.settings import ConsumerSettings

    ensure_topics(StackInfo(settings).settings_for(ConsumerSettings))
    components = [c for c in SERVICES if c.name in LOOP_SERVICES]
    components = [_with_env(c, service_env[c.name]) if c.name in (service_env or {}) else c for c in components]
    stack = Stack(settings, components, tied_to_parent=True)
    try:
        with _environ(PRIVATE_SERVICE_ENV):
            info = stack.up()
        if serve_current_generator(settings, checkpoints or CHECKPOINTS) is None:
            raise RuntimeError("no base generator: train it first (musicrl models train-generator)")
        wait_until_healthy(info.gateway_url + "/readyz", ready_timeout_s, name="gateway", interval_s=1.0)
        wait_until_healthy(info.reward_url + "/readyz", ready_timeout_s, name="reward service", interval_s=1.0)
        yield info
    finally:
        stack.down()


@contextlib.contextmanager
def private_loop_stack(
    work_dir: Path, checkpoints: Path | None = None, service_env: ServiceEnv | None = None
) -> Iterator[Any]:
    """SeaweedFS, Tansu and Triton on free ports under ``work_dir``, then ``loop_services`` on them."""
    from musicrl.stack import Stack, free_port_settings
    from musicrl.stack.stack import COMPONENTS

    servers = Stack(free_port_settings(work_dir / "stack"), COMPONENTS, tied_to_parent=True)
    try:
        info = servers.up()
        with loop_services(info.settings, checkpoints, service_env=service_env) as services:
            yield services
    finally:
        servers.down()


# --------------------------------------------------------------------------- the experiment


def finetune_settings(info, work_dir: Path, overrides: dict[str, Any]):
    from finetune_worker.settings import FinetuneSettings

    return info.settings_for(
        FinetuneSettings,
        reward_url=info.reward_url,
        finetune_triton_repo=info.triton_repo,
        finetune_work_dir=work_dir / "finetune",
        **overrides,
    )


def machine() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def run_round_cycle(info, settings, probe: bool) -> tuple[dict[str, Any], dict[str, Any] | None, float]:
    """One finetune cycle (under the worker's lease), optionally with a probe on the gateway.

    Returns the cycle's record, the probe's summary and when the cycle finished (epoch seconds).
    """
    from finetune_worker.cycle import FinetuneCycle
    from finetune_worker.loop import run_cycle_with_lease

    cycle = FinetuneCycle(settings)
    if not probe:
        record = run_cycle_with_lease(cycle)
        return record, None, time.time()
    with SwapProbe(info.gateway_url, api_key=info.api_key) as swap_probe:
        time.sleep(3.0)  # a few steady-state requests before the cycle starts
        record = run_cycle_with_lease(cycle)
        finished = time.time()
        time.sleep(3.0)
    deploy_s = record.get("timings_s", {}).get("deploy") if record else None
    window = (finished - deploy_s, finished) if deploy_s else None
    return record, swap_probe.summary(window), finished


def run_closed_loop(
    info,
    config: ClosedLoopConfig,
    work_dir: Path,
    progress: Progress = print,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """K rounds of collect -> finetune -> evaluate on a running stack (see the module docstring).

    ``on_round`` gets the results so far after every round (the CLI writes the reports each time,
    so an interrupted run still leaves its finished rounds).
    """
    from finetune_worker.rewards import make_reward_fn
    from finetune_worker.train import make_embed
    from musicrl.buffer import PreferenceBuffer
    from musicrl.registry import Registry
    from musicrl.storage import ObjectStore

    started = time.monotonic()
    settings = finetune_settings(info, work_dir, config.finetune_overrides())
    warning = overrides_warning(config.finetune_overrides())
    if warning:
        progress(warning)
    store = ObjectStore(settings)
    registry = Registry(store)
    base_version = registry.versions("generator")[0]
    policies = work_dir / "policies"
    base_dir = registry.download("generator", base_version, policies / base_version)
    embed = make_embed(settings.finetune_text_encoder)
    reward_fn = make_reward_fn(info.reward_url)
    progress(f"sampling and judging {config.eval_prompts * config.eval_samples} held-out base clips")
    judge = HeldOutJudge(base_dir, config, embed)
    sanity = judge.base_sanity(base_dir).to_dict()
    progress(f"base vs base (other seeds): {sanity['win_rate']:.3f} [{sanity['ci_low']:.3f}, {sanity['ci_high']:.3f}]")
    base_scores = policy_rewards(base_dir, base_dir, config, embed, reward_fn)
    rounds: list[dict[str, Any]] = [
        {
            "round": 0,
            "policy_version": base_version,
            "preferences_total": 0,
            "win_rate": None,
            "checkpoint_sha256": registry.manifest("generator", base_version).get("files", {}),
            "base_vs_base": sanity,
            "rewards": base_scores,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    ]
    preferences_total = 0
    for round_index in range(1, config.rounds + 1):
        current = registry.current("generator")
        before = preferences_on(PreferenceBuffer(store, settings.bucket_buffer), current)
        collection = collect_votes(
            info.gateway_url, config.pairs_per_round, config, round_index, progress, api_key=info.api_key
        )
        if collection.failures:
            progress(
                f"round {round_index}: {len(collection.failures)} failed listener requests, "
                f"first: {collection.failures[0]}"
            )
        on_policy = wait_for_buffer(store, settings.bucket_buffer, current, before)
        landed_at = time.time()
        preferences_total += on_policy - before
        progress(f"round {round_index}: {on_policy - before} preferences on policy {current} in the buffer; finetuning")
        record, swap, deployed_at = run_round_cycle(info, settings, config.hot_swap_probe)
        served = registry.current("generator")
        served_dir = (
            registry.download("generator", served, policies / served)
            if not (policies / served).is_dir()
            else policies / served
        )
        win = judge.win_rate(served_dir).to_dict()
        scores = policy_rewards(served_dir, base_dir, config, embed, reward_fn)
        base_now = policy_rewards(
            base_dir, base_dir, config, embed, reward_fn
        )  # the base under this round's reward model
        rm = (record or {}).get("reward_model", {})
        row = {
            "round": round_index,
            "policy_version": served,
            "parent_version": current,
            "preferences_round": on_policy - before,
            "preferences_total": preferences_total,
            "votes": dict(collection.votes),
            "listener_failures": len(collection.failures),
            "collect_s": round(collection.seconds, 1),
            "cycle": {
                k: (record or {}).get(k)
                for k in ("run_id", "status", "reason", "candidate_version", "timings_s", "n_preferences")
            },
            "reward_model": {
                k: rm.get(k)
                for k in (
                    "published",
                    "n_train_pairs",
                    "n_heldout_pairs",
                    "heldout_accuracy",
                    "heldout_accuracy_before",
                    "heldout_accuracy_text_adherence_only",
                    "heldout_accuracy_quality_only",
                    "train_accuracy",
                    "skipped",
                )
            },
            "gate": {
                k: (record or {}).get("gate", {}).get(k) for k in ("passed", "candidate", "baseline", "chosen_step")
            },
            "train_last_step": (record or {}).get("train_history_last"),
            "win_rate": win,
            "rewards": scores,
            "base_rewards_same_rm": base_now,
            "hot_swap": swap,
            "preference_to_deployed_s": round(deployed_at - collection.last_vote_sent_at, 1)
            if record and record.get("status") == "deployed"
            else None,
            "buffer_landed_s": round(landed_at - collection.last_vote_sent_at, 1),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        rounds.append(row)
        if on_round is not None:
            on_round(_summary(config, base_version, rounds, started, settings))
        progress(
            f"round {round_index}: cycle {row['cycle']['status']}, serving {served}, win rate vs base "
            f"{win['win_rate']:.3f} [{win['ci_low']:.3f}, {win['ci_high']:.3f}] "
            f"({win['wins']}-{win['losses']}-{win['ties']}), "
            f"RM accuracy {rm.get('heldout_accuracy')}, KL {scores.get('kl')}, elapsed {row['elapsed_s']:.0f} s"
        )
    return _summary(config, base_version, rounds, started, settings)


# Win rate against the base a run's final policy should reach (with its interval above 0.5), per population.
RUN_TARGET = {"default": 0.70, "opposite": 0.65}


def _summary(
    config: ClosedLoopConfig, base_version: str, rounds: list[dict[str, Any]], started: float, settings
) -> dict[str, Any]:
    final = rounds[-1]["win_rate"] or {}
    target = RUN_TARGET.get(config.population, 0.70)
    return {
        "experiment": "closed_loop",
        "population": config.population,
        "seed": config.seed,
        "config": asdict(config),
        "finetune_settings": effective_finetune_settings(settings),
        "algorithm_overrides": algorithm_overrides(config.finetune_overrides()),
        "machine": machine(),
        "base_version": base_version,
        "rounds": rounds,
        "final": {
            "policy_version": rounds[-1]["policy_version"],
            **final,
            "target_win_rate": target,
            "target_met": bool(final and final["win_rate"] >= target and final["ci_low"] > 0.5),
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "evaluation": "held-out population (same taste distribution, other individuals), full listens, a verdict on "
        "every pair; policy and base sampled in-process from registry checkpoints with identical seeds",
    }


# --------------------------------------------------------------------------- reports


def _finite(value: Any) -> Any:
    """NaN and infinity (a reward model with no decided held-out pair) become null: the file stays strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_reports(results: dict[str, Any], out_dir: Path, prefix: str = "closed_loop") -> list[Path]:
    results = _finite(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{prefix}.json"
    json_path.write_text(json.dumps(results, indent=2, default=str, allow_nan=False) + "\n")
    table_path = out_dir / f"{prefix}_table.md"
    table_path.write_text(results_table(results))
    plot_path = out_dir / f"{prefix}_winrate.png"
    plot_win_rate(results, plot_path)
    return [json_path, table_path, plot_path]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(results: dict[str, Any]) -> str:
    """Markdown in the manner of the paper's Table 1: each round's policy against the base."""
    lines = [
        "| policy | round | preferences (total) | win rate vs base [95% CI] | W-L-T | reward-model accuracy "
        "| KL to base (nats/clip) | text adherence | quality MOS | user-preference reward (base, same RM) | cycle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rounds"]:
        win, rewards = row.get("win_rate"), row.get("rewards", {})
        base_pref = row.get("base_rewards_same_rm", {}).get("reward/preference")
        name = "base" if row["round"] == 0 else f"MusicRL-U round {row['round']}"
        win_text = (
            "50% (reference)" if win is None else f"{win['win_rate']:.1%} [{win['ci_low']:.1%}, {win['ci_high']:.1%}]"
        )
        record = "-" if win is None else f"{win['wins']}-{win['losses']}-{win['ties']}"
        lines.append(
            f"| {name} (v{row['policy_version']}) | {row['round']} | {row['preferences_total']} | {win_text} | "
            f"{record} | "
            f"{_fmt(row.get('reward_model', {}).get('heldout_accuracy'))} | {_fmt(rewards.get('kl'), 2)} | "
            f"{_fmt(rewards.get('reward/text_adherence'))} | {_fmt(rewards.get('reward/quality_mos'), 2)} | "
            f"{_fmt(rewards.get('reward/preference'))} ({_fmt(base_pref)}) | "
            f"{row.get('cycle', {}).get('status', '-')} |"
        )
    final = results["final"]
    lines += [
        "",
        f"Final policy v{final.get('policy_version')}: win rate {_fmt(final.get('win_rate'))} "
        f"(95% CI {_fmt(final.get('ci_low'))} to {_fmt(final.get('ci_high'))}); "
        f"target (>= {final.get('target_win_rate', 0.70):.2f}, CI above 0.5) "
        f"{'met' if final.get('target_met') else 'not met'}. Run took {results['elapsed_s'] / 60:.1f} min on "
        f"{results['machine']['cores']} cores ({results['machine']['cpu']}).",
        "",
    ]
    if "population" in results:
        lines.insert(-1, f"Listener population {results['population']!r}, seed {results.get('seed')}.")
    warning = overrides_warning(results.get("algorithm_overrides") or {})
    if warning:
        lines.insert(-1, f"Finetune settings: {warning}.")
    return "\n".join(lines)


def plot_win_rate(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rounds"] if r.get("win_rate")]
    x = [0] + [r["preferences_total"] for r in rows]
    y = [0.5] + [r["win_rate"]["win_rate"] for r in rows]
    low = [0.0] + [r["win_rate"]["win_rate"] - r["win_rate"]["ci_low"] for r in rows]
    high = [0.0] + [r["win_rate"]["ci_high"] - r["win_rate"]["win_rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=4, label="held-out listeners (95% Wilson CI)")
    ax.plot(
        x,
        [0.5] + [r["win_rate"]["expected_win_rate"] for r in rows],
        "--",
        color="grey",
        label="expected (no vote noise)",
    )
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.axhline(0.7, color="green", linestyle=":", label="target 70%")
    for xi, yi, row in zip(x[1:], y[1:], rows):
        ax.annotate(f"v{row['policy_version']}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("preferences collected (on-policy, cumulative)")
    ax.set_ylabel("win rate against the base policy")
    ax.set_ylim(0.3, 1.0)
    ax.set_title("Closed loop: served policy vs base, judged by held-out listeners")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- repeated runs


ACCEPTED = ("deployed", "published")  # a cycle whose candidate passed the gate


def _targets(
    population: str, median: float | None, good_runs: int, n_runs: int, accepted_share: float | None
) -> dict[str, bool]:
    """The issue's targets for a sweep (default: 5 runs; "4 of 5" scales to 80 % of the runs, rounded up)."""
    if population not in RUN_TARGET:
        return {}
    target = RUN_TARGET[population]
    targets = {f"median >= {target:.2f}": median is not None and median >= target}
    if population == "default":
        required = math.ceil(0.8 * n_runs)
        targets[f"runs_ge_65_ci_above_50 >= {required} of {n_runs}"] = good_runs >= required
        targets["accepted_share >= 0.8"] = accepted_share is not None and accepted_share >= 0.8
    return targets


def summarize_runs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of the experiment (``run_closed_loop`` results, one per seed, one population) condensed:
    each run's final win rate, accepted cycles and KL, and over the runs the median, range and
    interquartile range of the final win rate, the runs >= 0.65 with the interval above 0.5, the
    share of accepted cycles and the issue's targets as booleans."""
    if not results:
        raise ValueError("no runs to summarise")
    populations = {r.get("population", r.get("config", {}).get("population", "default")) for r in results}
    if len(populations) != 1:
        raise ValueError(f"runs of different populations: {sorted(populations)}")
    population = populations.pop()
    runs = []
    for result in results:
        final = result.get("final") or {}
        cycles = [row for row in result["rounds"] if row["round"] > 0]
        accepted = sum((row.get("cycle") or {}).get("status") in ACCEPTED for row in cycles)
        runs.append(
            {
                "seed": result.get("seed", result.get("config", {}).get("seed")),
                "population": population,
                "final_win_rate": final.get("win_rate"),
                "ci_low": final.get("ci_low"),
                "ci_high": final.get("ci_high"),
                "expected_win_rate": final.get("expected_win_rate"),
                "final_policy_version": final.get("policy_version"),
                "cycles_accepted": accepted,
                "cycles_total": len(cycles),
                "cycle_status": [(row.get("cycle") or {}).get("status") for row in cycles],
                "candidate_kl": [((row.get("gate") or {}).get("candidate") or {}).get("kl") for row in cycles],
                "win_rate_by_round": [(row.get("win_rate") or {}).get("win_rate") for row in cycles],
                "elapsed_min": round(result.get("elapsed_s", 0.0) / 60, 2),
            }
        )
    finals = np.array(
        [r["final_win_rate"] for r in runs if r["final_win_rate"] is not None and np.isfinite(r["final_win_rate"])],
        dtype=float,
    )
    good = sum(
        r["final_win_rate"] is not None and r["final_win_rate"] >= 0.65 and (r["ci_low"] or 0.0) > 0.5 for r in runs
    )
    total_cycles = sum(r["cycles_total"] for r in runs)
    accepted_cycles = sum(r["cycles_accepted"] for r in runs)
    accepted_share = accepted_cycles / total_cycles if total_cycles else None

    def stat(value: float) -> float:
        return round(float(value), 4)

    median = stat(np.median(finals)) if finals.size else None
    q25, q75 = np.percentile(finals, [25, 75]) if finals.size else (None, None)
    targets = _targets(population, median, good, len(runs), accepted_share)
    return {
        "experiment": "closed_loop_summary",
        "population": population,
        "n_runs": len(runs),
        "runs": runs,
        "final_win_rate": {
            "median": median,
            "min": stat(finals.min()) if finals.size else None,
            "max": stat(finals.max()) if finals.size else None,
            "q25": stat(q25) if finals.size else None,
            "q75": stat(q75) if finals.size else None,
            "iqr": stat(q75 - q25) if finals.size else None,
        },
        "runs_ge_65_ci_above_50": good,
        "cycles_accepted": accepted_cycles,
        "cycles_total": total_cycles,
        "accepted_share": round(accepted_share, 4) if accepted_share is not None else None,
        "median_elapsed_min": round(float(np.median([r["elapsed_min"] for r in runs])), 2),
        "median_target": RUN_TARGET.get(population),
        "algorithm_overrides": results[0].get("algorithm_overrides") or {},
        "targets": targets,
        "targets_met": bool(targets) and all(targets.values()),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"Closed loop, population {summary['population']!r}, {summary['n_runs']} run(s).",
        "",
        "| seed | final win rate vs base [95% CI] | expected | cycles accepted | KL of each cycle's candidate "
        "(nats/clip) | win rate per round | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in summary["runs"]:
        win = (
            "-"
            if run["final_win_rate"] is None
            else (f"{run['final_win_rate']:.1%} [{_pct(run['ci_low'])}, {_pct(run['ci_high'])}]")
        )
        lines.append(
            f"| {run['seed']} | {win} | {_fmt(run['expected_win_rate'])} | "
            f"{run['cycles_accepted']}/{run['cycles_total']} | "
            f"{', '.join(_fmt(kl, 2) for kl in run['candidate_kl']) or '-'} | "
            f"{', '.join(_fmt(w) for w in run['win_rate_by_round']) or '-'} | {run['elapsed_min']:.1f} |"
        )
    finals = summary["final_win_rate"]
    lines += [
        "",
        f"Final win rate over runs: median {_fmt(finals['median'])}, min {_fmt(finals['min'])}, "
        f"max {_fmt(finals['max'])}, "
        f"interquartile range {_fmt(finals['iqr'])} ({_fmt(finals['q25'])} to {_fmt(finals['q75'])}).",
        f"Runs >= 0.65 with the interval above 0.5: {summary['runs_ge_65_ci_above_50']} of {summary['n_runs']}. "
        f"Cycles accepted (deployed or published): {summary['cycles_accepted']} of {summary['cycles_total']} "
        f"({_fmt(summary['accepted_share'], 2)}). Median run time {summary['median_elapsed_min']:.1f} min.",
        "",
        "Targets: "
        + (
            "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in summary["targets"].items())
            or "none for this population"
        )
        + f". Overall: {'met' if summary['targets_met'] else 'not met'}.",
    ]
    warning = overrides_warning(summary.get("algorithm_overrides") or {})
    if warning:
        lines += ["", f"Finetune settings: {warning}."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Win rate against round, one line per run, the median final win rate and the 50 % and target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    last = 1
    for run in summary["runs"]:
        points = [(0, 0.5)] + [(i, w) for i, w in enumerate(run["win_rate_by_round"], start=1) if w is not None]
        last = max(last, points[-1][0])
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", alpha=0.8, label=f"seed {run['seed']}")
    median = summary["final_win_rate"]["median"]
    if median is not None:
        ax.plot(
            [last],
            [median],
            marker="D",
            markersize=10,
            color="black",
            linestyle="none",
            label=f"median final {median:.1%}",
        )
    ax.axhline(0.5, color="black", linewidth=0.8)
    if summary.get("median_target") is not None:
        ax.axhline(
            summary["median_target"], color="green", linestyle=":", label=f"target {summary['median_target']:.0%}"
        )
    ax.set_xlabel("round")
    ax.set_ylabel("win rate against the base policy")
    ax.set_xticks(range(last + 1))
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"Closed loop, population {summary['population']!r}: {summary['n_runs']} run(s)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(
    results: list[dict[str, Any]], out_dir: Path, prefix: str = "closed_loop_summary"
) -> tuple[dict[str, Any], list[Path]]:
    """``summarize_runs`` written as ``<prefix>.json``, ``.md`` and ``.png`` in ``out_dir``."""
    summary = _finite(summarize_runs([_finite(r) for r in results]))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / f"{prefix}.json", out_dir / f"{prefix}.md", out_dir / f"{prefix}.png"
    json_path.write_text(json.dumps(summary, indent=2, default=str, allow_nan=False) + "\n")
    md_path.write_text(summary_markdown(summary))
    plot_summary(summary, png_path)
    return summary, [json_path, md_path, png_path]
