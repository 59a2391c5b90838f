"""``musicrl finetune run-once | loop | rollback VERSION | history``.

Configuration comes from ``MUSICRL_*`` variables (``FinetuneSettings``, see
docs/finetune.md). Errors are one line on stderr and exit code 1. SIGTERM and SIGINT
stop ``loop`` and ``run-once`` at the next safe point (``finetune_worker.shutdown``):
``loop`` then exits 0, ``run-once`` 3; ``rollback`` finishes its deploy first.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

Kind = Annotated[str, typer.Option("--kind", help="Registry kind: generator, reward/preference, reward/quality, reward/text_adherence.")]


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

    Exit code 0 when the candidate was deployed (or published, with auto-deploy off), 2 when it was rejected.
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
        console.print(f"run {record['run_id']}: {record['status']}"
                      + (f", version {record['candidate_version']}" if record.get("candidate_version") else "")
                      + (f" ({record['reason']})" if record.get("reason") else ""))
    if record["status"] not in ("deployed", "published"):
        raise typer.Exit(2)


@app.command("loop")
def loop_command(
    max_cycles: Annotated[Optional[int], typer.Option(help="Stop after this many cycles (default: run forever).")] = None,
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
    from finetune_worker.deploy import Deployer  # noqa: PLC0415
    from finetune_worker import shutdown  # noqa: PLC0415
    from musicrl.registry import Registry  # noqa: PLC0415
    from musicrl.storage import ObjectStore  # noqa: PLC0415

    settings = _settings()
    try:
        with shutdown.handle_signals():  # a deploy is never cut short: SIGTERM/SIGINT wait for it
            result = Deployer.from_settings(settings, Registry(ObjectStore(settings))).rollback(version)
    except Exception as err:  # noqa: BLE001
        raise _fail(err) from err
    console.print(f"serving generator {result['version']} (was {result['previous']}) after {result['deploy_s']:.1f} s")


@app.command("history")
def history(kind: Kind = "generator", json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Published versions with their metrics and lineage, and rejected candidates."""
    from musicrl.registry import Registry  # noqa: PLC0415
    from musicrl.storage import ObjectStore  # noqa: PLC0415

    settings = _settings()
    registry = Registry(ObjectStore(settings))
    try:
        rows, rejected = registry.history(kind), registry.rejections(kind)
    except Exception as err:  # noqa: BLE001
        raise _fail(err) from err
    if json_out:
        console.print_json(json.dumps({"versions": rows, "rejected": rejected}, default=str))
        return
    table = Table(title=f"{kind} versions")
    for column in ("version", "current", "created", "parent", "stage", "reward", "kl", "run"):
        table.add_column(column)
    for row in rows:
        lineage, gate = row.get("lineage", {}), row.get("metrics", {}).get("gate", {}).get("candidate", {})
        table.add_row(
            row["version"], "*" if row["is_current"] else "", row["created_at"], str(lineage.get("parent_version", "")),
            str(lineage.get("stage", "")), f"{gate['reward']:.4f}" if "reward" in gate else "",
            f"{gate['kl']:.3f}" if "kl" in gate else "", str(lineage.get("run_id", "")),
        )
    console.print(table)
    for rejection in rejected:
        console.print(f"rejected {rejection.get('recorded_at')}: {rejection.get('reason')}", highlight=False, markup=False)
