"""``musicrl reward serve`` and ``musicrl reward bench``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("serve")
def serve(
    host: str = typer.Option(None, help="Bind address (default: MUSICRL_REWARD_HOST)."),
    port: int = typer.Option(None, help="Port (default: MUSICRL_REWARD_PORT)."),
) -> None:
    """Run the reward service (configuration from MUSICRL_* environment variables)."""
    import uvicorn

    from musicrl.device import set_inference_threads
    from musicrl.logging import configure_logging
    from reward_service.app import create_app
    from reward_service.settings import RewardSettings

    settings = RewardSettings()
    configure_logging(settings, service="reward")
    set_inference_threads(settings.reward_intra_op_threads)
    uvicorn.run(
        create_app(settings),
        host=host or settings.reward_host,
        port=port or settings.reward_port,
        log_config=None,
        access_log=False,
    )


@app.command("bench")
def bench(
    clients: str = typer.Option("1,8,32", help="Comma-separated numbers of concurrent clients."),
    seconds: float = typer.Option(8.0, help="Measured seconds per (mode, clients, round) point."),
    rounds: int = typer.Option(3, help="Alternating rounds per client count; the summary takes the median."),
    clip_s: float = typer.Option(10.0, help="Duration of each scored clip."),
    max_batch_size: int = typer.Option(32, help="Micro-batch size of the batched mode."),
    max_wait_ms: float = typer.Option(
        None, help="MUSICRL_REWARD_MAX_WAIT_MS of the batched mode (default: the service's)."
    ),
    source: str = typer.Option("tokens", help="How clips are sent: tokens, audio_b64 or clip_id."),
    out: Path = typer.Option(Path("results/rewards.json"), help="Where the results are written."),
    private_store: bool = typer.Option(
        False, help="Start a private object store and publish the checkpoints into it (else: the configured registry)."
    ),
    checkpoints: Path = typer.Option(Path("checkpoints"), help="Reward checkpoints published with --private-store."),
) -> None:
    """Clips per second with micro-batching versus one-by-one scoring, at several client counts."""
    from benchmarks.reward_service import BenchConfig, run_bench
    from musicrl.device import set_inference_threads

    set_inference_threads(1)
    config = BenchConfig(
        clients=[int(c) for c in clients.split(",") if c.strip()],
        seconds=seconds,
        rounds=rounds,
        clip_s=clip_s,
        max_batch_size=max_batch_size,
        **({} if max_wait_ms is None else {"max_wait_ms": max_wait_ms}),
        source=source,
        out=out,
        private_store=private_store,
        checkpoints=checkpoints,
    )
    run_bench(config)
