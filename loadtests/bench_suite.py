"""``musicrl experiment bench-all``: every benchmark of the project, then BENCHMARKS.md.

Each component's benchmark runs as its own command (a subprocess, so one failing or
hanging does not take the others down) and writes its own results file:

benchmark | command | results
---|---|---
generation batching (gateway + Triton vs unbatched in-process) | `musicrl gateway bench` | results/serving.json
reward batching (micro-batched vs one by one) | `musicrl reward bench --private-store` | results/rewards.json
ingestion (gateway -> Kafka -> buffer; consumer vs bare kafka-python) | `musicrl consumer bench` | results/feedback.json
hot swap and preference-to-deployed-policy time | one round of the closed loop with a probe | results/hot_swap.json

The suite then collects the headline numbers of each file, with the machine's
description, into results/benchmarks.json and BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.closed_loop import machine

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Benchmark:
    name: str
    what: str
    argv: list[str]
    results: str

    def run(self, timeout_s: float, log_dir: Path) -> dict[str, Any]:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"bench_{self.name}.log"
        started = time.monotonic()
        try:
            with log_path.open("w") as log:
                code = subprocess.run(
                    self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
                ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        return {
            "name": self.name,
            "what": self.what,
            "command": " ".join(self.argv[3:]),
            "exit": code,
            "seconds": round(time.monotonic() - started, 1),
            "results": self.results,
            "log": str(log_path),
        }


def benchmarks(quick: bool) -> list[Benchmark]:
    cli = [sys.executable, "-m", "musicrl.cli"]
    serving = ["--requests-per-level", "16", "--concurrency", "1", "--concurrency", "8"] if quick else []
    rewards = ["--seconds", "4", "--clients", "1,8"] if quick else []
    feedback = ["--events", "5000", "--gateway-events", "500"] if quick else []
    return [
        Benchmark(
            "serving",
            "generation batching: gateway + Triton dynamic batcher vs unbatched in-process generation",
            [*cli, "gateway", "bench", *serving],
            "results/serving.json",
        ),
        Benchmark(
            "rewards",
            "reward batching: micro-batched scoring vs one clip at a time",
            [*cli, "reward", "bench", "--private-store", *rewards],
            "results/rewards.json",
        ),
        Benchmark(
            "feedback",
            "ingestion: preferences through gateway, Kafka and consumer into the buffer",
            [*cli, "consumer", "bench", *feedback],
            "results/feedback.json",
        ),
        Benchmark(
            "hot_swap",
            "hot swap under traffic, and time from a preference to a deployed policy trained on it",
            [*cli, "experiment", "hot-swap-bench"],
            "results/hot_swap.json",
        ),
    ]


# --------------------------------------------------------------------------- headline numbers


def _get(data: Any, *path: str | int) -> Any:
    for key in path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def _scalars(data: Any, prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Numbers and booleans of a results file down to ``depth`` levels (for files we know nothing about)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and depth >= 0:
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, (int, float, bool)):
                out[name] = value
            elif isinstance(value, dict):
                out |= _scalars(value, name + ".", depth - 1)
    return out


def headline(name: str, data: dict[str, Any]) -> dict[str, Any]:
    if name == "serving":
        levels = data.get("gateway") or []
        best = max(levels, key=lambda level: level.get("throughput_rps", 0), default={})
        return {
            "ratio_at_max_concurrency": data.get("ratio_at_max_concurrency"),
            "baseline_rps": _get(data, "baseline_unbatched_in_process", "throughput_rps"),
            "best_rps": best.get("throughput_rps"),
            "best_at_concurrency": best.get("concurrency"),
            "p95_ms_at_best": best.get("p95_ms"),
        }
    if name == "rewards":
        speedups = data.get("speedup_batched_over_one_by_one") or {}
        batched = [p for p in data.get("summary_medians_over_rounds") or [] if p.get("mode") == "batched"]
        best = max(batched, key=lambda p: p.get("clips_per_s", 0), default={})
        return {
            **{f"speedup_batched_vs_one_by_one_at_{k}_clients": v for k, v in speedups.items()},
            "best_batched_clips_per_s": best.get("clips_per_s"),
            "at_clients": best.get("clients"),
            "mean_batch_size_there": best.get("mean_batch_size"),
            "p95_ms_there": best.get("latency_p95_ms"),
        }
    if name == "feedback":
        bench = data.get("benchmark") or {}
        return {
            "gateway_to_buffer_events_per_s": _get(bench, "end_to_end_gateway_to_buffer", "events_per_s"),
            "consumer_events_per_s": _get(bench, "feedback_consumer", "events_per_s"),
            "bare_kafka_python_events_per_s": _get(bench, "bare_kafka_python_consumer", "events_per_s"),
            "consumer_vs_bare_ratio": bench.get("consumer_vs_bare_ratio"),
            **{
                f"fault_{name}_buffer_exact": _get(data, "fault_tests", name, "buffer_exact")
                for name in (data.get("fault_tests") or {})
            },
        }
    if name == "hot_swap":
        return {
            key: data.get(key)
            for key in (
                "steady_p99_ms",
                "swap_p99_ms",
                "p99_ratio",
                "steady_failed",
                "swap_failed",
                "requests",
                "requests_during_swap",
                "preference_to_deployed_s",
                "buffer_landed_s",
                "deploy_s",
                "round",
                "source",
            )
        }
    return dict(list(_scalars(data).items())[:14])


def collect(results: list[dict[str, Any]]) -> dict[str, Any]:
    for row in results:
        path = ROOT / row["results"]
        data = json.loads(path.read_text()) if path.is_file() else None
        row["headline"] = headline(row["name"], data) if data else {}
        row["results_updated"] = path.is_file() and (
            row["exit"] == "kept" or path.stat().st_mtime > time.time() - row["seconds"] - 5
        )
        if path.is_file():
            row["results_written_at"] = written_at(path, data)
    return {
        "machine": machine(),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "benchmarks": results,
    }


def written_at(path: Path, data: dict[str, Any] | None) -> str:
    """When a results file was measured: its own ``created_at``, else its last commit if unchanged since, else
    its mtime.

    A fresh clone gives every file the checkout time as mtime, so the mtime alone would date old results as new.
    """
    if data and isinstance(data.get("created_at"), str):
        return data["created_at"]
    git = ["git", "-C", str(ROOT)]
    unchanged = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", str(path)], capture_output=True).returncode == 0
    committed = subprocess.run(
        [*git, "log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ", "--", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC"},
    ).stdout.strip()
    if unchanged and committed:
        return committed
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `musicrl experiment bench-all` (loadtests/bench_suite.py); every number below comes from the",
        "results file named beside it, measured in the same run as its baseline. Rerun the suite to refresh.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB memory, Python {m['python']}, "
        f"torch {m['torch']}",
        f"({m['platform']}). Generated {report['generated_at']}.",
        "",
        "| benchmark | what | exit | seconds | results (written at) |",
        "|---|---|---|---|---|",
    ]
    for row in report["benchmarks"]:
        status = row["exit"] if row["results_updated"] else f"{row['exit']} (results not refreshed)"
        written = row.get("results_written_at", "missing")
        lines.append(
            f"| {row['name']} | {row['what']} | {status} | {row['seconds']} | `{row['results']}` ({written}) |"
        )
    for row in report["benchmarks"]:
        lines += ["", f"## {row['name']}", "", f"`musicrl {row['command']}` -> `{row['results']}`", ""]
        if row["headline"]:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {key} | {value} |" for key, value in row["headline"].items()]
        else:
            lines.append(f"No results (see {row['log']}).")
    summary_path = ROOT / "results" / "closed_loop_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        final = summary["final_win_rate"]
        lines += [
            "",
            "## closed loop (the headline experiment, not rerun by this suite)",
            "",
            f"`musicrl experiment closed-loop --seeds N` -> `results/closed_loop_summary.md`: {summary['n_runs']} runs "
            f"(population {summary['population']}), final win rate against the base: median {final['median']} "
            f"(min {final['min']}, max {final['max']}), judged by held-out listeners; see docs/closed_loop.md.",
        ]
    return "\n".join(lines) + "\n"


def run_suite(
    quick: bool, only: list[str] | None, timeout_s: float, log_dir: Path, progress=print, skip_existing: bool = False
) -> dict[str, Any]:
    results = []
    for bench in benchmarks(quick):
        if only and bench.name not in only:
            continue
        if skip_existing and (ROOT / bench.results).is_file():
            progress(f"{bench.name}: keeping {bench.results} (--skip-existing)")
            results.append(
                {
                    "name": bench.name,
                    "what": bench.what,
                    "command": " ".join(bench.argv[3:]),
                    "exit": "kept",
                    "seconds": 0.0,
                    "results": bench.results,
                    "log": "-",
                }
            )
            continue
        progress(f"running {bench.name}: {' '.join(bench.argv[3:])}")
        row = bench.run(timeout_s, log_dir)
        progress(f"{bench.name}: exit {row['exit']} after {row['seconds']} s")
        results.append(row)
    report = collect(results)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "benchmarks.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (ROOT / "BENCHMARKS.md").write_text(markdown(report))
    return report


# --------------------------------------------------------------------------- hot swap


def hot_swap_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The swap numbers of a closed-loop run (its last round that deployed, else its last) as results/hot_swap.json."""
    rounds = [r for r in results["rounds"] if r.get("hot_swap")]
    deployed = [r for r in rounds if r.get("cycle", {}).get("status") == "deployed"]
    row = (deployed or rounds or results["rounds"])[-1]
    swap = row.get("hot_swap") or {}
    steady, during = swap.get("steady", {}), swap.get("during_swap", {})
    ratio = during["p99_ms"] / steady["p99_ms"] if during.get("p99_ms") and steady.get("p99_ms") else None
    return {
        "steady_p99_ms": steady.get("p99_ms"),
        "steady_p50_ms": steady.get("p50_ms"),
        "steady_failed": steady.get("failed"),
        "swap_p99_ms": during.get("p99_ms"),
        "swap_p50_ms": during.get("p50_ms"),
        "swap_failed": during.get("failed"),
        "p99_ratio": round(ratio, 2) if ratio else None,
        "requests": (steady.get("requests") or 0) + (during.get("requests") or 0),
        "requests_during_swap": during.get("requests"),
        "versions_seen": swap.get("versions_seen"),
        "deploy_s": (row.get("cycle", {}).get("timings_s") or {}).get("deploy"),
        "cycle_status": row.get("cycle", {}).get("status"),
        "preference_to_deployed_s": row.get("preference_to_deployed_s"),
        "buffer_landed_s": row.get("buffer_landed_s"),
        "preferences": row.get("preferences_round"),
        "round": row.get("round"),
        "note": "probe: one client asking for 1 s clips every 0.5 s during the whole cycle; 'during swap' = requests "
        "overlapping the deploy step (install, load_model, pointer). preference_to_deployed_s = from the last "
        "vote of the round sent to the new policy deployed (buffer landing + reward model + RL + gate + deploy).",
        "machine": results["machine"],
    }
