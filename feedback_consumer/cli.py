"""``musicrl consumer run|bench|schema``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "schemas" / "preference.v1.json"


@app.command()
def run() -> None:
    """Consume preferences into the on-policy buffer until SIGTERM/SIGINT (settings: MUSICRL_* env)."""
    import signal

    from feedback_consumer.consumer import FeedbackConsumer
    from feedback_consumer.metrics import serve_metrics
    from feedback_consumer.settings import ConsumerSettings
    from musicrl.config import InsecureSettings, refuse_development_secrets
    from musicrl.logging import configure_logging, get_logger

    settings = ConsumerSettings()
    configure_logging(settings, service="feedback-consumer")
    try:  # MUSICRL_ENV=production with the development object-store credentials
        problems = refuse_development_secrets(settings, "feedback consumer")
    except InsecureSettings as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if problems:
        get_logger("feedback_consumer").warning("development_settings", problems=problems)
    consumer = FeedbackConsumer(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: consumer.stop())
    if settings.consumer_metrics_port >= 0:
        server = serve_metrics(
            consumer.metrics, consumer.health, settings.consumer_metrics_host, settings.consumer_metrics_port
        )
        get_logger("feedback_consumer").info("metrics_listening", port=server.server_address[1])
    consumer.run()


@app.command()
def bench(
    events: int = typer.Option(20_000, help="Events for the consumer-vs-bare-consumer comparison."),
    gateway_events: int = typer.Option(2_000, help="Events posted through the gateway for the end-to-end rate."),
    concurrency: int = typer.Option(16, help="Concurrent HTTP clients posting feedback."),
    output: Path = typer.Option(Path("results/feedback.json"), help="Results file (merged into if present)."),
) -> None:
    """Benchmark on a private stack: gateway->buffer events/s and consumer vs bare kafka-python events/s."""
    from benchmarks.feedback import run_benchmark

    run_benchmark(events=events, gateway_events=gateway_events, concurrency=concurrency, output=output)


@app.command()
def schema(
    check: bool = typer.Option(False, help="Fail if the published file is out of date instead of writing it."),
) -> None:
    """Write the JSON Schema of preference.v1 to docs/schemas/preference.v1.json."""
    from musicrl.schemas.preference import json_schema_text

    text = json_schema_text()
    if check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            typer.echo(f"{SCHEMA_PATH} is out of date: run `musicrl consumer schema`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{SCHEMA_PATH} is up to date")
        return
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(text)
    typer.echo(f"wrote {SCHEMA_PATH}")
