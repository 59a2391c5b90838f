"""The finetune loop as a component of the local stack (``musicrl stack up``, see docs/stack.md).

Its provisioning step makes the stack serve a policy: on a fresh stack it publishes
the committed default models (``checkpoints/``: the base generator as version 1, the
text-adherence and quality reward models; a preference model initialised from the
base generator, as in the paper, when none is committed), and whenever Triton does not
serve the registry's current generator (a fresh or restarted Triton) it deploys it with
the worker's own verified deploy path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from musicrl.logging import get_logger
from musicrl.stack.processes import ManagedProcess, http_ok
from musicrl.stack.settings import StackSettings
from musicrl.stack.stack import StackInfo

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
REWARD_KINDS = ("text_adherence", "quality", "preference")
log = get_logger(__name__)


def finetune_work_dir(s: StackSettings) -> Path:
    """Where the stack's finetune loop keeps its runs: ``MUSICRL_FINETUNE_WORK_DIR``, else ``<stack data>/finetune``."""
    return Path(os.environ.get("MUSICRL_FINETUNE_WORK_DIR") or s.data_dir / "finetune")


def finetune_env(s: StackSettings) -> dict[str, str]:
    """What the worker needs beyond the stack's endpoints (the environment may override the defaults)."""
    local_defaults = {
        "MUSICRL_FINETUNE_WORK_DIR": str(finetune_work_dir(s)),
        "MUSICRL_FINETUNE_TORCH_THREADS": "1",
    }
    return (
        StackInfo(s).env()
        | {k: v for k, v in local_defaults.items() if k not in os.environ}
        | {"MUSICRL_FINETUNE_TRITON_REPO": str(s.triton_repo)}
    )


def finetune_process(s: StackSettings) -> ManagedProcess:
    """``musicrl finetune loop``: a cycle whenever enough new preferences arrive (see docs/finetune.md)."""
    port = s.stack_finetune_metrics_port
    env = finetune_env(s) | {"MUSICRL_FINETUNE_METRICS_PORT": str(port), "MUSICRL_FINETUNE_METRICS_HOST": s.stack_host}
    return ManagedProcess(
        "finetune",
        [sys.executable, "-m", "musicrl.cli", "finetune", "loop"],
        health=lambda: http_ok(f"http://{s.stack_host}:{port}/metrics"),
        ports={"metrics": port},
        env=env,
        cwd=ROOT,
        host=s.stack_host,
    )


def _publish(registry, kind: str, directory: Path, lineage: dict) -> str:
    version = registry.publish(kind, directory, metrics={}, lineage=lineage)
    registry.set_current(kind, version)
    log.info("stack.default_published", kind=kind, version=version, source=str(directory))
    return version


def publish_defaults(registry, checkpoints: Path = CHECKPOINTS) -> str | None:
    """Publish each committed default whose kind has no current version; returns the current generator."""
    import tempfile

    from musicrl.models.generator import load_generator
    from musicrl.models.preference import PreferenceRewardModel, save_preference_model

    generator = registry.current("generator")
    if generator is None:
        if not (checkpoints / "generator" / "weights.pt").is_file():
            log.warning("stack.no_base_generator", checkpoint=str(checkpoints / "generator"))
            return None
        generator = _publish(
            registry, "generator", checkpoints / "generator", {"source": "checkpoints/generator", "stage": "base"}
        )
    for name in REWARD_KINDS:
        kind = f"reward/{name}"
        if registry.current(kind) is not None:
            continue
        if (checkpoints / name).is_dir():
            _publish(registry, kind, checkpoints / name, {"source": f"checkpoints/{name}"})
        elif name == "preference":
            with tempfile.TemporaryDirectory() as tmp:
                base_dir = registry.download("generator", generator, Path(tmp) / "generator")
                model = PreferenceRewardModel.from_generator(load_generator(base_dir)[0])
                meta = {"training": {"note": "initialised from the base generator, not trained yet"}}
                _publish(
                    registry,
                    kind,
                    save_preference_model(model, Path(tmp) / "preference", meta),
                    {"source": f"generator {generator} (initialisation)"},
                )
    return generator


def serve_current_generator(s: StackSettings, checkpoints: Path = CHECKPOINTS) -> str | None:
    """Publish the committed defaults where the registry has none, and make Triton serve the current generator.

    Returns the version served, or None when there is nothing to serve yet (no checkpoint).
    """
    import tritonclient.http as triton_http

    from finetune_worker.deploy import Deployer
    from musicrl.config import ObjectStoreConfig
    from musicrl.registry import Registry
    from musicrl.storage import ObjectStore

    info = StackInfo(s)
    registry = Registry(ObjectStore(info.settings_for(ObjectStoreConfig)))
    current = publish_defaults(registry, checkpoints)
    if current is None:
        return None
    client = triton_http.InferenceServerClient(info.triton_http_url)
    try:
        if client.is_model_ready(s.triton_model_name, current):
            return current
    finally:
        client.close()
    deployer = Deployer(registry, s.triton_repo, info.triton_http_url, s.data_dir / "finetune", s.triton_model_name)
    deployer.deploy(current)
    log.info("stack.generator_deployed", version=current)
    return current
