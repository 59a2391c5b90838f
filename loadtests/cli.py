"""``musicrl experiment ...``: load tests with simulated apps and listeners.

Heavy imports (locust, numpy) stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("locust")
def locust_command(
    host: str = typer.Option("http://127.0.0.1:8080", help="Base URL of the generation gateway."),
    scenario: str = typer.Option("mix", help="apps | listeners | mix (a ramp of both)."),
    users: int = typer.Option(4, min=1, help="Concurrent users (the plateau of the mix)."),
    spawn_rate: float = typer.Option(1.0, min=0.01, help="Users started per second."),
    run_time_s: int = typer.Option(300, min=1, help="Length of the run in seconds."),
    out_dir: Path = typer.Option(Path("results/locust"), help="Where the CSV, HTML and summary go."),
    duration_s: float = typer.Option(5.0, help="Seconds of audio per clip (LOADTEST_DURATION_S)."),
    app_rate: float = typer.Option(0.5, help="Requests per second per app user (LOADTEST_APP_RATE)."),
    listen_speed: float = typer.Option(1.0, help="Listening time divisor (LOADTEST_LISTEN_SPEED)."),
    seed: int = typer.Option(0, help="Seed of the listener population (LOADTEST_SEED)."),
) -> None:
    """Run locust headless against a gateway; write CSV, HTML and a JSON summary; exit 1 on any failure."""
    from rich.console import Console
    from rich.table import Table

    from loadtests.locust_runner import LocustRun, run_locust

    if scenario not in ("apps", "listeners", "mix"):
        raise typer.BadParameter(f"unknown scenario {scenario!r}; expected apps, listeners or mix")
    env = {
        "LOADTEST_DURATION_S": str(duration_s),
        "LOADTEST_APP_RATE": str(app_rate),
        "LOADTEST_LISTEN_SPEED": str(listen_speed),
        "LOADTEST_SEED": str(seed),
    }
    run = LocustRun(scenario, host, users, spawn_rate, run_time_s, out_dir, env)  # type: ignore[arg-type]
    console = Console()
    with console.status(f"locust: {scenario}, {users} users, {run_time_s} s against {host}"):
        code, summary = run_locust(run, timeout_s=run_time_s + 120)
    table = Table(title=f"locust {scenario} ({run_time_s} s, {users} users)")
    for column in ("endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column)
    for name, row in summary["endpoints"].items():
        table.add_row(name, *(str(row[key]) for key in ("requests", "failures", "requests_per_s", "p50_ms", "p95_ms", "p99_ms")))
    console.print(table)
    if summary["votes"]:
        console.print(f"votes: {summary['votes']}")
    console.print(f"reports: {run.prefix}_stats.csv, {run.prefix}.html, {out_dir / (scenario + '_summary.json')}")
    raise typer.Exit(0 if code == 0 and summary["failures"] == 0 else 1)
