"""Install generator checkpoints into a Triton model repository and load them.

Layout written (``repo_dir`` is what ``tritonserver --model-repository`` reads)::

    repo_dir/<model_name>/config.pbtxt       rendered from model_repository/generator/config.pbtxt
    repo_dir/<model_name>/<version>/model.py
    repo_dir/<model_name>/<version>/{config.json, weights.pt, meta.json}

``version`` is the policy version (an integer string); with
``version_policy: latest 1`` loading the model after installing a higher
version swaps the served policy while in-flight requests finish on the old one.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "model_repository" / "generator"
DEFAULT_TEXT_DIM = 384


@dataclass(frozen=True)
class BatchingConfig:
    """The Triton knobs of the generator model (see ``GatewaySettings.gateway_triton_*``)."""

    max_batch_size: int = 16
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    max_queue_delay_us: int = 20_000
    instance_count: int = 1

    @classmethod
    def from_settings(cls, settings) -> "BatchingConfig":
        return cls(
            max_batch_size=settings.gateway_triton_max_batch_size,
            preferred_batch_sizes=list(settings.gateway_triton_preferred_batch_sizes),
            max_queue_delay_us=settings.gateway_triton_max_queue_delay_us,
            instance_count=settings.triton_instance_count(),
        )


def render_config(model_name: str, batching: BatchingConfig, text_dim: int = DEFAULT_TEXT_DIM) -> str:
    preferred = [b for b in batching.preferred_batch_sizes if b <= batching.max_batch_size]
    template = string.Template((TEMPLATE_DIR / "config.pbtxt").read_text())
    return template.substitute(
        name=model_name,
        max_batch_size=batching.max_batch_size,
        text_dim=text_dim,
        instance_count=batching.instance_count,
        preferred_batch_sizes=", ".join(str(b) for b in preferred or [batching.max_batch_size]),
        max_queue_delay_us=batching.max_queue_delay_us,
    )


def install_version(
    repo_dir: str | Path,
    version: str | int,
    checkpoint_dir: str | Path,
    model_name: str = "generator",
    batching: BatchingConfig | None = None,
) -> Path:
    """Copy ``checkpoint_dir`` and the backend into ``repo_dir/model_name/version``.

    The model's ``config.pbtxt`` is written when missing or when ``batching`` is
    given, so a deployer that only adds versions keeps the operator's batching.
    """
    version = str(version)
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"a Triton model version is a positive integer, got {version!r}")
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "weights.pt").is_file() or not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a generator checkpoint (config.json, weights.pt)")
    model_dir = Path(repo_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)

    # Build the version next to its final place, then rename: Triton never sees half a version.
    staging = model_dir / f".{version}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint_dir, staging)
    shutil.copy2(TEMPLATE_DIR / "model.py", staging / "model.py")
    target = model_dir / version
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)

    config_path = model_dir / "config.pbtxt"
    if batching is not None or not config_path.exists():
        text_dim = json.loads((checkpoint_dir / "config.json").read_text()).get("text_dim", DEFAULT_TEXT_DIM)
        config_path.write_text(render_config(model_name, batching or BatchingConfig(), text_dim))
    return target


def installed_versions(repo_dir: str | Path, model_name: str = "generator") -> list[int]:
    model_dir = Path(repo_dir) / model_name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def load(triton_url: str, model_name: str = "generator", timeout_s: float = 300.0) -> None:
    """Ask Triton (HTTP endpoint ``host:port``) to (re)load ``model_name`` and wait until it is ready."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        triton_url.removeprefix("http://"), network_timeout=timeout_s, connection_timeout=timeout_s
    )
    try:
        client.load_model(model_name)
        deadline = time.monotonic() + timeout_s
        while not client.is_model_ready(model_name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton model {model_name} not ready after {timeout_s} s")
            time.sleep(0.2)
    finally:
        client.close()
