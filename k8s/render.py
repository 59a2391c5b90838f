"""Render a kustomization: ``kubectl kustomize`` when kubectl is installed, else a small
pure-Python renderer of the kustomize features these manifests use.

    python k8s/render.py k8s/overlays/dev            # print the rendered YAML
    python k8s/render.py k8s/overlays/dev --python   # force the Python renderer

The Python renderer supports exactly what ``k8s/`` uses, and fails loudly on
anything else: ``resources`` (files and directories holding a kustomization),
``namespace``, ``labels`` (``pairs`` with ``includeSelectors: false``), ``images``
(``name`` -> ``newName``/``newTag``) and ``patches`` given by ``path``, applied as
strategic merge patches for built-in kinds (lists of containers, volumes, env, ...
merged by their key) and as JSON merge patches for custom resources (lists
replaced), as kustomize does. ``tests/unit/test_k8s_manifests.py`` checks that its
output equals kubectl's for every overlay.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
# Merge keys of the strategic merge patch for the lists these manifests patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
BUILT_IN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}
# The order in which kustomize emits kinds (its legacy ordering); other kinds come
# between the two lists, by API group, version and kind; then by namespace and name.
KIND_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap", "Secret",
    "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]  # fmt: skip
LAST_KINDS = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature the Python renderer does not implement."""


def render(directory: Path, prefer_kubectl: bool = True) -> list[dict]:
    """The objects of the kustomization in ``directory``, as kustomize would emit them."""
    kubectl = shutil.which("kubectl") if prefer_kubectl else None
    if kubectl:
        result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _sorted(_build(Path(directory)))


def _build(directory: Path) -> list[dict]:
    path = directory / "kustomization.yaml"
    if not path.exists():
        raise UnsupportedKustomization(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text())
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{path}: unsupported fields {sorted(unknown)}")

    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(_build(target))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(target.read_text()) if doc)

    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedKustomization(f"{path}: only patches by path are supported, got {patch}")
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            if doc:
                _apply_patch(objects, doc, path)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for label in kustomization.get("labels", []):
        if label.get("includeSelectors", False) or set(label) - {"pairs", "includeSelectors"}:
            raise UnsupportedKustomization(f"{path}: only labels without selectors are supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _apply_patch(objects: list[dict], patch: dict, where: Path) -> None:
    matches = [
        obj for obj in objects
        if obj["kind"] == patch["kind"] and obj["metadata"]["name"] == patch["metadata"]["name"]
        and obj["apiVersion"].split("/")[0] == patch["apiVersion"].split("/")[0]
    ]  # fmt: skip
    if len(matches) != 1:
        raise UnsupportedKustomization(
            f"{where}: patch for {patch['kind']}/{patch['metadata']['name']} matches {len(matches)} objects"
        )
    strategic = patch["apiVersion"] in BUILT_IN_GROUPS
    merged = _merge(matches[0], patch, strategic)
    matches[0].clear()
    matches[0].update(merged)


def _merge(base, patch, strategic: bool, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, strategic, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if strategic and isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # As kustomize does: the patch's items first (merged into their originals),
        # then the original items the patch does not mention, in their order.
        key = MERGE_KEYS[field]
        originals = {item.get(key): item for item in base if isinstance(item, dict)}
        patched = [
            _merge(originals[item[key]], item, strategic) if item.get(key) in originals else copy.deepcopy(item)
            for item in patch
        ]
        mentioned = {item.get(key) for item in patch}
        return patched + [copy.deepcopy(item) for item in base if item.get(key) not in mentioned]
    return copy.deepcopy(patch)


def _set_image(obj: dict, image: dict) -> None:
    for container in _containers(obj):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


def _sorted(objects: list[dict]) -> list[dict]:
    def rank(obj: dict) -> tuple:
        kind = obj["kind"]
        group, _, version = obj["apiVersion"].rpartition("/")
        if kind in KIND_ORDER:
            position = KIND_ORDER.index(kind)
        elif kind in LAST_KINDS:
            position = len(KIND_ORDER) + 1 + LAST_KINDS.index(kind)
        else:
            position = len(KIND_ORDER)
        return position, group, version, kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    return sorted(objects, key=rank)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    documents = render(Path(argv[0]), prefer_kubectl="--python" not in argv)
    print(yaml.safe_dump_all(documents, sort_keys=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
