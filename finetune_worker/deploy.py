"""Deploy a registry version of the generator to Triton, and roll back.

Order of a deploy, each step refusing to go on if the previous failed:

1. download the version from the registry (every file's sha256 checked);
2. verify the checkpoint: it loads, its vocabulary and text dimension match what
   serving sends, its weights are finite, and a smoke sample gives in-range
   tokens with finite log-probabilities;
3. install it as ``<repo>/generator/<version>/`` (``serving.model_repository.install_version``;
   ``<repo>`` is a local directory or an object-store ``s3://BUCKET/PREFIX``; the version
   appears whole or not at all: staging name and rename, or staging prefix and a marker
   written last); newer version directories are moved aside (to ``<work_dir>/retired``) so
   that Triton's ``latest 1`` policy picks this version, which is also how a rollback works;
4. ``load_model`` (explicit mode) and wait until this version is ready; Triton swaps
   versions while requests keep flowing;
5. only then move the registry's ``current`` pointer.

If step 3 or 4 fails, the installed directory is removed, the retired ones are put back
and Triton is told to reload, so the old version keeps serving.

Crash safety: before it changes the repository a deploy writes a journal,
``<work_dir>/deploy-<model>.json`` (the version, the previous one, each retired directory as it
is moved aside, the phase), and removes it when it is done. A worker killed in between
leaves the journal; :meth:`Deployer.recover` (run by the next deploy, and by
``finetune loop`` when it starts, under the lease) finishes it if the registry pointer had
already moved, and otherwise undoes it: staging leftovers and the half-installed version
removed, retired versions put back, Triton reloaded if it may have seen the new one. The
repository then serves what the registry's ``current`` says, and the interrupted cycle's
deploy runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musicrl.audio import codec
from musicrl.checkpoint import write_json_atomic
from musicrl.logging import get_logger
from musicrl.models.policy import GeneratorPolicy, load_policy
from musicrl.registry import IntegrityError, Registry, RegistryError, verify_dir
from serving.model_repository import (
    clean_staging,
    export_version,
    install_version,
    installed_versions,
    remove_version,
    s3_repository,
    version_complete,
)

log = get_logger(__name__)

GENERATOR = "generator"


class CheckpointRejected(RuntimeError):
    """The checkpoint is corrupt or cannot be served; nothing was deployed."""


ADMIN_HEADER = "triton-admin-key"  # the header Triton's --http-restricted-api checks (k8s/base/triton/deployment.yaml)


def admin_headers(admin_key: str | None) -> dict[str, str] | None:
    return {ADMIN_HEADER: admin_key} if admin_key else None


class DeployError(RuntimeError):
    """Triton did not load the new version; the previous one is still serving."""


class DeployInFlight(RuntimeError):
    """Another live process on this host is deploying (its journal is in the same work dir)."""


JOURNAL = "deploy-{model}.json"  # one per Triton model name, in the work dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_checkpoint(directory: Path, text_dim: int, smoke_frames: int = 8) -> dict:
    """Hash, load and smoke-sample a generator version of either kind (``musicrl.models.policy``); raises
    ``CheckpointRejected``. The default kind must also fit the codec and the gateway's prompt embedding."""
    try:
        manifest = verify_dir(directory)
    except IntegrityError as exc:
        raise CheckpointRejected(str(exc)) from exc
    try:
        policy = load_policy(directory)
    except Exception as exc:  # noqa: BLE001 - any load failure means "not servable"
        raise CheckpointRejected(f"cannot load the checkpoint: {type(exc).__name__}: {exc}") from exc
    if isinstance(policy, GeneratorPolicy):
        config = policy.generator.config
        if config.vocab_size != codec.VOCAB_SIZE:
            raise CheckpointRejected(f"vocab_size {config.vocab_size} != codec vocabulary {codec.VOCAB_SIZE}")
        if config.text_dim != text_dim:
            raise CheckpointRejected(f"text_dim {config.text_dim} != the serving prompt embedding size {text_dim}")
        # The gateway's embedding stands in for the prompt: no text encoder is loaded to verify a version.
        cond = torch.nn.functional.normalize(torch.ones(2, text_dim), dim=-1)
    else:
        cond = policy.condition(["a smoke test", "a smoke test"])
    if not all(bool(torch.isfinite(t).all()) for t in policy.state_dict().values() if t.is_floating_point()):
        raise CheckpointRejected("weights contain NaN or infinity")
    with torch.no_grad():
        tokens, logprobs = policy.sample(cond, min(smoke_frames, policy.max_frames), 0.99, 0, seeds=[0, 1])
    if tokens.min() < 0 or tokens.max() >= policy.vocab_size or not bool(torch.isfinite(logprobs).all()):
        raise CheckpointRejected("smoke sample produced out-of-range tokens or non-finite log-probs")
    if not np.all(logprobs.numpy() <= 1e-5):
        raise CheckpointRejected("smoke sample produced log-probabilities above 0")
    meta_file = directory / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return {"manifest_version": manifest.get("version"), "kind": policy.kind, "meta": meta}


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
        admin_key: str | None = None,
    ):
        self.registry = registry
        # A str "s3://BUCKET/PREFIX" is an object-store repository (written with the registry's store).
        self.triton_repo: Path | str = triton_repo if s3_repository(triton_repo) else Path(triton_repo)
        self.triton_http_url = triton_http_url.removeprefix("http://")
        self.work_dir = Path(work_dir)
        self.model_name = model_name
        self.text_dim = text_dim
        self.timeout_s = timeout_s
        # Sent as the `triton-admin-key` header with load requests: Triton in production restricts its
        # model-repository API to holders of the key (--http-restricted-api, k8s/base/triton/deployment.yaml).
        self.admin_key = admin_key

    @classmethod
    def from_settings(cls, settings, registry: Registry) -> Deployer:
        """From ``FinetuneSettings``: repository path, Triton HTTP URL, work dir, model name, timeout, admin key."""
        key = settings.finetune_triton_admin_key
        return cls(
            registry,
            settings.finetune_triton_repo,
            settings.triton_http_url,
            Path(settings.finetune_work_dir).resolve(),
            settings.triton_model_name,
            timeout_s=settings.finetune_deploy_timeout_s,
            admin_key=key.get_secret_value() if key is not None else None,
        )

    def fetch_and_verify(self, version: str) -> Path:
        target = self.work_dir / "downloads" / f"{GENERATOR}-{version}"
        try:
            self.registry.download(GENERATOR, version, target)
        except (IntegrityError, RegistryError) as exc:
            raise CheckpointRejected(f"version {version}: {exc}") from exc
        verify_checkpoint(target, self.text_dim)
        return target

    # ------------------------------------------------------------------ journal

    @property
    def journal_path(self) -> Path:
        return self.work_dir / JOURNAL.format(model=self.model_name)

    def read_journal(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.journal_path.read_text())
        except FileNotFoundError:
            return None

    def _write_journal(self, journal: dict[str, Any]) -> None:
        write_json_atomic(self.journal_path, journal)

    def _clear_journal(self) -> None:
        self.journal_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ deploy

    def deploy(self, version: str) -> dict:
        """Serve ``version`` (forward or back) and point the registry at it."""
        started = time.perf_counter()
        self.recover()  # a deploy a killed process left half-done is finished or undone first
        checkpoint = self.fetch_and_verify(version)
        previous = self.registry.current(GENERATOR)
        journal = {
            "version": str(version),
            "previous": previous,
            "model_name": self.model_name,
            "repo": str(self.triton_repo),
            "retired": [],
            "phase": "retiring",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.time(),
        }
        self._write_journal(journal)
        retired = self._retire_newer_than(int(version), journal)
        journal["phase"] = "installing"
        self._write_journal(journal)
        try:
            install_version(
                self.triton_repo, version, checkpoint, model_name=self.model_name, store=self.registry.store
            )
            journal["phase"] = "loading"  # from here Triton may have seen the new version
            self._write_journal(journal)
            self._load_and_wait(version)
        except Exception as exc:
            remove_version(self.triton_repo, version, self.model_name, store=self.registry.store)
            self._restore(retired)
            try:
                self._load_and_wait(None)
            except Exception as restore_exc:  # noqa: BLE001 - report the original failure
                log.error("deploy.restore_failed", error=str(restore_exc))
            self._clear_journal()
            raise DeployError(f"Triton did not load {self.model_name} version {version}: {exc}") from exc
        self.registry.set_current(GENERATOR, version)
        self._clear_journal()
        seconds = time.perf_counter() - started
        log.info(
            "deploy.done",
            version=version,
            previous=previous,
            seconds=round(seconds, 2),
            retired=[p.name for p in retired],
        )
        return {"version": version, "previous": previous, "deploy_s": seconds, "retired": [p.name for p in retired]}

    def rollback(self, version: str) -> dict:
        return self.deploy(version)

    # ------------------------------------------------------------------ canary challenger (docs/canary.md)

    def deploy_challenger(self, version: str, challenger: str) -> dict:
        """Serve ``version`` as the Triton model ``challenger`` beside the current one; the registry pointer
        does not move. The version is verified as for a deploy; the challenger model holds this version only
        (other versions are removed), its ``config.pbtxt`` is rendered afresh (one instance, default batching:
        it serves a share of the pairs), then ``load_model`` and wait until this version is ready.

        Nothing of the current model changes, so no journal: a challenger cut short is simply deployed again
        (the canary stage does, on resume), and a failure here leaves it unloaded.
        """
        from serving.model_repository import BatchingConfig  # noqa: PLC0415

        if challenger == self.model_name:
            raise ValueError(f"the challenger model must not be the served model {self.model_name!r}")
        started = time.perf_counter()
        checkpoint = self.fetch_and_verify(version)
        store = self.registry.store
        clean_staging(self.triton_repo, challenger, store=store)
        for other in installed_versions(self.triton_repo, challenger, store=store):
            if str(other) != str(version):
                remove_version(self.triton_repo, other, challenger, store=store)
        install_version(
            self.triton_repo, version, checkpoint, model_name=challenger, batching=BatchingConfig(), store=store
        )
        try:
            self._load_and_wait(version, model_name=challenger)
        except Exception as exc:
            self.retire_challenger(challenger)
            raise DeployError(f"Triton did not load challenger {challenger} version {version}: {exc}") from exc
        seconds = time.perf_counter() - started
        log.info("deploy.challenger", model=challenger, version=version, seconds=round(seconds, 2))
        return {"version": str(version), "model_name": challenger, "deploy_s": seconds}

    def challenger_ready(self, version: str, challenger: str) -> bool:
        """Does Triton serve ``version`` of the challenger model right now?"""
        import tritonclient.http as httpclient  # noqa: PLC0415

        client = httpclient.InferenceServerClient(self.triton_http_url, connection_timeout=10, network_timeout=10)
        try:
            return bool(client.is_model_ready(challenger, str(version)))
        except Exception:  # noqa: BLE001 - unknown model, Triton restarting: not ready
            return False
        finally:
            client.close()

    def retire_challenger(self, challenger: str) -> None:
        """Unload the challenger model and remove its versions from the repository (errors are logged: an
        unloaded challenger the gateway still asks for falls back to the current model)."""
        import tritonclient.http as httpclient  # noqa: PLC0415

        if challenger == self.model_name:
            raise ValueError(f"refusing to retire the served model {self.model_name!r}")
        client = httpclient.InferenceServerClient(
            self.triton_http_url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )
        try:
            client.unload_model(challenger, headers=admin_headers(self.admin_key))
        except Exception as exc:  # noqa: BLE001 - not loaded (already retired) or Triton away
            log.warning("deploy.challenger_unload_failed", model=challenger, error=str(exc))
        finally:
            client.close()
        store = self.registry.store
        for version in installed_versions(self.triton_repo, challenger, store=store):
            remove_version(self.triton_repo, version, challenger, store=store)
        clean_staging(self.triton_repo, challenger, store=store)
        log.info("deploy.challenger_retired", model=challenger)

    def recover(self) -> dict[str, Any] | None:
        """Finish or undo the deploy a killed process left half-done; None when there was nothing to do.

        Finished: the registry pointer had moved to the journal's version and that version is whole in
        the repository (only the journal was left). Undone, otherwise: the version's directory is removed
        (unless it is whole and not newer than the previous one), the retired directories are put back, the previous
        version is reinstalled from the registry if it is not whole, and Triton is told to reload if it
        may have loaded the new version. Staging leftovers are removed in every case. Raises
        ``DeployInFlight`` when the journal belongs to a live process on this host.
        """
        store = self.registry.store
        journal = self.read_journal()
        if (
            journal is not None
            and journal.get("pid") != os.getpid()
            and journal.get("host") == socket.gethostname()
            and isinstance(journal.get("pid"), int)
            and _alive(journal["pid"])
        ):
            raise DeployInFlight(
                f"process {journal['pid']} is deploying {self.model_name} version {journal['version']}"
            )
        staging = clean_staging(self.triton_repo, self.model_name, store=store)
        if journal is None:
            if staging:
                log.warning("deploy.staging_removed", staging=staging)
                return {"action": "cleaned", "staging": staging}
            return None
        version, previous = str(journal["version"]), journal.get("previous")
        if self.registry.current(GENERATOR) == version and version_complete(
            self.triton_repo, version, self.model_name, store=store
        ):
            self._clear_journal()
            log.warning("deploy.recovered", action="finished", version=version, previous=previous, staging=staging)
            return {"action": "finished", "version": version, "previous": previous, "staging": staging}
        whole = version_complete(self.triton_repo, version, self.model_name, store=store)
        if not whole or previous is None or int(version) > int(previous):
            # (an older, whole version, the target of a rollback, may stay: `latest 1` does not pick it)
            remove_version(self.triton_repo, version, self.model_name, store=store)
        self._restore([Path(path) for path in journal.get("retired", []) if Path(path).is_dir()])
        reinstalled = False
        if previous is not None and not version_complete(self.triton_repo, previous, self.model_name, store=store):
            install_version(
                self.triton_repo, previous, self.fetch_and_verify(previous), model_name=self.model_name, store=store
            )
            reinstalled = True
        if journal.get("phase") == "loading" or reinstalled:
            try:
                self._load_and_wait(previous)
            except Exception as exc:  # noqa: BLE001 - the repository is right; Triton reads it on its next load or start
                log.error("deploy.recover_reload_failed", error=str(exc))
        self._clear_journal()
        log.warning(
            "deploy.recovered",
            action="undone",
            version=version,
            previous=previous,
            phase=journal.get("phase"),
            staging=staging,
            retired=journal.get("retired", []),
            reinstalled=reinstalled,
        )
        return {
            "action": "undone",
            "version": version,
            "previous": previous,
            "phase": journal.get("phase"),
            "staging": staging,
            "reinstalled_previous": reinstalled,
        }

    def _retire_newer_than(self, version: int, journal: dict[str, Any] | None = None) -> list[Path]:
        moved = []
        store = self.registry.store
        for newer in installed_versions(self.triton_repo, self.model_name, store=store):
            if newer > version:
                target = self.work_dir / "retired" / self.model_name / f"{newer}-{time.time_ns()}"
                target.parent.mkdir(parents=True, exist_ok=True)
                export_version(self.triton_repo, newer, target, self.model_name, store=store)
                if journal is not None:  # recorded before the repository changes: recover() can put it back
                    journal["retired"].append(str(target))
                    self._write_journal(journal)
                remove_version(self.triton_repo, newer, self.model_name, store=store)
                moved.append(target)
        return moved

    def _restore(self, retired: list[Path]) -> None:
        for path in retired:
            version = path.name.split("-", 1)[0]
            install_version(self.triton_repo, version, path, self.model_name, store=self.registry.store)
            shutil.rmtree(path, ignore_errors=True)

    def _load_and_wait(self, version: str | None, model_name: str | None = None) -> None:
        import tritonclient.http as httpclient  # noqa: PLC0415 - heavy import, only when deploying

        model_name = model_name or self.model_name
        client = httpclient.InferenceServerClient(
            self.triton_http_url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )
        try:
            client.load_model(model_name, headers=admin_headers(self.admin_key))
            deadline = time.monotonic() + self.timeout_s
            while not client.is_model_ready(model_name, "" if version is None else str(version)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{model_name} version {version} not ready after {self.timeout_s} s")
                time.sleep(0.2)
        finally:
            client.close()
