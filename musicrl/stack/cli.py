"""``musicrl stack up|down|status|logs|env``: the local stack of real servers.

Settings come from ``MUSICRL_STACK_*`` variables (see ``StackSettings``);
``--data-dir`` overrides ``MUSICRL_STACK_DATA_DIR``. Errors are one line on
stderr and exit code 1.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from musicrl.stack.binaries import StackError
from musicrl.stack.settings import StackSettings
from musicrl.stack.stack import COMPONENTS, SERVICES, Stack, default_components

app = typer.Typer(no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Directory for data, logs and PID files [env: MUSICRL_STACK_DATA_DIR]."),
]


def _stack(data_dir: Path | None) -> Stack:
    settings = StackSettings() if data_dir is None else StackSettings(stack_data_dir=data_dir)
    return Stack(settings, default_components(settings))


def _fail(err: Exception) -> typer.Exit:
    err_console.print(f"error: {err}", highlight=False, markup=False)
    return typer.Exit(1)


@app.command()
def up(data_dir: DataDir = None) -> None:
    """Start SeaweedFS, Tansu and Triton (what is not running yet), wait until healthy, create buckets and topics."""
    stack = _stack(data_dir)
    t0 = time.monotonic()

    def report(name: str, started_now: bool, seconds: float) -> None:
        state = f"started in {seconds:.1f} s" if started_now else "already running"
        console.print(f"  {name:<10} {state}")

    try:
        info = stack.up(on_started=report)
    except StackError as err:
        raise _fail(err) from None
    console.print(f"stack up in {time.monotonic() - t0:.1f} s (data: {info.data_dir})")
    table = Table("endpoint", "address", box=None)
    for name, address in info.endpoints().items():
        table.add_row(name, address)
    console.print(table)
    console.print(f'service environment: {stack.env_file}  (or: eval "$(musicrl stack env)")')
    if info.settings.stack_services:
        console.print(f"the gateway's API key: MUSICRL_API_KEY in that environment (kept in {info.api_key_file})")


@app.command()
def down(data_dir: DataDir = None) -> None:
    """Stop exactly the processes that `up` started (from their PID files)."""
    settings = StackSettings() if data_dir is None else StackSettings(stack_data_dir=data_dir)
    stopped = Stack(settings, COMPONENTS + SERVICES).down()  # services too, even if `up` ran without them
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(data_dir: DataDir = None) -> None:
    """Show each component's PID and health; exit 1 if any is not running and healthy."""
    stack = _stack(data_dir)
    table = Table("component", "pid", "health", box=None)
    all_healthy = True
    try:
        statuses = stack.status()
    except StackError as err:
        raise _fail(err) from None
    for component in statuses:
        all_healthy &= component.healthy
        health = (
            "[green]healthy[/]" if component.healthy else ("[red]unhealthy[/]" if component.pid else "[red]stopped[/]")
        )
        table.add_row(component.name, str(component.pid or "-"), health)
    console.print(table)
    if all_healthy:
        for name, address in stack.info.endpoints().items():
            console.print(f"  {name:<15} {address}")
    else:
        raise typer.Exit(1)


@app.command()
def logs(
    name: Annotated[str | None, typer.Argument(help="Component (seaweedfs, tansu, triton); all if omitted.")] = None,
    lines: Annotated[int, typer.Option("-n", "--lines", help="Lines from the end of each log.")] = 40,
    data_dir: DataDir = None,
) -> None:
    """Print the last lines of the components' logs."""
    stack = _stack(data_dir)
    names = [c.name for c in stack.components]
    if name is not None and name not in names:
        raise _fail(ValueError(f"unknown component {name!r}; one of {', '.join(names)}"))
    for component in [name] if name else names:
        path = stack.log_file(component)
        console.rule(f"{component}  ({path})")
        if path.exists():
            with path.open(errors="replace") as f:
                for line in deque(f, maxlen=lines):
                    console.out(line.rstrip("\n"), highlight=False)


@app.command()
def env(data_dir: DataDir = None) -> None:
    """Print `export MUSICRL_...=...` lines that point a shell at the stack."""
    for key, value in _stack(data_dir).info.env().items():
        typer.echo(f"export {key}={value}")
