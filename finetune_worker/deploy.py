"""Deploy a registry version of the generator to Triton, and roll back.

Order of a deploy, each step refusing to go on if the previous failed:

1. download the version from the registry (every file's sha256 checked);
2. verify the checkpoint: it loads, its vocabulary and text dimension match what
   serving sends, its weights are finite, and a smoke sample gives in-range
   tokens with finite log-probabilities;
3. install it as ``<repo>/generator/<version>/`` (``serving.model_repository.install_version``;
   ``<repo>`` is a local directory or an object-store ``s3://BUCKET/PREFIX``);
   newer version directories are moved aside (to ``<work_dir>/retired``) so that
   Triton's ``latest 1`` policy picks this version, which is also how a rollback works;
4. ``load_model`` (explicit mode) and wait until this version is ready; Triton swaps
   versions while requests keep flowing;
5. only then move the registry's ``current`` pointer.

If step 3 or 4 fails, the installed directory is removed, the retired ones are
put back and Triton is told to reload, so the old version keeps serving.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from musicrl.audio import codec
from musicrl.logging import get_logger
from musicrl.models.generator import load_generator
from musicrl.registry import IntegrityError, Registry, RegistryError, verify_dir
from serving.model_repository import export_version, install_version, installed_versions, remove_version, s3_repository

log = get_logger(__name__)

GENERATOR = "generator"


class CheckpointRejected(RuntimeError):
    """The checkpoint is corrupt or cannot be served; nothing was deployed."""


class DeployError(RuntimeError):
    """Triton did not load the new version; the previous one is still serving."""


def verify_checkpoint(directory: Path, text_dim: int, smoke_frames: int = 8) -> dict:
    """Hash, load and smoke-sample a generator checkpoint; raises ``CheckpointRejected``."""
    try:
        manifest = verify_dir(directory)
    except IntegrityError as exc:
        raise CheckpointRejected(str(exc)) from exc
    try:
        model, meta = load_generator(directory)
    except Exception as exc:  # noqa: BLE001 - any load failure means "not servable"
        raise CheckpointRejected(f"cannot load the checkpoint: {type(exc).__name__}: {exc}") from exc
    config = model.config
    if config.vocab_size != codec.VOCAB_SIZE:
        raise CheckpointRejected(f"vocab_size {config.vocab_size} != codec vocabulary {codec.VOCAB_SIZE}")
    if config.text_dim != text_dim:
        raise CheckpointRejected(f"text_dim {config.text_dim} != the serving prompt embedding size {text_dim}")
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointRejected("weights contain NaN or infinity")
    cond = torch.nn.functional.normalize(torch.ones(2, text_dim), dim=-1)
    tokens, logprobs = model.sample(cond, min(smoke_frames, config.max_frames), 0.99, 0, seeds=[0, 1])
    if tokens.min() < 0 or tokens.max() >= codec.VOCAB_SIZE or not bool(torch.isfinite(logprobs).all()):
        raise CheckpointRejected("smoke sample produced out-of-range tokens or non-finite log-probs")
    if not np.all(logprobs.numpy() <= 1e-5):
        raise CheckpointRejected("smoke sample produced log-probabilities above 0")
    return {"manifest_version": manifest.get("version"), "meta": meta}


class Deployer:
    def __init__(
        self,
        registry: Registry,
        triton_repo: Path | str,
        triton_http_url: str,
        work_dir: Path,
        model_name: str = GENERATOR,
        text_dim: int = 384,
        timeout_s: float = 300.0,
    ):
        self.registry = registry
        # A str "s3://BUCKET/PREFIX" is an object-store repository (written with the registry's store).
        self.triton_repo: Path | str = triton_repo if s3_repository(triton_repo) else Path(triton_repo)
        self.triton_http_url = triton_http_url.removeprefix("http://")
        self.work_dir = Path(work_dir)
        self.model_name = model_name
        self.text_dim = text_dim
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings, registry: Registry) -> "Deployer":
        """From ``FinetuneSettings``: repository path, Triton HTTP URL, work dir, model name, timeout."""
        return cls(registry, settings.finetune_triton_repo, settings.triton_http_url, Path(settings.finetune_work_dir).resolve(),
                   settings.triton_model_name, timeout_s=settings.finetune_deploy_timeout_s)

    def fetch_and_verify(self, version: str) -> Path:
        target = self.work_dir / "downloads" / f"{GENERATOR}-{version}"
        try:
            self.registry.download(GENERATOR, version, target)
        except (IntegrityError, RegistryError) as exc:
            raise CheckpointRejected(f"version {version}: {exc}") from exc
        verify_checkpoint(target, self.text_dim)
        return target

    def deploy(self, version: str) -> dict:
        """Serve ``version`` (forward or back) and point the registry at it."""
        started = time.perf_counter()
        checkpoint = self.fetch_and_verify(version)
        retired = self._retire_newer_than(int(version))
        install_version(self.triton_repo, version, checkpoint, model_name=self.model_name, store=self.registry.store)
        try:
            self._load_and_wait(version)
        except Exception as exc:
            remove_version(self.triton_repo, version, self.model_name, store=self.registry.store)
            self._restore(retired)
            try:
                self._load_and_wait(None)
            except Exception as restore_exc:  # noqa: BLE001 - report the original failure
                log.error("deploy.restore_failed", error=str(restore_exc))
            raise DeployError(f"Triton did not load {self.model_name} version {version}: {exc}") from exc
        previous = self.registry.current(GENERATOR)
        self.registry.set_current(GENERATOR, version)
        seconds = time.perf_counter() - started
        log.info("deploy.done", version=version, previous=previous, seconds=round(seconds, 2), retired=[p.name for p in retired])
        return {"version": version, "previous": previous, "deploy_s": seconds, "retired": [p.name for p in retired]}

    def rollback(self, version: str) -> dict:
        return self.deploy(version)

    def _retire_newer_than(self, version: int) -> list[Path]:
        moved = []
        store = self.registry.store
        for newer in installed_versions(self.triton_repo, self.model_name, store=store):
            if newer > version:
                target = self.work_dir / "retired" / self.model_name / f"{newer}-{time.time_ns()}"
                target.parent.mkdir(parents=True, exist_ok=True)
                export_version(self.triton_repo, newer, target, self.model_name, store=store)
                remove_version(self.triton_repo, newer, self.model_name, store=store)
                moved.append(target)
        return moved

    def _restore(self, retired: list[Path]) -> None:
        for path in retired:
            version = path.name.split("-", 1)[0]
            install_version(self.triton_repo, version, path, self.model_name, store=self.registry.store)
            shutil.rmtree(path, ignore_errors=True)

    def _load_and_wait(self, version: str | None) -> None:
        import tritonclient.http as httpclient  # noqa: PLC0415 - heavy import, only when deploying

        client = httpclient.InferenceServerClient(self.triton_http_url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
        try:
            client.load_model(self.model_name)
            deadline = time.monotonic() + self.timeout_s
            while not client.is_model_ready(self.model_name, "" if version is None else str(version)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.model_name} version {version} not ready after {self.timeout_s} s")
                time.sleep(0.2)
        finally:
            client.close()
