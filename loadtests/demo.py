"""``make demo``: one turn of the loop on the stack that ``musicrl stack up`` started.

Simulated listeners ask the real gateway for a few dozen pairs and vote through
``POST /v1/feedback``; the feedback consumer lands the votes in the on-policy buffer;
one small finetune cycle trains the reward model on them, finetunes the served policy
with the user-preference reward, gates it and hot-swaps it into Triton. The stack keeps
running afterwards, so the listening page (printed at the end) serves the new policy.
When a new policy was deployed, held-out listeners (``HeldOutJudge``) judge it against the
previous one. Running it again runs another turn on top of the last one.

The cycle uses the finetune worker's own defaults; the demo changes only the size of the
work (``DEMO_SIZE``, fields in ``loadtests.closed_loop.SIZE_FIELDS``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.closed_loop import (
    ClosedLoopConfig,
    HeldOutJudge,
    _finite,
    algorithm_overrides,
    collect_votes,
    effective_finetune_settings,
    finetune_settings,
    overrides_warning,
    preferences_on,
    wait_for_buffer,
)

# The size of the demo's cycle: a few minutes on 2 cores. Everything else is the worker's default
# (docs/finetune.md); finetune_duration_s follows DemoConfig.clip_s.
DEMO_SIZE: dict[str, Any] = {
    "finetune_steps": 12,
    "finetune_duration_s": 5.0,
    "finetune_torch_threads": 1,
    "finetune_eval_prompts": 8,
    "finetune_corpus_captions": 64,
    "finetune_rm_min_pairs": 16,
}

# The held-out comparison of the new policy with the previous one: 96 paired comparisons.
DEMO_EVAL_PROMPTS = 24
DEMO_EVAL_SAMPLES = 4


@dataclass
class DemoConfig:
    pairs: int = 400  # about 110 preferences; 5 of 5 clean runs deployed (docs/closed_loop.md)
    clip_s: float = 5.0
    concurrency: int = 4
    seed: int = 0


def judge_against_previous(
    store, version_before: str, version_after: str, config: DemoConfig, embed, work_dir: Path
) -> dict[str, Any]:
    """Win rate of ``version_after`` against ``version_before`` (the judge's base), by held-out listeners."""
    from musicrl.registry import Registry

    registry = Registry(store)
    before_dir = registry.download("generator", version_before, work_dir / "policies" / version_before)
    after_dir = registry.download("generator", version_after, work_dir / "policies" / version_after)
    judge_config = ClosedLoopConfig(
        eval_prompts=DEMO_EVAL_PROMPTS, eval_samples=DEMO_EVAL_SAMPLES, clip_s=config.clip_s, seed=config.seed
    )
    judge = HeldOutJudge(before_dir, judge_config, embed)
    return judge.win_rate(after_dir).to_dict()


def run_demo(
    config: DemoConfig, progress=print, results_path: Path | None = Path("results/demo.json")
) -> dict[str, Any]:
    from finetune_worker.cycle import FinetuneCycle
    from finetune_worker.loop import run_cycle_with_lease
    from musicrl.buffer import PreferenceBuffer
    from musicrl.registry import Registry
    from musicrl.stack import Stack, StackSettings
    from musicrl.stack.processes import wait_until_healthy
    from musicrl.stack.stack import default_components
    from musicrl.storage import ObjectStore
    from serving.client import api_key_headers

    stack_settings = StackSettings()
    stack = Stack(stack_settings, default_components(stack_settings))
    unhealthy = [s.name for s in stack.status() if not s.healthy]
    if unhealthy:
        raise RuntimeError(f"not running or unhealthy: {', '.join(unhealthy)}; start the stack with `musicrl stack up`")
    info = stack.info
    progress(f"waiting for the gateway at {info.gateway_url} to serve the generator")
    wait_until_healthy(info.gateway_url + "/readyz", 300, name="gateway", interval_s=1.0)

    overrides = DEMO_SIZE | {"finetune_duration_s": config.clip_s}
    work_dir = stack_settings.data_dir / "demo"
    settings = finetune_settings(info, work_dir, overrides)
    warning = overrides_warning(overrides)
    if warning:
        progress(warning)
    store = ObjectStore(settings)
    registry, buffer = Registry(store), PreferenceBuffer(store, settings.bucket_buffer)
    version_before = registry.current("generator")
    preference_before = registry.current("reward/preference")
    before = preferences_on(buffer, version_before)

    loop_config = ClosedLoopConfig(
        pairs_per_round=config.pairs,
        clip_s=config.clip_s,
        concurrency=config.concurrency,
        seed=config.seed + int(time.time()),
    )  # each turn hears new prompts and seeds
    progress(f"{config.pairs} simulated listeners ask for pairs from policy v{version_before} and vote")
    collection = collect_votes(info.gateway_url, config.pairs, loop_config, 1, progress, api_key=info.api_key)
    if collection.failures:
        raise RuntimeError(f"{len(collection.failures)} listener requests failed, first: {collection.failures[0]}")
    progress("waiting for the feedback consumer to land the votes in the buffer")
    on_policy = wait_for_buffer(store, settings.bucket_buffer, version_before, before, settle_s=12.0)

    progress("one finetune cycle: reward model, REINFORCE on the user-preference reward, gate, hot swap")
    record = run_cycle_with_lease(FinetuneCycle(settings))
    if record is None:
        raise RuntimeError(
            "the finetune loop of the stack is running a cycle (it holds the lease); try again in a minute"
        )
    after = httpx.post(
        f"{info.gateway_url}/v1/generations",
        json={"prompt": "bright lively marimba melody", "duration_s": 2.0},
        headers=api_key_headers(info.api_key),
        timeout=120,
    ).json()
    rm = record.get("reward_model", {})
    gate = record.get("gate", {})
    version_after = registry.current("generator")
    win_rate, no_win_rate = None, None
    if version_after != version_before:
        from finetune_worker.train import make_embed

        progress(
            f"held-out listeners judge v{version_after} against v{version_before} "
            f"({DEMO_EVAL_PROMPTS} prompts x {DEMO_EVAL_SAMPLES} samples)"
        )
        win_rate = judge_against_previous(
            store, version_before, version_after, config, make_embed(settings.finetune_text_encoder), work_dir
        )
    else:
        no_win_rate = (
            f"no new policy deployed (cycle {record['status']}"
            + (f": {record['reason']}" if record.get("reason") else "")
            + ")"
        )
    summary = {
        "listen_at": info.gateway_url + "/",
        "votes": dict(collection.votes),
        "buffer_rows_new": on_policy - before,
        "buffer_rows_total": sum(buffer.counts_by_policy().values()),
        "reward_model": {
            "version_before": preference_before,
            "published": rm.get("published"),
            "heldout_accuracy": rm.get("heldout_accuracy"),
            "train_pairs": rm.get("n_train_pairs"),
            "skipped": rm.get("skipped"),
        },
        "policy_before": version_before,
        "policy_after": version_after,
        "served_now": sorted({clip["policy_version"] for clip in after["clips"]}),
        "cycle": {"status": record["status"], "reason": record.get("reason"), "timings_s": record.get("timings_s")},
        "gate": {
            "passed": gate.get("passed"),
            "reward_candidate": gate.get("candidate", {}).get("reward"),
            "reward_parent": gate.get("baseline", {}).get("reward"),
            "kl": gate.get("candidate", {}).get("kl"),
        },
        "win_rate_vs_previous": win_rate,
        "win_rate_vs_previous_reason": no_win_rate,
        "finetune_settings": effective_finetune_settings(settings),
        "algorithm_overrides": algorithm_overrides(overrides),
    }
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(_finite(summary), indent=2, default=str, allow_nan=False) + "\n")
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
        "reward model: "
        + (
            f"v{rm['published']} published, held-out accuracy {accuracy:.3f} on {rm['train_pairs']} training pairs"
            if rm.get("published")
            else f"v{rm['version_before']} kept ({rm.get('skipped') or _accuracy_text(accuracy)})"
        ),
        f"finetune cycle: {cycle['status']}"
        + (f" ({cycle['reason']})" if cycle.get("reason") else "")
        + (
            f"; gate {'passed' if gate['passed'] else 'failed'}: preference reward {gate['reward_parent']:.3f} -> "
            f"{gate['reward_candidate']:.3f}, KL {gate['kl']:.2f} nats/clip"
            if gate.get("passed") is not None
            else ""
        ),
        f"policy: v{summary['policy_before']} before, v{summary['policy_after']} now "
        f"(the gateway serves v{', v'.join(summary['served_now'])})",
        win_rate_line(summary),
        f"listen: {summary['listen_at']}   (stop everything with `musicrl stack down`)",
    ]
    return lines


def win_rate_line(summary: dict[str, Any]) -> str:
    win = summary.get("win_rate_vs_previous")
    if not win:
        return (
            f"held-out listeners: nothing to compare, {summary.get('win_rate_vs_previous_reason') or 'no new policy'}"
        )
    if win.get("win_rate") is None or win["win_rate"] != win["win_rate"]:  # every comparison a tie (NaN, null in JSON)
        return (
            f"held-out listeners prefer neither v{summary['policy_after']} nor v{summary['policy_before']}: "
            f"all ties ({win['wins']}-{win['losses']}-{win['ties']})"
        )
    return (
        f"held-out listeners prefer v{summary['policy_after']} over v{summary['policy_before']}: "
        f"{win['win_rate']:.1%} [{100 * win['ci_low']:.1f}, {100 * win['ci_high']:.1f}] "
        f"({win['wins']}-{win['losses']}-{win['ties']})"
    )


def summarize_demo_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several `make demo` runs, each on a clean stack: how often a new policy was deployed, and how it fared."""
    deployed = [r for r in runs if r["policy_after"] != r["policy_before"]]
    rates = [r["win_rate_vs_previous"]["win_rate"] for r in deployed if r.get("win_rate_vs_previous")]
    return {
        "runs": len(runs),
        "deployed": len(deployed),
        "target_met": len(runs) >= 5 and len(deployed) >= 4,  # issue 14: a new policy in at least 4 of 5 runs
        "win_rate_vs_previous": rates,
        "median_win_rate_vs_previous": float(np.median(rates)) if rates else None,
        "per_run": [
            {
                "status": r["cycle"]["status"],
                "reason": r["cycle"].get("reason"),
                "policy_after": r["policy_after"],
                "win_rate_vs_previous": r.get("win_rate_vs_previous"),
                "reward_model": r["reward_model"],
                "timings_s": r["cycle"].get("timings_s"),
            }
            for r in runs
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m loadtests.demo SUMMARY.json RUN.json...``: write the summary of several demo runs."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: python -m loadtests.demo SUMMARY.json RUN.json [RUN.json ...]")
    summary = summarize_demo_runs([json.loads(Path(path).read_text()) for path in argv[1:]])
    Path(argv[0]).write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{summary['deployed']} of {summary['runs']} runs deployed a new policy; held-out win rate against the "
        f"previous policy: {', '.join(f'{r:.1%}' for r in summary['win_rate_vs_previous'])}"
    )


if __name__ == "__main__":
    main()
