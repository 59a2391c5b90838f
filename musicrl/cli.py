"""The ``musicrl`` command line: one entry point, one sub-command per component.

Each component owns its Typer app in its own package and keeps heavy imports
(torch, tritonclient, ...) inside its commands so ``musicrl stack up`` stays fast.
"""

import typer

from feedback_consumer.cli import app as consumer_app
from finetune_worker.cli import app as finetune_app
from loadtests.cli import app as experiment_app
from musicrl.models.cli import app as models_app
from musicrl.stack.cli import app as stack_app
from reward_service.cli import app as reward_app
from serving.cli import app as gateway_app

app = typer.Typer(help="MusicRL: text-to-music serving with an online RLHF loop.", no_args_is_help=True)
app.add_typer(stack_app, name="stack", help="Start, stop and inspect the local stack of real servers.")
app.add_typer(models_app, name="models", help="Build the corpus, train, evaluate and export the default model suite.")
app.add_typer(gateway_app, name="gateway", help="The generation gateway (FastAPI) and the Triton model repository.")
app.add_typer(reward_app, name="reward", help="The reward microservice.")
app.add_typer(consumer_app, name="consumer", help="The feedback consumer (Kafka -> on-policy buffer).")
app.add_typer(finetune_app, name="finetune", help="Reward-model training, RLHF, evaluation gate, registry, hot swap.")
app.add_typer(experiment_app, name="experiment", help="Simulated listeners, load tests, closed loop and benchmarks.")

if __name__ == "__main__":
    app()
