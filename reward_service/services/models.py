"""The reward models in use, and their reload without a restart.

``ModelHolder.snapshot`` is one immutable ``ModelSnapshot`` (a model per
component plus its version). A reload builds a complete new snapshot next to
the old one and then replaces the reference in one assignment, so a batch in
flight keeps the models it started with and no request ever sees a half-loaded
set. Components whose version did not change keep their loaded model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from musicrl.registry import IntegrityError, Registry, verify_dir
from musicrl.schemas.scores import COMPONENTS, REGISTRY_KINDS, Component

# The preference model appears once users have voted; the others serve from the start.
REQUIRED: tuple[Component, ...] = ("text_adherence", "quality")


class ModelsNotReady(RuntimeError):
    """No complete set of reward models has been loaded yet."""


class ModelSource(Protocol):
    """Where versions of the reward models come from (the registry in production)."""

    def current_versions(self) -> dict[Component, str]: ...

    def fetch(self, component: Component, version: str) -> Path: ...


class RegistrySource:
    """Reward models from the model registry, cached on local disk by version.

    ``pinned`` components (component -> (version, local directory)) come from configured weights
    instead (``reward_clap_path``): always that version, whatever the registry's pointer says.
    """

    def __init__(self, registry: Registry, cache_dir: Path, pinned: Mapping[Component, tuple[str, Path]] | None = None):
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        self.pinned = dict(pinned or {})

    def current_versions(self) -> dict[Component, str]:
        versions: dict[Component, str] = {c: version for c, (version, _) in self.pinned.items()}
        for component in COMPONENTS:
            if component in versions:
                continue
            version = self.registry.current(REGISTRY_KINDS[component])
            if version is not None:
                versions[component] = version
        missing = [REGISTRY_KINDS[c] for c in REQUIRED if c not in versions]
        if missing:
            raise ModelsNotReady(f"no current version in the registry for {', '.join(missing)}")
        return versions

    def fetch(self, component: Component, version: str) -> Path:
        if component in self.pinned:
            return self.pinned[component][1]
        # Versions are immutable, so a cached download is reused once its files
        # still match the sha256 of its manifest; anything else is fetched again.
        dest = self.cache_dir / REGISTRY_KINDS[component] / version
        try:
            verify_dir(dest)
        except IntegrityError:
            self.registry.download(REGISTRY_KINDS[component], version, dest)
        return dest


# Builds the model of one component from its version directory: (component, directory, version).
ComponentLoader = Callable[[Component, Path, str], Any]


@dataclass(frozen=True)
class ModelSnapshot:
    """The models in use; a component missing from ``versions`` is not available."""

    models: Mapping[Component, Any]
    versions: Mapping[Component, str]


@dataclass(frozen=True)
class ReloadResult:
    changed: dict[Component, tuple[str | None, str]] = field(default_factory=dict)
    versions: dict[Component, str] = field(default_factory=dict)


class ModelHolder:
    def __init__(self, source: ModelSource, load_component: ComponentLoader):
        self.source = source
        self.load_component = load_component
        self._snapshot: ModelSnapshot | None = None
        self._reload_lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self.last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._snapshot is not None

    def snapshot(self) -> ModelSnapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise ModelsNotReady(self.last_error or "reward models are still loading")
        return snapshot

    def reload(self) -> ReloadResult:
        """Load the source's current versions; a no-op when nothing changed.

        On failure the models in use stay in use and the error is raised.
        """
        with self._reload_lock:
            try:
                wanted = self.source.current_versions()
                old = self._snapshot
                changed = {
                    c: (old.versions.get(c) if old else None, v)
                    for c, v in wanted.items()
                    if old is None or old.versions.get(c) != v
                }
                if not changed:
                    self.last_error = None
                    return ReloadResult({}, dict(wanted))
                models = {c: old.models[c] for c in wanted if c not in changed} if old else {}
                for component in changed:
                    directory = self.source.fetch(component, wanted[component])
                    models[component] = self.load_component(component, directory, wanted[component])
                self._snapshot = ModelSnapshot(models, dict(wanted))
                self.last_error = None
                return ReloadResult(changed, dict(wanted))
            except Exception as err:
                self.last_error = f"reload failed: {err}"
                raise

    # -- polling of the registry's current pointers -----------------------------
    def start_polling(self, interval_s: float, on_result: Callable[[ReloadResult | Exception], None]) -> None:
        if interval_s <= 0 or self._poller is not None:
            return
        self._stop_polling.clear()

        def poll() -> None:
            while not self._stop_polling.wait(interval_s):
                try:
                    on_result(self.reload())
                except Exception as err:  # noqa: BLE001 - keep polling; the old models stay in use
                    on_result(err)

        self._poller = threading.Thread(target=poll, name="reward-model-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None
