"""``musicrl gateway ...``: serve the gateway, make API keys, install generator versions into Triton, benchmark."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default MUSICRL_GATEWAY_HOST)."),
    port: int = typer.Option(None, help="Port (default MUSICRL_GATEWAY_PORT)."),
) -> None:
    """Run the generation gateway (FastAPI on uvicorn)."""
    import uvicorn

    from musicrl.logging import configure_logging
    from serving.app import InsecureSettings, create_app
    from serving.settings import GatewaySettings

    settings = GatewaySettings()
    configure_logging(settings, service="gateway")
    try:
        app_ = create_app(settings)
    except InsecureSettings as err:  # MUSICRL_ENV=production with development secrets or no API keys
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    uvicorn.run(
        app_,
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


@app.command("new-key")
def new_key(
    name: str = typer.Option(..., help="Who gets the key (letters, digits, `_.-`); shown in logs and limits."),
    rate_per_min: int = typer.Option(
        None, min=1, help="Requests per minute (default MUSICRL_GATEWAY_KEY_RATE_PER_MIN)."
    ),
    max_concurrency: int = typer.Option(
        None, min=1, help="Requests in flight (default MUSICRL_GATEWAY_KEY_MAX_CONCURRENCY)."
    ),
) -> None:
    """Print a fresh API key and its MUSICRL_GATEWAY_API_KEYS entry (the gateway keeps only the hash)."""
    from pydantic import ValidationError

    from serving.services.auth import key_entry
    from serving.services.auth import new_key as make_key

    key = make_key()
    try:
        entry = key_entry(name, key, rate_per_min, max_concurrency)
    except ValidationError as err:
        raise typer.BadParameter(err.errors()[0]["msg"], param_hint="--name") from None
    typer.echo(f"key:   {key}")
    typer.echo(f"entry: {entry}")
    typer.echo(
        "Give the key to the app (MUSICRL_API_KEY); add the entry to MUSICRL_GATEWAY_API_KEYS (comma-separated).",
        err=True,
    )


@app.command("hash-key")
def hash_key(
    key: str = typer.Argument(..., help="The API key."),
    name: str = typer.Option(None, help="Print the whole MUSICRL_GATEWAY_API_KEYS entry for this name."),
) -> None:
    """Print the SHA-256 of an existing key (or its entry with --name)."""
    from serving.services.auth import hash_key as digest
    from serving.services.auth import key_entry

    typer.echo(key_entry(name, key) if name else digest(key))


@app.command("install-model")
def install_model(
    checkpoint: str = typer.Option(
        "checkpoints/generator",
        help="Policy version directory (the default generator's checkpoint or a MusicGen save_pretrained directory), "
        "or s3://BUCKET/PREFIX of one (downloaded into .data/weights first; docs/models.md).",
    ),
    version: int = typer.Option(None, help="Policy version (default: one above the highest installed)."),
    repo: str = typer.Option(
        None, help="Triton model repository: a directory or s3://BUCKET/PREFIX (default: the local stack's)."
    ),
    model_name: str = typer.Option(None, help="Triton model name (default MUSICRL_TRITON_MODEL_NAME)."),
    load: bool = typer.Option(True, help="Ask Triton to load the model after installing."),
) -> None:
    """Install a generator checkpoint as a Triton model version, with batching from the settings, and load it."""
    from musicrl.storage import ObjectStore
    from musicrl.weights import fetch_weights
    from serving.model_repository import BatchingConfig, install_version, installed_versions
    from serving.model_repository import load as load_model
    from serving.settings import GatewaySettings

    settings = GatewaySettings()
    store = ObjectStore(settings) if checkpoint.startswith("s3://") else None
    checkpoint = fetch_weights(checkpoint, store, Path(".data/weights"))
    model_name = model_name or settings.triton_model_name
    if repo is None:
        from musicrl.stack.settings import StackSettings

        repo = StackSettings().triton_repo
    if version is None:
        version = max(installed_versions(repo, model_name), default=0) + 1
    target = install_version(repo, version, checkpoint, model_name, BatchingConfig.from_settings(settings))
    typer.echo(f"installed {checkpoint} as {target}")
    if load:
        load_model(settings.triton_http_url, model_name)
        typer.echo(f"Triton at {settings.triton_http_url} serves {model_name} version {version}")


@app.command()
def bench(
    checkpoint: Path = typer.Option(
        Path("checkpoints/generator"), exists=True, file_okay=False, help="Generator checkpoint."
    ),
    concurrency: list[int] = typer.Option([1, 4, 16], help="Concurrent clients to measure."),
    requests_per_level: int = typer.Option(48, help="Requests per concurrency level."),
    duration_s: float = typer.Option(10.0, help="Seconds of audio per clip."),
    candidates: int = typer.Option(2, help="Clips per request."),
    output: Path = typer.Option(Path("results/serving.json"), help="Where to write the results."),
) -> None:
    """Gateway throughput and latency at several concurrencies against in-process unbatched generation.

    Starts its own stack (SeaweedFS, Tansu, Triton) in a temporary directory,
    installs the checkpoint and runs the gateway in this process on a free port.
    """
    from benchmarks.gateway import BenchConfig, run_bench

    config = BenchConfig(checkpoint, concurrency, requests_per_level, duration_s, candidates, output)
    results = run_bench(config)
    typer.echo(f"wrote {output}: ratio at {max(concurrency)} clients = {results['ratio_at_max_concurrency']:.2f}")


@app.command("bench-musicgen")
def bench_musicgen(
    checkpoint: Path = typer.Option(
        None,
        exists=True,
        file_okay=False,
        help="MusicGen directory; default: a tiny random MusicGen built for the run.",
    ),
    concurrency: list[int] = typer.Option([1, 8], help="Concurrent clients to measure."),
    clips_per_level: int = typer.Option(32, help="Clips per concurrency level and model."),
    duration_s: float = typer.Option(1.0, help="Seconds of audio per clip."),
    output: Path = typer.Option(Path("results/musicgen.json"), help="Where to write the results."),
) -> None:
    """A MusicGen policy through Triton with dynamic batching against the same model without, in one run,
    with the policy in this process as the baseline (benchmarks/gateway_musicgen.py)."""
    from benchmarks.gateway_musicgen import MusicgenBenchConfig, run_musicgen_bench

    results = run_musicgen_bench(MusicgenBenchConfig(checkpoint, concurrency, clips_per_level, duration_s, output))
    for level in results["levels"]:
        typer.echo(
            f"{level['concurrency']:>3} clients: batched {level['triton_batched']['clips_per_s']} clips/s, "
            f"unbatched {level['triton_unbatched']['clips_per_s']} clips/s, ratio {level['batched_vs_unbatched']}"
        )
    typer.echo(f"in process: {results['in_process_unbatched']['clips_per_s']} clips/s; wrote {output}")
