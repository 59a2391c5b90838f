"""Time `stack up` (cold and warm) and `stack down` on free ports, as `musicrl stack up` runs it.

    python -m musicrl.stack.bench [--rounds 3] [--out results/stack_startup.json]

Prints per-round numbers and writes the medians, each also as a fraction of
the 30 s start-up budget of the issue, to a JSON results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from musicrl.stack.binaries import PINNED, verified_path
from musicrl.stack.stack import Stack, free_port_settings

STARTUP_BUDGET_S = 30.0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_round(root: Path) -> dict[str, float]:
    stack = Stack(free_port_settings(root, stack_kafka_storage="s3"))
    per_component: dict[str, float] = {}
    cold = _timed(lambda: stack.up(on_started=lambda name, _new, seconds: per_component.__setitem__(name, seconds)))
    try:
        warm = _timed(stack.up)
    finally:
        down = _timed(stack.down)
    return {"cold_up_s": cold, "warm_up_s": warm, "down_s": down, **{f"{k}_up_s": v for k, v in per_component.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/stack_startup.json"))
    args = parser.parse_args(argv)

    verify_s = _timed(lambda: [verified_path(name) for name in PINNED])  # first check hashes every file
    rounds = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="musicrl-stack-bench-") as root:
            result = run_round(Path(root))
        rounds.append(result)
        print(f"round {i + 1}/{args.rounds}: " + "  ".join(f"{k}={v:.2f}" for k, v in result.items()), flush=True)

    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    summary = {
        "rounds": rounds,
        "median": medians,
        "sha256_verification_s": verify_s,
        "cold_up_fraction_of_budget": medians["cold_up_s"] / STARTUP_BUDGET_S,
        "budget_s": STARTUP_BUDGET_S,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"median cold up {medians['cold_up_s']:.2f} s ({summary['cold_up_fraction_of_budget']:.0%} of the "
        f"{STARTUP_BUDGET_S:.0f} s budget), warm up {medians['warm_up_s']:.2f} s, down {medians['down_s']:.2f} s; "
        f"sha256 verification {verify_s:.2f} s; written to {args.out}"
    )


if __name__ == "__main__":
    main()
