"""Install generator checkpoints into a Triton model repository and load them.

Layout written (``repo_dir`` is what ``tritonserver --model-repository`` reads)::

    repo_dir/<model_name>/config.pbtxt       rendered from model_repository/generator/config.pbtxt
    repo_dir/<model_name>/<version>/model.py
    repo_dir/<model_name>/<version>/{config.json, weights.pt, meta.json}

``version`` is the policy version (an integer string); with
``version_policy: latest 1`` loading the model after installing a higher
version swaps the served policy while in-flight requests finish on the old one.

One rule chooses where the repository is: a ``str`` starting with ``s3://`` is an
object-store repository ``s3://BUCKET/PREFIX`` (written through
``musicrl.storage.ObjectStore``, i.e. the ``MUSICRL_S3_*`` endpoint; Triton reads the
same place as ``--model-repository=s3://http://HOST:PORT/BUCKET/PREFIX``); anything
else is a local directory. In explicit model-control mode Triton reads a model's
files only on ``load_model``, so the version files are uploaded first, then
``config.pbtxt``, then the caller loads.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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


@dataclass(frozen=True)
class S3Repository:
    """An object-store model repository ``s3://BUCKET/PREFIX``."""

    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        return str(PurePosixPath(self.prefix, *parts)) if self.prefix else str(PurePosixPath(*parts))

    def url(self, *parts: str) -> str:
        return "s3://" + self.bucket + ("/" + self.key(*parts) if self.prefix or parts else "")

    def triton_url(self, s3_endpoint: str, secure: bool = False) -> str:
        """The ``--model-repository`` Triton reads this repository from (endpoint ``host:port``)."""
        return f"s3://{'https' if secure else 'http'}://{s3_endpoint}/{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")


def s3_repository(repo: str | Path) -> S3Repository | None:
    """``S3Repository`` for a ``str`` ``s3://BUCKET[/PREFIX]``; ``None`` for a local directory."""
    if not isinstance(repo, str) or not repo.startswith("s3://"):
        return None
    rest = repo.removeprefix("s3://").strip("/")
    if not rest or "://" in rest:
        raise ValueError(f"an object-store repository is s3://BUCKET/PREFIX, got {repo!r}")
    bucket, _, prefix = rest.partition("/")
    return S3Repository(bucket, prefix.strip("/"))


def _default_store(store):
    if store is not None:
        return store
    from musicrl.config import ObjectStoreConfig  # noqa: PLC0415
    from musicrl.storage import ObjectStore  # noqa: PLC0415

    return ObjectStore(ObjectStoreConfig())


def _check_checkpoint(version: str | int, checkpoint_dir: str | Path) -> tuple[str, Path]:
    version = str(version)
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"a Triton model version is a positive integer, got {version!r}")
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "weights.pt").is_file() or not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a generator checkpoint (config.json, weights.pt)")
    return version, checkpoint_dir


def install_version(
    repo_dir: str | Path,
    version: str | int,
    checkpoint_dir: str | Path,
    model_name: str = "generator",
    batching: BatchingConfig | None = None,
    store=None,
) -> Path | str:
    """Copy ``checkpoint_dir`` and the backend into ``repo_dir/model_name/version``.

    The model's ``config.pbtxt`` is written when missing or when ``batching`` is
    given, so a deployer that only adds versions keeps the operator's batching.
    Returns the version directory (a ``Path``), or its ``s3://`` URL for an
    object-store repository (``store``: an ``ObjectStore``, default from ``MUSICRL_S3_*``).
    """
    version, checkpoint_dir = _check_checkpoint(version, checkpoint_dir)
    s3 = s3_repository(repo_dir)
    if s3 is not None:
        return _install_s3(s3, _default_store(store), version, checkpoint_dir, model_name, batching)
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


def _install_s3(s3: S3Repository, store, version: str, checkpoint_dir: Path, model_name: str,
                batching: BatchingConfig | None) -> str:
    files = {p.relative_to(checkpoint_dir).as_posix(): p for p in sorted(checkpoint_dir.rglob("*")) if p.is_file()}
    files["model.py"] = TEMPLATE_DIR / "model.py"
    # A reinstall replaces the version: drop objects the new files do not overwrite.
    for key in list(store.list_keys(s3.bucket, s3.key(model_name, version) + "/")):
        if key.removeprefix(s3.key(model_name, version) + "/") not in files:
            store.delete(s3.bucket, key)
    for name, path in files.items():
        store.put_bytes(s3.bucket, s3.key(model_name, version, name), path.read_bytes())
    config_key = s3.key(model_name, "config.pbtxt")
    if batching is not None or not store.exists(s3.bucket, config_key):
        text_dim = json.loads((checkpoint_dir / "config.json").read_text()).get("text_dim", DEFAULT_TEXT_DIM)
        store.put_bytes(s3.bucket, config_key, render_config(model_name, batching or BatchingConfig(), text_dim).encode(),
                        "text/plain")
    return s3.url(model_name, version)


REPOSITORY_MARKER = "README.md"


def init_repository(repo_dir: str | Path, store=None) -> None:
    """Create an empty repository so that Triton can start on it.

    Triton refuses to start on an S3 prefix with no object under it ("repository
    path is not a valid directory"), so an object-store repository gets a
    ``README.md`` (a file, never taken for a model); a local one is created.
    """
    s3 = s3_repository(repo_dir)
    if s3 is None:
        Path(repo_dir).mkdir(parents=True, exist_ok=True)
        return
    store = _default_store(store)
    if not store.exists(s3.bucket, s3.key(REPOSITORY_MARKER)):
        text = "Triton model repository: <model>/config.pbtxt and <model>/<version>/ (serving.model_repository).\n"
        store.put_bytes(s3.bucket, s3.key(REPOSITORY_MARKER), text.encode(), "text/markdown")


def remove_version(repo_dir: str | Path, version: str | int, model_name: str = "generator", store=None) -> None:
    """Delete ``repo_dir/model_name/version`` (a missing one is fine)."""
    s3 = s3_repository(repo_dir)
    if s3 is None:
        shutil.rmtree(Path(repo_dir) / model_name / str(version), ignore_errors=True)
        return
    store = _default_store(store)
    for key in list(store.list_keys(s3.bucket, s3.key(model_name, str(version)) + "/")):
        store.delete(s3.bucket, key)


def export_version(repo_dir: str | Path, version: str | int, target: Path, model_name: str = "generator",
                   store=None) -> Path:
    """Copy ``repo_dir/model_name/version`` to the local directory ``target``."""
    s3 = s3_repository(repo_dir)
    target = Path(target)
    if s3 is None:
        shutil.copytree(Path(repo_dir) / model_name / str(version), target)
        return target
    store = _default_store(store)
    prefix = s3.key(model_name, str(version)) + "/"
    for key in list(store.list_keys(s3.bucket, prefix)):
        dest = target / key.removeprefix(prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.get_bytes(s3.bucket, key))
    return target


def installed_versions(repo_dir: str | Path, model_name: str = "generator", store=None) -> list[int]:
    s3 = s3_repository(repo_dir)
    if s3 is not None:
        prefix = s3.key(model_name) + "/"
        names = {k.removeprefix(prefix).split("/", 1)[0] for k in _default_store(store).list_keys(s3.bucket, prefix)
                 if "/" in k.removeprefix(prefix)}
        return sorted(int(n) for n in names if n.isdigit())
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
