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
    own_stack: Path = typer.Option(
        None, exists=True, file_okay=False,
        help="Generator checkpoint: start a private stack and gateway serving it, and test those instead of --host.",
    ),
) -> None:
    """Run locust headless against a gateway; write CSV, HTML and a JSON summary; exit 1 on any failure."""
    import contextlib
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from loadtests.local_target import local_gateway
    from loadtests.locust_runner import LocustRun, run_locust

    if scenario not in ("apps", "listeners", "mix"):
        raise typer.BadParameter(f"unknown scenario {scenario!r}; expected apps, listeners or mix")
    env = {
        "LOADTEST_DURATION_S": str(duration_s),
        "LOADTEST_APP_RATE": str(app_rate),
        "LOADTEST_LISTEN_SPEED": str(listen_speed),
        "LOADTEST_SEED": str(seed),
    }
    console = Console()
    with contextlib.ExitStack() as cleanup:
        if own_stack is not None:
            work_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="musicrl-locust-")))
            with console.status(f"starting a private stack and gateway serving {own_stack}"):
                host = cleanup.enter_context(local_gateway(own_stack, work_dir))
        run = LocustRun(scenario, host, users, spawn_rate, run_time_s, out_dir, env)  # type: ignore[arg-type]
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


@app.command("listeners")
def listeners_command(
    seed: int = typer.Option(0, help="Seed of the population and of the clips."),
    clips: int = typer.Option(60, min=2, help="Corpus clips to judge."),
    votes: int = typer.Option(400, min=1, help="Simulated votes on random pairs."),
    prompts: int = typer.Option(8, min=1, help="Prompts for the best-of-8 reachability check."),
    taste_spread: float = typer.Option(None, help="Override ListenerConfig.taste_spread."),
    temperature: float = typer.Option(None, help="Override ListenerConfig.temperature."),
    output: Path = typer.Option(Path("results/listeners.json"), help="Where to write the report."),
) -> None:
    """Calibrate the simulated listeners on corpus music: agreement, ties, abstention, reachability."""
    import json

    from rich.console import Console

    from loadtests.listener_report import calibrate
    from musicrl.listeners import ListenerConfig

    overrides = {"taste_spread": taste_spread, "temperature": temperature}
    config = ListenerConfig(**{k: v for k, v in overrides.items() if v is not None})
    report = calibrate(config, seed=seed, n_clips=clips, n_votes=votes, n_prompts=prompts)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    console = Console()
    for key in ("agreement", "no_vote_rate", "tie_rate_of_votes", "mean_listen_share", "heldout_win_rate_best_of_8"):
        console.print(f"{key:<28} {report[key]}")
    console.print(f"report: {output}")
