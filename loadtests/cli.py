"""``musicrl experiment ...``: load tests with simulated apps and listeners.

Heavy imports (locust, torch) stay inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loadtests.closed_loop import ClosedLoopConfig  # numpy and httpx: light enough for every command
from loadtests.demo import DemoConfig
from loadtests.reward_model_fit import RewardModelFitConfig  # numpy only at import

app = typer.Typer(no_args_is_help=True)


@app.command("locust")
def locust_command(
    host: str = typer.Option("http://127.0.0.1:8080", help="Base URL of the generation gateway."),
    scenario: str = typer.Option("mix", help="apps | listeners | steady (both, fixed users) | mix (both, ramped)."),
    users: int = typer.Option(4, min=1, help="Concurrent users (the plateau of the mix)."),
    spawn_rate: float = typer.Option(1.0, min=0.01, help="Users started per second."),
    run_time_s: int = typer.Option(300, min=1, help="Length of the run in seconds."),
    out_dir: Path = typer.Option(Path("results/locust"), help="Where the CSV, HTML and summary go."),
    duration_s: float = typer.Option(5.0, help="Seconds of audio per clip (LOADTEST_DURATION_S)."),
    app_rate: float = typer.Option(0.5, help="Requests per second per app user (LOADTEST_APP_RATE)."),
    listen_speed: float = typer.Option(1.0, help="Listening time divisor (LOADTEST_LISTEN_SPEED)."),
    seed: int = typer.Option(0, help="Seed of the listener population (LOADTEST_SEED)."),
    own_stack: Path = typer.Option(
        None,
        exists=True,
        file_okay=False,
        help="Generator checkpoint: start a private stack and gateway serving it, and test those instead of --host.",
    ),
) -> None:
    """Run locust headless against a gateway; write CSV, HTML and a JSON summary; exit 1 on any failure.

    The users present the API key in MUSICRL_API_KEY (with --own-stack: the private stack's key)."""
    import contextlib
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from loadtests.local_target import local_gateway
    from loadtests.locust_runner import LocustRun, run_locust

    if scenario not in ("apps", "listeners", "steady", "mix"):
        raise typer.BadParameter(f"unknown scenario {scenario!r}; expected apps, listeners, steady or mix")
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
                host, env["MUSICRL_API_KEY"] = cleanup.enter_context(local_gateway(own_stack, work_dir))
        run = LocustRun(scenario, host, users, spawn_rate, run_time_s, out_dir, env)  # type: ignore[arg-type]
        with console.status(f"locust: {scenario}, {users} users, {run_time_s} s against {host}"):
            code, summary = run_locust(run, timeout_s=run_time_s + 120)
    table = Table(title=f"locust {scenario} ({run_time_s} s, {users} users)")
    for column in ("endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column)
    for name, row in summary["endpoints"].items():
        table.add_row(
            name, *(str(row[key]) for key in ("requests", "failures", "requests_per_s", "p50_ms", "p95_ms", "p99_ms"))
        )
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

    from pydantic import ValidationError
    from rich.console import Console

    from loadtests.listener_report import calibrate
    from musicrl.listeners import ListenerConfig

    overrides = {"taste_spread": taste_spread, "temperature": temperature}
    try:
        config = ListenerConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from None
    report = calibrate(config, seed=seed, n_clips=clips, n_votes=votes, n_prompts=prompts)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    console = Console()
    for key in ("agreement", "no_vote_rate", "tie_rate_of_votes", "mean_listen_share", "heldout_win_rate_best_of_8"):
        console.print(f"{key:<28} {report[key]}")
    console.print(f"report: {output}")


def _finetune_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--finetune takes FIELD=VALUE (a FinetuneSettings field), got {pair!r}")
        overrides[key if key.startswith("finetune_") else f"finetune_{key}"] = value
    return overrides


@app.command("closed-loop")
def closed_loop_command(
    rounds: int = typer.Option(ClosedLoopConfig.rounds, min=1, help="Rounds of collect -> finetune -> evaluate."),
    pairs_per_round: int = typer.Option(
        ClosedLoopConfig.pairs_per_round, min=4, help="Pairs the training listeners ask for per round."
    ),
    clip_s: float = typer.Option(
        ClosedLoopConfig.clip_s, help="Seconds of audio per clip (collection, RL rollouts, evaluation)."
    ),
    eval_prompts: int = typer.Option(
        ClosedLoopConfig.eval_prompts, min=1, help="Held-out prompts of the win-rate evaluation."
    ),
    eval_samples: int = typer.Option(ClosedLoopConfig.eval_samples, min=1, help="Paired samples per held-out prompt."),
    concurrency: int = typer.Option(ClosedLoopConfig.concurrency, min=1, help="Listeners asking and voting at once."),
    seed: int = typer.Option(0, help="Seeds the populations, prompts and evaluation (the first run's, with --seeds)."),
    seeds: int = typer.Option(
        1, min=1, help="Independent runs with seeds SEED, SEED+1, ..., each on a fresh private stack."
    ),
    population: str = typer.Option(
        "default",
        help="Taste of the training listeners and the judges: default or opposite (musicrl.listeners.TASTES).",
    ),
    finetune: list[str] = typer.Option(
        [],
        help="FinetuneSettings override FIELD=VALUE (e.g. steps=60); repeatable. "
        "Fields other than the size of the work are recorded as algorithm overrides.",
    ),
    out_dir: Path = typer.Option(
        Path("results"),
        help="Where closed_loop.json, _winrate.png, _table.md (one run; with "
        "--seeds N in closed_loop_runs/POPULATION_seedK/) and "
        "closed_loop_summary.{json,md,png} go.",
    ),
    work_dir: Path = typer.Option(
        Path(".data/closed_loop"), help="Private stack, registry downloads, finetune runs (wiped before every run)."
    ),
) -> None:
    """The closed-loop experiment on a private stack of real servers and services (see docs/closed_loop.md).

    Exit code 0 when the summary's targets are met, 3 otherwise."""
    import shutil
    import signal
    import sys
    import time

    from rich.console import Console

    from loadtests.closed_loop import (
        overrides_warning,
        private_loop_stack,
        run_closed_loop,
        write_reports,
        write_summary,
    )
    from musicrl.listeners import TASTES

    if population not in TASTES:
        raise typer.BadParameter(f"unknown population {population!r}; known: {', '.join(sorted(TASTES))}")
    console = Console()
    overrides = _finetune_overrides(finetune)
    warning = overrides_warning(ClosedLoopConfig(clip_s=clip_s, finetune=overrides).finetune_overrides())
    if warning:
        console.print(f"warning: {warning}", highlight=False, markup=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the private stack is stopped
    started = time.monotonic()

    def progress(message: str) -> None:
        console.print(f"[{time.monotonic() - started:7.1f} s] {message}", highlight=False)

    runs = []
    for run_seed in range(seed, seed + seeds):
        config = ClosedLoopConfig(
            rounds=rounds,
            pairs_per_round=pairs_per_round,
            clip_s=clip_s,
            eval_prompts=eval_prompts,
            eval_samples=eval_samples,
            concurrency=concurrency,
            seed=run_seed,
            population=population,
            finetune=dict(overrides),
        )
        run_dir = out_dir if seeds == 1 else out_dir / "closed_loop_runs" / f"{population}_seed{run_seed}"
        shutil.rmtree(work_dir, ignore_errors=True)  # every run starts from the base policy on an empty stack
        progress(
            f"run {run_seed - seed + 1}/{seeds} (population {population!r}, seed {run_seed}): starting a private "
            "stack (SeaweedFS, Tansu, Triton, reward service, gateway, consumer)"
        )
        with private_loop_stack(work_dir) as info:
            progress(f"stack up; gateway {info.gateway_url}, reward service {info.reward_url}")
            results = run_closed_loop(
                info,
                config,
                work_dir,
                progress,
                on_round=lambda partial, run_dir=run_dir: write_reports(partial, run_dir),
            )
        for path in write_reports(results, run_dir):
            console.print(f"wrote {path}")
        runs.append(results)
        summary, paths = write_summary(runs, out_dir)  # after every run: an interrupted sweep keeps what finished
        console.print(f"wrote {', '.join(str(path) for path in paths)}")
    if seeds == 1:
        typer.echo((out_dir / "closed_loop_table.md").read_text())
    typer.echo((out_dir / "closed_loop_summary.md").read_text())
    raise typer.Exit(0 if summary["targets_met"] else 3)


@app.command("demo")
def demo_command(
    pairs: int = typer.Option(DemoConfig.pairs, min=4, help="Pairs the simulated listeners ask for and judge."),
    clip_s: float = typer.Option(ClosedLoopConfig.clip_s, help="Seconds of audio per clip."),
    seed: int = typer.Option(0, help="Seeds the listener population."),
) -> None:
    """One turn of the loop on the running stack (`musicrl stack up`): votes, buffer, finetune cycle, hot swap."""
    import time

    from rich.console import Console

    from loadtests.demo import DemoConfig, describe, run_demo
    from musicrl.config import BaseServiceSettings
    from musicrl.logging import configure_logging

    configure_logging(BaseServiceSettings(log_level="WARNING", log_json=False), service="demo")  # progress lines only
    console = Console()
    started = time.monotonic()

    def progress(message: str) -> None:
        console.print(f"[{time.monotonic() - started:6.1f} s] {message}", highlight=False)

    try:
        summary = run_demo(DemoConfig(pairs=pairs, clip_s=clip_s, seed=seed), progress)
    except (RuntimeError, TimeoutError) as err:
        Console(stderr=True).print(f"error: {err}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    console.rule(f"what happened ({time.monotonic() - started:.0f} s)")
    for line in describe(summary):
        console.print(line, highlight=False, markup=False)


@app.command("stack-loop")
def stack_loop_command(
    rounds: int = typer.Option(3, min=1, help="Rounds of votes; the stack's finetune loop decides each cycle."),
    votes_per_round: int = typer.Option(
        320, min=1, help="Votes (a, b or tie) sent through POST /v1/feedback per round."
    ),
    population: str = typer.Option("default", help="Taste of the listeners and judges: default | opposite."),
    seed: int = typer.Option(0, help="Seeds the listeners and the evaluation (the first seed with --seeds)."),
    seeds: int = typer.Option(
        1,
        min=1,
        help="Seeds run one after the other; more than 1 writes one file per seed in "
        "results/stack_loop_runs/ and results/stack_loop_summary.json.",
    ),
    output: Path = typer.Option(Path("results/stack_loop.json"), help="Results file (one seed)."),
    work_dir: Path = typer.Option(Path(".data/stack_loop"), help="The private stack (wiped at the start)."),
) -> None:
    """The whole stack as `musicrl stack up` runs it, fed votes only through the gateway: does its own loop deploy
    better policies?"""
    if seeds > 1:
        paths = [Path("results/stack_loop_runs") / f"seed{seed + offset}.json" for offset in range(seeds)]
        for offset, path in enumerate(paths):
            try:
                stack_loop_command(rounds, votes_per_round, population, seed + offset, 1, path, work_dir)
            except typer.Exit:
                pass  # a seed that misses the target is a result like any other
        stack_loop_summary_command(paths, Path("results/stack_loop_summary.json"))
        return
    import shutil
    import signal
    import sys
    import time

    from rich.console import Console

    from loadtests.stack_loop import StackLoopConfig, run_stack_loop, write_results
    from musicrl.listeners import ListenerConfig

    try:
        ListenerConfig.for_taste(population)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console = Console()
    started = time.monotonic()
    shutil.rmtree(work_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the private stack is stopped
    config = StackLoopConfig(rounds=rounds, votes_per_round=votes_per_round, population=population, seed=seed)
    results = run_stack_loop(
        work_dir, config, lambda m: console.print(f"[{time.monotonic() - started:7.1f} s] {m}", highlight=False)
    )
    write_results(results, output)
    for row in results["rounds"]:
        win = row.get("win_rate_vs_base")
        console.print(
            f"round {row['round']}: {row['status']} v{row['version']}"
            + (f", win rate vs base {win['win_rate']:.1%} [{win['ci_low']:.1%}, {win['ci_high']:.1%}]" if win else ""),
            highlight=False,
        )
    console.print(
        f"{results['deployed']} versions deployed in {len(results['rounds'])} rounds; target "
        f"{'met' if results['target_met'] else 'not met'}; wrote {output}"
    )
    raise typer.Exit(0 if results["target_met"] else 3)


@app.command("stack-loop-summary")
def stack_loop_summary_command(
    runs: list[Path] = typer.Argument(
        ..., help="Per-seed results of `stack-loop` (results/stack_loop_runs/seed*.json)."
    ),
    output: Path = typer.Option(Path("results/stack_loop_summary.json"), help="Summary file."),
) -> None:
    """Summarize stack-loop seeds: how many met the target, median and range of the last version's win rate."""
    from loadtests.stack_loop import summarize_seeds, write_results

    summary = summarize_seeds([json.loads(path.read_text()) for path in runs])
    write_results(summary, output)
    for row in summary["seeds"]:
        typer.echo(
            f"seed {row['seed']}: {row['deployed']}/{row['rounds']} deployed, last vs base "
            f"{row['final_win_rate']:.1%} [{row['ci_low'] or 0:.1%}, {row['ci_high'] or 0:.1%}], "
            f"target {'met' if row['target_met'] else 'not met'}"
        )
    final = summary["final_win_rate"]
    typer.echo(
        f"{summary['seeds_meeting_target']} of {summary['n_seeds']} seeds met the target; last version vs base: "
        f"median {final['median']:.1%} (range {final['min']:.1%} to {final['max']:.1%}); wrote {output}"
    )


@app.command("canary")
def canary_command(
    runs: int = typer.Option(5, min=1, help="Canaries per candidate (a worse and a better one)."),
    max_votes: int = typer.Option(400, min=1, help="Cap on decided votes per canary (the worker's default)."),
    alpha: float = typer.Option(
        0.05, min=0.001, max=0.49, help="Error rate of the sequential test (the worker's default)."
    ),
    share: float = typer.Option(
        1.0, min=0.01, max=1.0, help="Share of pairs in the canary (the worker's default is 0.5)."
    ),
    train_steps: int = typer.Option(30, min=1, help="REINFORCE steps that make each candidate from the base."),
    seed: int = typer.Option(0, help="Seeds the candidates' training and the listeners."),
    output: Path = typer.Option(Path("results/canary.json"), help="Results file (rewritten after every run)."),
    work_dir: Path = typer.Option(
        Path(".data/canary"), help="The private stack and the candidates (wiped at the start)."
    ),
) -> None:
    """Canary by preference on the real stack: a candidate trained to lose the listeners' votes and one trained to win
    them, each canaried --runs times; users' votes through the gateway promote, roll back or leave it inconclusive."""
    import shutil
    import signal
    import sys
    import time

    from rich.console import Console

    from loadtests.canary import CanaryExperimentConfig, run_canary_experiment, write_results

    console = Console()
    started = time.monotonic()
    shutil.rmtree(work_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the private stack is stopped
    config = CanaryExperimentConfig(
        runs=runs, max_votes=max_votes, alpha=alpha, share=share, train_steps=train_steps, seed=seed
    )
    results = run_canary_experiment(
        work_dir,
        config,
        lambda m: console.print(f"[{time.monotonic() - started:7.1f} s] {m}", highlight=False),
        on_run=lambda partial: write_results(partial, output),
    )
    write_results(results, output)
    for kind, row in results["summary"].items():
        console.print(
            f"{kind}: {row['promoted']} promoted, {row['rolled_back']} rolled back, {row['inconclusive']} inconclusive "
            f"of {row['runs']}; median {row['median_decided_votes']} decided votes, {row['median_canary_s']} s"
        )
    console.print(f"targets: {results['targets']}; {results['elapsed_s'] / 60:.1f} min; written to {output}")


@app.command("cycle-cost")
def cycle_cost_command(
    sizes: list[int] = typer.Option([500, 5000], help="Buffer sizes (preferences) to time; repeatable."),
    output: Path = typer.Option(Path("results/cycle_cost.json"), help="Results file."),
    work_dir: Path = typer.Option(Path(".data/cycle_cost"), help="Scratch directory for the trained models."),
    repeats: int = typer.Option(3, min=1, help="Timings per size (the median is reported)."),
) -> None:
    """Time the buffer-dependent part of a finetune cycle (the reward model) as the buffer grows."""
    from rich.console import Console

    from loadtests.cycle_cost import run_cycle_cost, write_results

    results = run_cycle_cost(sorted(sizes), work_dir, repeats)
    write_results(results, output)
    console = Console()
    for point in results["points"]:
        console.print(
            f"{point['buffer_preferences']:>6} preferences: {point['seconds']:.1f} s "
            f"({point['train_pairs']} training pairs), x{point['ratio_to_smallest']:.2f}",
            highlight=False,
        )
    console.print(f"flat within 30 %: {results['flat_within_30_percent']}; wrote {output}")
    raise typer.Exit(0 if results["flat_within_30_percent"] else 3)


@app.command("reliability")
def reliability_command(
    parts: str = typer.Option(
        ",".join(("auth", "votes", "bombs", "consumer", "schemathesis")),
        help="Comma-separated parts to run: auth, votes, bombs, consumer, schemathesis.",
    ),
    forged: int = typer.Option(1000, min=0, help="Forged or replayed votes sent through POST /v1/feedback."),
    valid: int = typer.Option(40, min=1, help="Valid votes interleaved with them (one generation each)."),
    buffer_sizes: str = typer.Option(
        "20000,200000", help="Votes in the synthetic buffers the consumer starts on, comma-separated."
    ),
    chunk_events: int = typer.Option(1000, min=1, help="Votes per chunk (ledger entry and segment) of those buffers."),
    bomb_repeats: int = typer.Option(3, min=1, help="Times each decode bomb is sent."),
    consumer_repeats: int = typer.Option(3, min=1, help="Consumer starts per buffer size (medians reported)."),
    max_examples: int = typer.Option(20, min=1, help="Schemathesis test cases per API operation (--max-examples)."),
    seed: int = typer.Option(0, help="Seeds the vote schedule and the synthetic buffers."),
    output: Path = typer.Option(Path("results/reliability.json"), help="Results file."),
    work_dir: Path = typer.Option(
        Path(".data/reliability"), help="Private stack, consumer logs, schemathesis reports (wiped at the start)."
    ),
) -> None:
    """Auth and limits, forged votes, decode bombs, consumer state and API fuzzing on a private stack
    (docs/reliability.md).

    Exit code 0 when every target of the parts run is met, 3 otherwise."""
    import shutil
    import signal
    import sys
    import time

    from rich.console import Console
    from rich.table import Table

    from loadtests.reliability import ReliabilityConfig, run_reliability, table_rows, write_results
    from musicrl.config import BaseServiceSettings
    from musicrl.logging import configure_logging

    try:
        config = ReliabilityConfig(
            parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
            forged=forged,
            valid=valid,
            buffer_sizes=tuple(int(size) for size in buffer_sizes.split(",") if size.strip()),
            chunk_events=chunk_events,
            bomb_repeats=bomb_repeats,
            consumer_repeats=consumer_repeats,
            max_examples=max_examples,
            seed=seed,
        )
        config.validate()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    configure_logging(BaseServiceSettings(log_level="WARNING", log_json=False), service="reliability")
    console = Console()
    started = time.monotonic()
    shutil.rmtree(work_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the private stack is stopped
    results = run_reliability(
        config,
        work_dir,
        lambda m: console.print(f"[{time.monotonic() - started:7.1f} s] {m}", highlight=False, markup=False),
    )
    write_results(results, output)
    table = Table(title=f"reliability ({results['seconds']['total']:.0f} s)")
    for column in ("part", "measure", "value"):
        table.add_column(column)
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    met = results["summary"]["all_met"]
    console.print(f"targets {'met' if met else 'NOT met'}; wrote {output}", highlight=False)
    raise typer.Exit(0 if met else 3)


@app.command("reward-model-fit")
def reward_model_fit_command(
    pool_pairs: int = typer.Option(
        RewardModelFitConfig.pool_pairs,
        min=5,
        help="Judged pairs (train-split prompts) the training sets are drawn from.",
    ),
    test_pairs: int = typer.Option(
        RewardModelFitConfig.test_pairs,
        min=1,
        help="Judged pairs (test-split prompts, held-out listeners) every model is tested on.",
    ),
    sizes: str = typer.Option(
        ",".join(map(str, RewardModelFitConfig.sizes)),
        help="Training-set sizes, comma-separated (110: a demo's usable preferences, 230: a closed-loop round's).",
    ),
    draws: int = typer.Option(RewardModelFitConfig.draws, min=1, help="Training sets drawn from the pool per size."),
    seed: int = typer.Option(0, help="Seeds the listeners, prompts, clips and draws."),
    out: Path = typer.Option(Path("results"), help="Where reward_model_fit.json and reward_model_fit.png go."),
) -> None:
    """Which reward-model fit (probe, finetune, finetune warm-started from the bootstrap) learns the users' taste
    from a few hundred votes, and how often would its check wrongly refuse it (see docs/closed_loop.md)."""
    from rich.console import Console
    from rich.table import Table

    from loadtests.reward_model_fit import TABLE_COLUMNS, run_reward_model_fit, table_rows, write_results
    from musicrl.config import BaseServiceSettings
    from musicrl.logging import configure_logging

    try:
        config = RewardModelFitConfig(
            pool_pairs=pool_pairs,
            test_pairs=test_pairs,
            draws=draws,
            seed=seed,
            sizes=tuple(sorted({int(size) for size in sizes.split(",") if size.strip()})),
        )
        config.validate()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    configure_logging(BaseServiceSettings(log_level="WARNING", log_json=False), service="reward-model-fit")
    results = run_reward_model_fit(config)
    paths = write_results(results, out)
    data = results["data"]
    table = Table(
        title=f"reward-model fits: {config.draws} draws per size, {data['test_pairs']} test pairs "
        f"({data['test_votes'].get('tie', 0)} ties), pool {data['pool_pairs']}"
    )
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for row in table_rows(results):
        table.add_row(*row)
    console = Console()
    console.print(table)
    bootstrap, oracle = (results["baselines"][key] for key in ("bootstrap_as_is", "oracle_mean_listener"))
    console.print(
        f"bootstrap model as is: {'-' if bootstrap is None else f'{bootstrap:.3f}'}; oracle (mean listener, "
        f"the ceiling): {'-' if oracle is None else f'{oracle:.3f}'}; chance 0.5",
        highlight=False,
    )
    console.print(f"wrote {', '.join(str(path) for path in paths)}", highlight=False)


@app.command("hot-swap-bench")
def hot_swap_bench_command(
    pairs: int = typer.Option(96, min=4, help="Pairs judged before the cycle."),
    steps: int = typer.Option(10, min=1, help="RL steps of the cycle."),
    output: Path = typer.Option(Path("results/hot_swap.json"), help="Results file."),
    work_dir: Path = typer.Option(Path(".data/hot_swap_bench"), help="Private stack and finetune run."),
    from_closed_loop: Path = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="Summarise the swap of an existing closed-loop run (results/closed_loop.json) instead of running one.",
    ),
) -> None:
    """Latency and failures of a probe during a hot swap vs steady state, and preference -> deployed policy time."""
    import json
    import shutil
    import signal
    import sys

    from rich.console import Console

    from loadtests.bench_suite import hot_swap_summary
    from loadtests.closed_loop import ClosedLoopConfig, private_loop_stack, run_closed_loop

    console = Console()
    # Only the size of the work differs from the closed loop's (the worker's defaults otherwise).
    config = ClosedLoopConfig(
        rounds=1,
        pairs_per_round=pairs,
        eval_prompts=8,
        eval_samples=2,
        reward_eval_prompts=4,
        finetune={
            "finetune_steps": steps,
            "finetune_rm_min_pairs": 10,
            "finetune_eval_prompts": 8,
            "finetune_corpus_captions": 64,
        },
    )
    if from_closed_loop is not None:
        results = json.loads(from_closed_loop.read_text())
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with private_loop_stack(work_dir) as info:
            results = run_closed_loop(info, config, work_dir, lambda message: console.print(message, highlight=False))
    summary = hot_swap_summary(results) | ({"source": str(from_closed_loop)} if from_closed_loop else {})
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    console.print_json(json.dumps({k: v for k, v in summary.items() if k not in ("machine", "note")}))
    raise typer.Exit(0 if summary["swap_failed"] == 0 and summary["steady_failed"] == 0 else 1)


@app.command("bench-all")
def bench_all_command(
    quick: bool = typer.Option(False, help="Fewer requests and shorter points per benchmark (a smoke run)."),
    only: list[str] = typer.Option([], help="Run only these (serving, rewards, feedback, hot_swap); repeatable."),
    timeout_s: float = typer.Option(1800.0, help="Longest one benchmark may run."),
    log_dir: Path = typer.Option(Path("results/bench_logs"), help="Output of each benchmark command."),
    skip_existing: bool = typer.Option(
        False, help="Keep a benchmark's results file when it exists instead of rerunning it."
    ),
) -> None:
    """Run every benchmark, then write BENCHMARKS.md and results/benchmarks.json with the machine's description."""
    import time

    from rich.console import Console

    from loadtests.bench_suite import run_suite

    console = Console()
    started = time.monotonic()
    report = run_suite(
        quick,
        only or None,
        timeout_s,
        log_dir,
        lambda message: console.print(f"[{time.monotonic() - started:7.1f} s] {message}", highlight=False),
        skip_existing,
    )
    console.print("wrote BENCHMARKS.md and results/benchmarks.json")
    failed = [row["name"] for row in report["benchmarks"] if row["exit"] not in (0, "kept")]
    if failed:
        console.print(f"failed: {', '.join(failed)}")
        raise typer.Exit(1)
