"""Headless locust runs with CSV and HTML reports, and their summary.

``run_locust`` starts locust in a subprocess (it monkey-patches the standard
library with gevent, so it stays out of this process) and ``summarize`` turns
its ``*_stats.csv`` into the numbers people read: requests, failures, rate and
latency percentiles per endpoint.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# apps, listeners: one kind of user; steady: both, a fixed number; mix: both, ramped.
Scenario = Literal["apps", "listeners", "steady", "mix"]
LOCUSTFILES = {
    "apps": Path(__file__).with_name("locustfile.py"),
    "listeners": Path(__file__).with_name("locustfile.py"),
    "steady": Path(__file__).with_name("locustfile.py"),
    "mix": Path(__file__).with_name("locustfile_ramp.py"),
}
USER_CLASSES = {"apps": ["AppUser"], "listeners": ["ListenerUser"], "steady": [], "mix": []}


@dataclass(frozen=True)
class LocustRun:
    scenario: Scenario
    host: str
    users: int
    spawn_rate: float
    run_time_s: int
    out_dir: Path
    env: dict[str, str]

    @property
    def prefix(self) -> Path:
        return self.out_dir / self.scenario

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "locust",
            "-f", str(LOCUSTFILES[self.scenario]),
            "--headless",
            "--host", self.host,
            "--csv", str(self.prefix),
            "--html", str(self.prefix) + ".html",
            "--run-time", f"{self.run_time_s}s",
            "--stop-timeout", "30",
            "--only-summary",
            "--loglevel", "WARNING",
        ]  # fmt: skip
        if self.scenario != "mix":  # the mix's LoadTestShape sets users and rates itself
            command += ["--users", str(self.users), "--spawn-rate", str(self.spawn_rate)]
        return command + USER_CLASSES[self.scenario]


def run_locust(run: LocustRun, timeout_s: float | None = None) -> tuple[int, dict]:
    """Run locust to completion; return its exit code (1 when any request failed) and the summary."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **run.env, "LOADTEST_VOTES_FILE": str(run.prefix) + "_votes.json"}
    if run.scenario == "mix":
        env.setdefault("LOADTEST_RAMP_USERS", str(run.users))
        env.setdefault("LOADTEST_RAMP_SECONDS", str(run.run_time_s))
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    completed = subprocess.run(run.command(), env=env, timeout=timeout_s, capture_output=True, text=True)
    (run.out_dir / f"{run.scenario}_locust.log").write_text(completed.stdout + completed.stderr)
    summary = summarize(Path(str(run.prefix) + "_stats.csv"))
    votes_file = Path(str(run.prefix) + "_votes.json")
    summary.update(
        scenario=run.scenario,
        host=run.host,
        users=run.users,
        run_time_s=run.run_time_s,
        exit_code=completed.returncode,
        settings={k: v for k, v in run.env.items() if k.startswith("LOADTEST_")},
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        votes=json.loads(votes_file.read_text())["votes"] if votes_file.exists() else {},
    )
    (run.out_dir / f"{run.scenario}_summary.json").write_text(json.dumps(summary, indent=2))
    history = Path(str(run.prefix) + "_stats_history.csv")
    if history.exists():
        plot_history(history, Path(str(run.prefix) + ".png"), title=f"locust {run.scenario} against {run.host}")
    return completed.returncode, summary


def summarize(stats_csv: Path) -> dict:
    """Requests, failures, requests/s and latency percentiles (ms) per endpoint and in total."""
    if not stats_csv.exists():
        raise FileNotFoundError(f"locust wrote no statistics at {stats_csv} (see the *_locust.log next to it)")
    endpoints = {}
    with stats_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            name = "total" if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}".strip()
            endpoints[name] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "requests_per_s": round(float(row["Requests/s"]), 3),
                "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]),
                "p99_ms": _number(row["99%"]),
                "max_ms": _number(row["Max Response Time"]),
            }
    total = endpoints.get("total", {"requests": 0, "failures": 0})
    return {"endpoints": endpoints, "requests": total["requests"], "failures": total["failures"]}


def _number(text: str) -> float | None:
    return None if text in ("", "N/A") else round(float(text), 1)


def plot_history(history_csv: Path, png: Path, title: str) -> None:
    """Users, requests/s, failures/s and latency percentiles over the run (all endpoints together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in csv.DictReader(history_csv.open(newline="")) if row["Name"] == "Aggregated"]
    if not rows:
        return
    start = int(rows[0]["Timestamp"])
    seconds = [int(row["Timestamp"]) - start for row in rows]
    figure, (load, latency) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    load.plot(seconds, [float(row["Requests/s"]) for row in rows], label="requests/s")
    load.plot(seconds, [float(row["Failures/s"]) for row in rows], label="failures/s", color="tab:red")
    load.plot(seconds, [int(row["User Count"]) for row in rows], label="users", color="tab:gray", linestyle="--")
    load.set_ylabel("per second / users")
    load.legend(loc="upper left")
    for percentile in ("50%", "95%", "99%"):
        latency.plot(seconds, [_number(row[percentile]) for row in rows], label=f"p{percentile[:-1]}")
    latency.set_ylabel("latency (ms, all endpoints)")
    latency.set_xlabel("seconds")
    latency.legend(loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
