"""``make demo``: one turn of the loop on the stack that ``musicrl stack up`` started.

Simulated listeners ask the real gateway for a few dozen pairs and vote through
``POST /v1/feedback``; the feedback consumer lands the votes in the on-policy buffer;
one small finetune cycle trains the reward model on them, finetunes the served policy
with the user-preference reward, gates it and hot-swaps it into Triton. The stack keeps
running afterwards, so the listening page (printed at the end) serves the new policy.
Running it again runs another turn on top of the last one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.closed_loop import ClosedLoopConfig, collect_votes, finetune_settings, preferences_on, wait_for_buffer, wait_ready

# Small enough for a few minutes on 2 cores; the loop's real defaults are in docs/finetune.md.
DEMO_FINETUNE: dict[str, Any] = {
    "finetune_stage": "U",
    "finetune_steps": 8,
    "finetune_batch_size": 8,
    "finetune_policy_lr": 1e-3,  # as in the closed-loop experiment (docs/closed_loop.md)
    "finetune_heldout_fraction": 0.25,  # a few dozen votes: keep enough held out to measure the reward model
    "finetune_duration_s": 5.0,
    "finetune_torch_threads": 1,
    "finetune_rm_min_pairs": 8,
    "finetune_rm_lr": 1e-3,
    "finetune_rm_epochs": 10,
    "finetune_eval_prompts": 8,
    "finetune_corpus_captions": 64,
    "finetune_recent_policies": 8,
}


@dataclass
class DemoConfig:
    pairs: int = 80
    clip_s: float = 5.0
    concurrency: int = 4
    seed: int = 0


def run_demo(config: DemoConfig, progress=print, results_path: Path | None = Path("results/demo.json")) -> dict[str, Any]:
    from finetune_worker.cycle import FinetuneCycle
    from finetune_worker.loop import run_cycle_with_lease
    from musicrl.buffer import PreferenceBuffer
    from musicrl.registry import Registry
    from musicrl.stack import Stack, StackSettings
    from musicrl.stack.stack import default_components
    from musicrl.storage import ObjectStore

    stack_settings = StackSettings()
    stack = Stack(stack_settings, default_components(stack_settings))
    unhealthy = [s.name for s in stack.status() if not s.healthy]
    if unhealthy:
        raise RuntimeError(f"not running or unhealthy: {', '.join(unhealthy)}; start the stack with `musicrl stack up`")
    info = stack.info
    progress(f"waiting for the gateway at {info.gateway_url} to serve the generator")
    wait_ready(info.gateway_url + "/readyz", 300)

    settings = finetune_settings(info, stack_settings.data_dir / "demo", DEMO_FINETUNE | {"finetune_duration_s": config.clip_s})
    store = ObjectStore(settings)
    registry, buffer = Registry(store), PreferenceBuffer(store, settings.bucket_buffer)
    version_before = registry.current("generator")
    preference_before = registry.current("reward/preference")
    before = preferences_on(buffer, version_before)

    loop_config = ClosedLoopConfig(pairs_per_round=config.pairs, clip_s=config.clip_s, concurrency=config.concurrency,
                                   seed=config.seed + int(time.time()))  # each turn hears new prompts and seeds
    progress(f"{config.pairs} simulated listeners ask for pairs from policy v{version_before} and vote")
    collection = collect_votes(info.gateway_url, config.pairs, loop_config, 1, progress)
    if collection.failures:
        raise RuntimeError(f"{len(collection.failures)} listener requests failed, first: {collection.failures[0]}")
    progress("waiting for the feedback consumer to land the votes in the buffer")
    on_policy = wait_for_buffer(store, settings.bucket_buffer, version_before, before, settle_s=12.0)

    progress("one finetune cycle: reward model, REINFORCE on the user-preference reward, gate, hot swap")
    record = run_cycle_with_lease(FinetuneCycle(settings))
    if record is None:
        raise RuntimeError("the finetune loop of the stack is running a cycle (it holds the lease); try again in a minute")
    after = httpx.post(f"{info.gateway_url}/v1/generations", json={"prompt": "bright lively marimba melody", "duration_s": 2.0},
                       timeout=120).json()
    rm = record.get("reward_model", {})
    gate = record.get("gate", {})
    summary = {
        "listen_at": info.gateway_url + "/",
        "votes": dict(collection.votes),
        "buffer_rows_new": on_policy - before,
        "buffer_rows_total": sum(buffer.counts_by_policy().values()),
        "reward_model": {"version_before": preference_before, "published": rm.get("published"),
                         "heldout_accuracy": rm.get("heldout_accuracy"), "train_pairs": rm.get("n_train_pairs"),
                         "skipped": rm.get("skipped")},
        "policy_before": version_before,
        "policy_after": registry.current("generator"),
        "served_now": sorted({clip["policy_version"] for clip in after["clips"]}),
        "cycle": {"status": record["status"], "reason": record.get("reason"), "timings_s": record.get("timings_s")},
        "gate": {"passed": gate.get("passed"), "reward_candidate": gate.get("candidate", {}).get("reward"),
                 "reward_parent": gate.get("baseline", {}).get("reward"), "kl": gate.get("candidate", {}).get("kl")},
    }
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _accuracy_text(accuracy: float | None) -> str:
    if accuracy is None or accuracy != accuracy:  # NaN: no decided held-out pair
        return "no decided held-out pair to measure the new one on"
    return f"the new one's held-out accuracy {accuracy:.3f} is not above chance"


def describe(summary: dict[str, Any]) -> list[str]:
    rm, gate, cycle = summary["reward_model"], summary["gate"], summary["cycle"]
    accuracy = rm["heldout_accuracy"]
    lines = [
        f"votes sent through POST /v1/feedback: {summary['votes']}",
        f"preferences landed in the buffer: {summary['buffer_rows_new']} new, {summary['buffer_rows_total']} in total",
        "reward model: " + (f"v{rm['published']} published, held-out accuracy {accuracy:.3f} on {rm['train_pairs']} training pairs"
                            if rm.get("published") else f"v{rm['version_before']} kept ({rm.get('skipped') or _accuracy_text(accuracy)})"),
        f"finetune cycle: {cycle['status']}" + (f" ({cycle['reason']})" if cycle.get("reason") else "")
        + (f"; gate {'passed' if gate['passed'] else 'failed'}: preference reward {gate['reward_parent']:.3f} -> "
           f"{gate['reward_candidate']:.3f}, KL {gate['kl']:.2f} nats/clip" if gate.get("passed") is not None else ""),
        f"policy: v{summary['policy_before']} before, v{summary['policy_after']} now (the gateway serves v{', v'.join(summary['served_now'])})",
        f"listen: {summary['listen_at']}   (stop everything with `musicrl stack down`)",
    ]
    return lines
