"""Install generator checkpoints into a Triton model repository and load them.

Layout written (``repo_dir`` is what ``tritonserver --model-repository`` reads)::

    repo_dir/<model_name>/config.pbtxt       rendered from model_repository/generator/config.pbtxt
    repo_dir/<model_name>/<version>/model.py  a shim: imports serving.triton_backend (the installed package's code)
    repo_dir/<model_name>/<version>/{config.json, weights.pt, meta.json, manifest.json}
                                              (or a MusicGen save_pretrained directory: musicrl.models.policy)

``version`` is the policy version (an integer string); with
``version_policy: latest 1`` loading the model after installing a higher
version swaps the served policy while in-flight requests finish on the old one.

The repository is writable (the finetune worker deploys into it), so it carries data,
not code: a version's ``model.py`` is :data:`SHIM_SOURCE`, which imports the backend from
the musicrl package installed in the Triton image (``serving.triton_backend``, which runs
``model_repository/generator/model.py`` from the package and first checks every file of
the version against the sha256 in its ``manifest.json``).

A version directory appears whole or not at all. Locally it is built as
``.<version>.staging`` (Triton ignores directories whose names are not numbers) and
renamed into place. In an object-store repository, where nothing can be renamed, the
files are uploaded under ``<model>/.<version>.staging/``, then copied server-side into
``<model>/<version>/`` (``model.py`` last) and the marker ``<version>/.complete``
is written last of all; :func:`version_complete` checks it. A deployer that was killed
half-way leaves a staging directory (removed by :func:`clean_staging`) or a version
without its marker, which the finetune worker's deploy journal undoes on its next start
(``finetune_worker.deploy.Deployer.recover``).

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
import re
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

TEMPLATE_DIR = Path(__file__).parent / "model_repository" / "generator"
DEFAULT_TEXT_DIM = 384
BACKEND_FILE = "model.py"
MANIFEST_FILE = "manifest.json"  # the registry's: {"files": {name: sha256}, ...}
COMPLETE_MARKER = ".complete"  # object-store repositories: written last, the version is whole
_STAGING = re.compile(r"^\.([1-9][0-9]*)\.(staging|old-[0-9]+)$")

# The model.py of every installed version. The Python backend stub embeds Python with an
# isolated configuration that ignores PYTHONPATH, hence the first lines (as in the backend itself).
SHIM_SOURCE = '''"""Written by serving.model_repository.install_version: do not edit.

This version directory holds the generator's weights and their manifest only. The code
Triton runs is the installed musicrl package's (serving.triton_backend, which checks the
files against manifest.json before loading them), never a file of this writable repository.
"""

import os
import site
import sys

_before = list(sys.path)
for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry and _entry not in _before:
        site.addsitedir(_entry)
sys.path[:] = [p for p in sys.path if p not in _before] + _before

from serving.triton_backend import TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class BatchingConfig:
    """The Triton knobs of the generator model (see ``GatewaySettings.gateway_triton_*``)."""

    max_batch_size: int = 16
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    max_queue_delay_us: int = 20_000
    instance_count: int = 1

    @classmethod
    def from_settings(cls, settings) -> BatchingConfig:
        return cls(
            max_batch_size=settings.gateway_triton_max_batch_size,
            preferred_batch_sizes=list(settings.gateway_triton_preferred_batch_sizes),
            max_queue_delay_us=settings.gateway_triton_max_queue_delay_us,
            instance_count=settings.triton_instance_count(),
        )


MUSICGEN_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class PolicyIO:
    """The Triton inputs and outputs of the policy a version holds (docs/contracts.md).

    The default generator takes the gateway's prompt embedding and gives one token per frame;
    MusicGen takes the prompt text (it runs its own T5) and gives ``num_codebooks`` tokens per frame.
    """

    kind: str = "default"
    text_dim: int = DEFAULT_TEXT_DIM
    num_codebooks: int = 1

    @classmethod
    def of(cls, checkpoint_dir: Path) -> PolicyIO:
        from musicrl.models.policy import policy_kind  # noqa: PLC0415 - imports torch

        config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        if policy_kind(checkpoint_dir) == "musicgen":
            return cls("musicgen", num_codebooks=int(config["decoder"]["num_codebooks"]))
        return cls(text_dim=int(config.get("text_dim", DEFAULT_TEXT_DIM)))

    @property
    def prompt_input(self) -> str:
        if self.kind == "musicgen":
            return '{ name: "PROMPT", data_type: TYPE_STRING, dims: [ 1 ] }'
        return f'{{ name: "PROMPT_EMBEDDING", data_type: TYPE_FP32, dims: [ {self.text_dim} ] }}'

    @property
    def token_dims(self) -> str:
        return "-1" if self.num_codebooks == 1 else f"{self.num_codebooks}, -1"

    def declared_in(self, config_text: str) -> bool:
        """Does a rendered ``config.pbtxt`` declare these inputs and outputs?"""
        return (
            self.prompt_input in config_text
            and f'name: "TOKENS", data_type: TYPE_INT64, dims: [ {self.token_dims} ]' in config_text
        )


def render_config(model_name: str, batching: BatchingConfig, io: PolicyIO = PolicyIO()) -> str:
    preferred = [b for b in batching.preferred_batch_sizes if b <= batching.max_batch_size]
    template = string.Template((TEMPLATE_DIR / "config.pbtxt").read_text())
    return template.substitute(
        name=model_name,
        max_batch_size=batching.max_batch_size,
        prompt_input=io.prompt_input,
        token_dims=io.token_dims,
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
        return f"s3://{'https' if secure else 'http'}://{s3_endpoint}/{self.bucket}" + (
            f"/{self.prefix}" if self.prefix else ""
        )


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
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a generator checkpoint (no config.json)")
    weights = MUSICGEN_WEIGHTS if PolicyIO.of(checkpoint_dir).kind == "musicgen" else ("weights.pt",)
    if not any((checkpoint_dir / name).is_file() for name in weights):
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a generator checkpoint (config.json and {' or '.join(weights)})"
        )
    return version, checkpoint_dir


def _check_config_serves(
    repo_dir: str | Path, model_name: str, io: PolicyIO, batching: BatchingConfig | None, store
) -> None:
    """Refuse, before anything is written, a version whose inputs and outputs the model's kept ``config.pbtxt``
    does not declare (a MusicGen version into a model configured for the default generator, or the reverse):
    switching kinds is an install with ``batching``, which renders a new config."""
    if batching is not None:
        return
    s3 = s3_repository(repo_dir)
    if s3 is None:
        path = Path(repo_dir) / model_name / "config.pbtxt"
        existing = path.read_text() if path.is_file() else None
    else:
        key = s3.key(model_name, "config.pbtxt")
        existing = store.get_bytes(s3.bucket, key).decode() if store.exists(s3.bucket, key) else None
    if existing is not None and not io.declared_in(existing):
        raise ValueError(
            f"{model_name}'s config.pbtxt declares another kind of policy than this {io.kind} version; "
            "install it with batching settings to render a new config"
        )


def _version_files(checkpoint_dir: Path) -> dict[str, bytes | Path]:
    """What a version directory holds: the checkpoint's files, its manifest, the shim ``model.py``.

    A checkpoint downloaded from the registry brings the registry's ``manifest.json`` (its sha256s
    are what the backend checks); a bare checkpoint (``musicrl gateway install-model``) gets one
    computed here. A ``model.py`` or marker copied along (an exported version) is replaced.
    """
    files: dict[str, bytes | Path] = {
        p.relative_to(checkpoint_dir).as_posix(): p for p in sorted(checkpoint_dir.rglob("*")) if p.is_file()
    }
    files.pop(COMPLETE_MARKER, None)
    files.pop(BACKEND_FILE, None)
    if MANIFEST_FILE not in files:
        from musicrl.registry import sha256_file  # noqa: PLC0415 - the registry's hash, so the manifests agree

        manifest = {
            "files": {name: sha256_file(path) for name, path in files.items()},
            "source": "serving.model_repository.install_version",
        }
        files[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode()
    files[BACKEND_FILE] = SHIM_SOURCE.encode()
    return files


def install_version(
    repo_dir: str | Path,
    version: str | int,
    checkpoint_dir: str | Path,
    model_name: str = "generator",
    batching: BatchingConfig | None = None,
    store=None,
) -> Path | str:
    """Install ``checkpoint_dir`` as ``repo_dir/model_name/version`` (weights, manifest, the shim ``model.py``).

    The model's ``config.pbtxt`` is written when missing or when ``batching`` is
    given, so a deployer that only adds versions keeps the operator's batching.
    Returns the version directory (a ``Path``), or its ``s3://`` URL for an
    object-store repository (``store``: an ``ObjectStore``, default from ``MUSICRL_S3_*``).
    """
    version, checkpoint_dir = _check_checkpoint(version, checkpoint_dir)
    s3 = s3_repository(repo_dir)
    store = _default_store(store) if s3 is not None else None
    _check_config_serves(repo_dir, model_name, PolicyIO.of(checkpoint_dir), batching, store)
    files = _version_files(checkpoint_dir)
    if s3 is not None:
        return _install_s3(s3, store, version, checkpoint_dir, files, model_name, batching)
    model_dir = Path(repo_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)

    # Build the version next to its final place, then rename: Triton never sees half a version.
    staging = model_dir / f".{version}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, source in files.items():
        dest = staging / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copy2(source, dest)
        else:
            dest.write_bytes(source)
    target = model_dir / version
    if target.exists():  # a reinstall: move the old one aside first (both renames are atomic)
        aside = model_dir / f".{version}.old-{time.time_ns()}"
        target.rename(aside)
        staging.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(target)

    config_path = model_dir / "config.pbtxt"
    if batching is not None or not config_path.exists():
        config_path.write_text(render_config(model_name, batching or BatchingConfig(), PolicyIO.of(checkpoint_dir)))
    return target


def _install_s3(
    s3: S3Repository,
    store,
    version: str,
    checkpoint_dir: Path,
    files: dict[str, bytes | Path],
    model_name: str,
    batching: BatchingConfig | None,
) -> str:
    staging = s3.key(model_name, f".{version}.staging")
    final = s3.key(model_name, version)
    for key in list(store.list_keys(s3.bucket, staging + "/")):  # a killed install's leftovers
        store.delete(s3.bucket, key)
    # 1. every byte goes to the staging prefix, which Triton ignores (not a number)
    for name, source in files.items():
        store.put_bytes(s3.bucket, f"{staging}/{name}", source.read_bytes() if isinstance(source, Path) else source)
    # 2. a reinstall: the marker goes first, then what the new files do not overwrite
    old = set(store.list_keys(s3.bucket, final + "/"))
    if f"{final}/{COMPLETE_MARKER}" in old:
        store.delete(s3.bucket, f"{final}/{COMPLETE_MARKER}")
    for key in sorted(old - {f"{final}/{name}" for name in files} - {f"{final}/{COMPLETE_MARKER}"}):
        store.delete(s3.bucket, key)
    # 3. server-side copies into the version directory, model.py last, then the marker
    for name in sorted(files, key=lambda n: n == BACKEND_FILE):
        store.copy(s3.bucket, f"{staging}/{name}", f"{final}/{name}")
    store.put_bytes(s3.bucket, f"{final}/{COMPLETE_MARKER}", b"", "text/plain")
    for key in list(store.list_keys(s3.bucket, staging + "/")):
        store.delete(s3.bucket, key)
    config_key = s3.key(model_name, "config.pbtxt")
    if batching is not None or not store.exists(s3.bucket, config_key):
        config = render_config(model_name, batching or BatchingConfig(), PolicyIO.of(checkpoint_dir))
        store.put_bytes(s3.bucket, config_key, config.encode(), "text/plain")
    return s3.url(model_name, version)


def version_complete(repo_dir: str | Path, version: str | int, model_name: str = "generator", store=None) -> bool:
    """Is ``repo_dir/model_name/version`` whole? Locally: it exists (it only ever appears by a rename).
    In the object store: its marker exists (written after every file)."""
    s3 = s3_repository(repo_dir)
    if s3 is None:
        return (Path(repo_dir) / model_name / str(version)).is_dir()
    return _default_store(store).exists(s3.bucket, s3.key(model_name, str(version), COMPLETE_MARKER))


def clean_staging(repo_dir: str | Path, model_name: str = "generator", store=None) -> list[str]:
    """Remove what killed installs left under ``repo_dir/model_name`` (``.N.staging``, ``.N.old-*``);
    returns their names."""
    s3 = s3_repository(repo_dir)
    removed: set[str] = set()
    if s3 is None:
        model_dir = Path(repo_dir) / model_name
        for path in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
            if path.is_dir() and _STAGING.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.add(path.name)
        return sorted(removed)
    store = _default_store(store)
    prefix = s3.key(model_name) + "/"
    for key in list(store.list_keys(s3.bucket, prefix)):
        head = key.removeprefix(prefix).split("/", 1)[0]
        if "/" in key.removeprefix(prefix) and _STAGING.match(head):
            store.delete(s3.bucket, key)
            removed.add(head)
    return sorted(removed)


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
    prefix = s3.key(model_name, str(version)) + "/"
    if store.exists(s3.bucket, prefix + COMPLETE_MARKER):
        store.delete(
            s3.bucket, prefix + COMPLETE_MARKER
        )  # first: a removal cut short leaves a version marked incomplete
    for key in list(store.list_keys(s3.bucket, prefix)):
        store.delete(s3.bucket, key)


def export_version(
    repo_dir: str | Path, version: str | int, target: Path, model_name: str = "generator", store=None
) -> Path:
    """Copy ``repo_dir/model_name/version`` to the local directory ``target``."""
    s3 = s3_repository(repo_dir)
    target = Path(target)
    if s3 is None:
        shutil.copytree(Path(repo_dir) / model_name / str(version), target)
        return target
    store = _default_store(store)
    prefix = s3.key(model_name, str(version)) + "/"
    for key in list(store.list_keys(s3.bucket, prefix)):
        if key.removeprefix(prefix) == COMPLETE_MARKER:
            continue
        dest = target / key.removeprefix(prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.get_bytes(s3.bucket, key))
    return target


def installed_versions(repo_dir: str | Path, model_name: str = "generator", store=None) -> list[int]:
    s3 = s3_repository(repo_dir)
    if s3 is not None:
        prefix = s3.key(model_name) + "/"
        names = {
            k.removeprefix(prefix).split("/", 1)[0]
            for k in _default_store(store).list_keys(s3.bucket, prefix)
            if "/" in k.removeprefix(prefix)
        }
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
