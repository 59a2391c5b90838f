"""``musicrl finetune run-once | loop | rollback VERSION | history | bench-musicgen``.

Configuration comes from ``MUSICRL_*`` variables (``FinetuneSettings``, see
docs/finetune.md). Errors are one line on stderr and exit code 1. SIGTERM and SIGINT
stop ``loop`` and ``run-once`` at the next safe point (``finetune_worker.shutdown``):
``loop`` then exits 0, ``run-once`` 3; ``rollback`` finishes its deploy first.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

Kind = Annotated[
    str,
    typer.Option("--kind", help="Registry kind: generator, reward/preference, reward/quality, reward/text_adherence."),
]


STOPPED = 3  # run-once: stopped by a signal at a safe point; the run resumes at its stage next time


def _settings(warn: bool = False):
    """The worker's settings; with ``MUSICRL_ENV=production`` and the development object-store credentials,
    exit 1. ``warn``: log what production would refuse (the long-running ``loop``; not one-shot commands,
    whose output may be JSON)."""
    from finetune_worker.settings import FinetuneSettings  # noqa: PLC0415
    from musicrl.config import InsecureSettings, refuse_development_secrets  # noqa: PLC0415
    from musicrl.logging import configure_logging, get_logger  # noqa: PLC0415

    settings = FinetuneSettings()
    configure_logging(settings, service="finetune")
    try:
        problems = refuse_development_secrets(settings, "finetune worker")
    except InsecureSettings as err:
        raise _fail(err) from None
    if problems and warn:
        get_logger("finetune_worker").warning("finetune.development_settings", problems=problems)
    return settings


def _fail(err: Exception) -> typer.Exit:
    err_console.print(f"error: {err}", highlight=False, markup=False)
    return typer.Exit(1)


@app.command("run-once")
def run_once(json_out: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")] = False) -> None:
    """Run one cycle now (or resume the unfinished one): reward model, RL, gate, publish, deploy.

    Exit code 0 when the candidate was deployed (or published, with auto-deploy off), 2 when it was not (rejected,
    or with a canary rolled back or inconclusive: docs/canary.md).
    """
    from finetune_worker import shutdown  # noqa: PLC0415
    from finetune_worker.cycle import FinetuneCycle  # noqa: PLC0415
    from finetune_worker.loop import run_cycle_with_lease  # noqa: PLC0415

    settings = _settings()
    try:
        with shutdown.handle_signals():
            record = run_cycle_with_lease(FinetuneCycle(settings))
    except shutdown.ShutdownRequested as stop:
        err_console.print(f"{stop}; the run resumes at this stage next time", highlight=False, markup=False)
        raise typer.Exit(STOPPED) from None
    except Exception as err:  # noqa: BLE001 - one line for the operator; details are in the logs
        raise _fail(err) from err
    if record is None:
        raise _fail(RuntimeError("another finetune worker holds the lease; try again later"))
    if json_out:
        console.print_json(json.dumps(record, default=str))
    else:
        console.print(
            f"run {record['run_id']}: {record['status']}"
            + (f", version {record['candidate_version']}" if record.get("candidate_version") else "")
            + (f" ({record['reason']})" if record.get("reason") else "")
        )
    if record["status"] not in ("deployed", "published"):
        raise typer.Exit(2)


@app.command("loop")
def loop_command(
    max_cycles: Annotated[int | None, typer.Option(help="Stop after this many cycles (default: run forever).")] = None,
) -> None:
    """Watch the buffer and the clock; run a cycle whenever one is due (single flight via a lease).

    SIGTERM/SIGINT: the cycle in flight stops at its next safe point (a deploy in progress finishes first),
    the lease is released, exit code 0.
    """
    from finetune_worker import shutdown  # noqa: PLC0415
    from finetune_worker.cycle import FinetuneCycle  # noqa: PLC0415
    from finetune_worker.loop import loop  # noqa: PLC0415
    from musicrl.metrics import start_metrics_server  # noqa: PLC0415

    settings = _settings(warn=True)
    with shutdown.handle_signals() as stop:
        if settings.finetune_metrics_port:
            start_metrics_server(settings.finetune_metrics_port, host=settings.finetune_metrics_host)
        loop(FinetuneCycle(settings), stop=stop, max_cycles=max_cycles)


@app.command("rollback")
def rollback(version: Annotated[str, typer.Argument(help="Generator version to serve again.")]) -> None:
    """Serve an earlier generator version: verify it, load it in Triton, move the registry pointer."""
    from finetune_worker import shutdown  # noqa: PLC0415
    from finetune_worker.deploy import Deployer  # noqa: PLC0415
    from musicrl.registry import Registry  # noqa: PLC0415
    from musicrl.storage import ObjectStore  # noqa: PLC0415

    settings = _settings()
    try:
        with shutdown.handle_signals():  # a deploy is never cut short: SIGTERM/SIGINT wait for it
            result = Deployer.from_settings(settings, Registry(ObjectStore(settings))).rollback(version)
    except Exception as err:  # noqa: BLE001
        raise _fail(err) from err
    console.print(f"serving generator {result['version']} (was {result['previous']}) after {result['deploy_s']:.1f} s")


# The help is given here, not as a docstring: a docstring wrapped at 120 columns would wrap the command list too.
@app.command(
    "history",
    help=(
        "Published versions with their metrics and lineage, canaries (decision and the votes behind it), "
        "and rejected candidates."
    ),
)
def history(kind: Kind = "generator", json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    from finetune_worker.canary import describe  # noqa: PLC0415
    from musicrl.registry import Registry  # noqa: PLC0415
    from musicrl.storage import ObjectStore  # noqa: PLC0415

    settings = _settings()
    registry = Registry(ObjectStore(settings))
    try:
        rows, rejected, canaries = registry.history(kind), registry.rejections(kind), registry.canaries(kind)
    except Exception as err:  # noqa: BLE001
        raise _fail(err) from err
    if json_out:
        console.print_json(json.dumps({"versions": rows, "rejected": rejected, "canaries": canaries}, default=str))
        return
    table = Table(title=f"{kind} versions")
    for column in ("version", "current", "created", "parent", "stage", "reward", "kl", "run", "canary"):
        table.add_column(column)
    canary_of = {str(c.get("version")): c for c in canaries}  # the newest canary of each version
    for row in rows:
        canary = canary_of.get(str(row["version"]))
        lineage, gate = row.get("lineage", {}), row.get("metrics", {}).get("gate", {}).get("candidate", {})
        table.add_row(
            row["version"],
            "*" if row["is_current"] else "",
            row["created_at"],
            str(lineage.get("parent_version", "")),
            str(lineage.get("stage", "")),
            f"{gate['reward']:.4f}" if "reward" in gate else "",
            f"{gate['kl']:.3f}" if "kl" in gate else "",
            str(lineage.get("run_id", "")),
            ""
            if canary is None
            else f"{canary.get('state')} {(canary.get('votes') or {}).get('wins', 0)}-"
            f"{(canary.get('votes') or {}).get('losses', 0)}",
        )
    console.print(table)
    for canary in canaries:
        console.print(
            describe(canary) + (f"; {canary['decision_reason']}" if canary.get("decision_reason") else ""),
            highlight=False,
            markup=False,
        )
    for rejection in rejected:
        console.print(
            f"rejected {rejection.get('recorded_at')}: {rejection.get('reason')}", highlight=False, markup=False
        )


@app.command("bench-musicgen")
def bench_musicgen(
    checkpoint: Annotated[
        str | None, typer.Option(help="MusicGen directory; default: a tiny random MusicGen built for the run.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rollouts per step (the worker's default is 16).")] = 16,
    duration_s: Annotated[float, typer.Option(help="Seconds per rollout.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Timed steps, after one warm-up step.")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    output: Annotated[
        str, typer.Option(help="Results file; the numbers are merged in under rl_step.")
    ] = "results/musicgen.json",
) -> None:
    """Tokens per second of one REINFORCE step on a MusicGen policy (benchmarks/rl_step_musicgen.py)."""
    from pathlib import Path  # noqa: PLC0415

    from benchmarks.rl_step_musicgen import RLBenchConfig, run_rl_step_bench  # noqa: PLC0415

    results = run_rl_step_bench(
        RLBenchConfig(
            Path(checkpoint) if checkpoint else None, batch_size, 4, duration_s, steps, 1, device, Path(output)
        )
    )
    typer.echo(
        f"RL step: {results['tokens_per_step']} tokens in {results['step_s_median']} s "
        f"= {results['tokens_per_s']} tokens/s "
        f"(sampling {results['sample_tokens_per_s']}, update {results['update_tokens_per_s']} tokens/s); wrote {output}"
    )
