"""Kubernetes manifests, checked offline: every overlay renders with kustomize (kubectl's,
or k8s/render.py's equivalent where kubectl is missing), every object validates
against the Kubernetes (kubernetes-validate) or vendored CRD (k8s/schemas/) JSON
schema, and the production invariants hold."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import typer.main

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "gpu", "tpu")
KUBERNETES_VERSION = "1.30"
SETTINGS_ANNOTATION = "musicrl.io/settings"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
LONG_RUNNING = ("Deployment", "StatefulSet", "DaemonSet")
MUSICRL_IMAGES = ("gateway", "reward", "consumer", "finetune")
# Secrets the operator creates before applying (docs/deploy.md) or Strimzi writes
# (one per KafkaUser, and the cluster CA).
# The object-store user of each workload that talks to MinIO: one Secret (and one MinIO user and
# policy) per service, never shared (docs/deploy.md, "Object-store users").
S3_SECRETS = {
    "gateway": "musicrl-s3-gateway",
    "reward": "musicrl-s3-reward",
    "feedback-consumer": "musicrl-s3-consumer",
    "finetune": "musicrl-s3-finetune",
    "triton": "musicrl-s3-triton",
}
OPERATOR_SECRETS = {
    *S3_SECRETS.values(),
    "musicrl-minio-root",
    "musicrl-reward-admin",
    "musicrl-triton-admin",
    "musicrl-gateway-user-hash",
    "musicrl-gateway-vote-token",
    "musicrl-gateway-api-keys",
}
# What a Secret reference stands for when a test parses the settings; a value with a format of its own
# needs a placeholder in that format.
SECRET_PLACEHOLDERS = {"MUSICRL_GATEWAY_API_KEYS": "app:" + "0" * 64}


def secret_placeholder(variable: str) -> str:
    return SECRET_PLACEHOLDERS.get(variable, "from-a-secret")


STRIMZI_CA_SECRET = "musicrl-cluster-ca-cert"


def _load_renderer():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


renderer = _load_renderer()


@cache
def render(overlay: str) -> tuple[dict, ...]:
    return tuple(renderer.render(K8S / "overlays" / overlay))


def by_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs, kind: str, name: str) -> dict:
    matches = [doc for doc in by_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_template(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def workloads(docs):
    return [doc for doc in docs if doc["kind"] in WORKLOADS]


def containers(workload: dict) -> list[dict]:
    spec = pod_template(workload)["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict, labels: dict) -> bool:
    """Does a label selector (matchLabels / matchExpressions) select these labels?"""
    if not selector:
        return True
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(overlay) -> tuple[dict, ...]:
    return render(overlay)


# ----------------------------------------------------------------- rendering, schemas


def test_overlay_renders_every_component(docs):
    kinds = {doc["kind"] for doc in docs}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
        "Job",
        "ConfigMap",
        "NetworkPolicy",
        "ServiceMonitor",
        "Kafka",
        "KafkaNodePool",
        "KafkaTopic",
        "KafkaUser",
    } <= kinds
    for name in ("gateway", "reward", "triton", "feedback-consumer", "finetune"):
        named(docs, "Deployment", name)
    assert all(doc["metadata"].get("namespace") == "musicrl" for doc in docs if doc["kind"] != "Namespace")
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "musicrl" for doc in docs)


def test_python_renderer_matches_kustomize(overlay):
    """k8s/render.py (used where kubectl is missing) renders exactly what kustomize renders."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: nothing to compare the Python renderer with")
    assert renderer.render(K8S / "overlays" / overlay, prefer_kubectl=False) == list(render(overlay))


def test_python_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: [{name: x}]\n")
    with pytest.raises(renderer.UnsupportedKustomization, match="configMapGenerator"):
        renderer.render(tmp_path, prefer_kubectl=False)


@cache
def crd_schema(api_version: str, kind: str) -> dict | None:
    path = K8S / "schemas" / f"{api_version.replace('/', '-')}-{kind.lower()}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_every_object_validates_against_its_schema(docs):
    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        schema = crd_schema(doc["apiVersion"], doc["kind"])
        try:
            if schema is not None:
                jsonschema.Draft202012Validator(schema).validate(doc)
            else:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as err:
            errors.append(f"{where}: {'.'.join(map(str, err.path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {doc['apiVersion']} (vendor one under k8s/schemas/)")
    assert errors == []


def test_schema_validation_catches_mistakes():
    """The validators are strict enough to fail on typos and wrong types."""
    deployment = json.loads(json.dumps(named(render("dev"), "Deployment", "gateway")))
    deployment["spec"]["replica"] = 2  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    topic = json.loads(json.dumps(named(render("dev"), "KafkaTopic", "preferences.v1")))
    topic["spec"]["partitions"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(crd_schema(topic["apiVersion"], "KafkaTopic")).validate(topic)
    user = json.loads(json.dumps(named(render("dev"), "KafkaUser", "musicrl-gateway")))
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Wrtie"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(crd_schema(user["apiVersion"], "KafkaUser")).validate(user)


# ----------------------------------------------------------------- container invariants


def test_every_container_has_limits_non_root_and_read_only_root(docs):
    problems = []
    for workload in workloads(docs):
        pod = pod_template(workload)["spec"]
        pod_security = pod.get("securityContext", {})
        for container in containers(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(bound, {})):
                    problems.append(f"{where}: no cpu/memory {bound}")
            if security.get("runAsNonRoot") is not True or security.get("runAsUser", 0) == 0:
                problems.append(f"{where}: may run as root")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities not dropped")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root filesystem")
            if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
    assert problems == []


def test_every_container_has_probes_or_a_deadline(docs):
    """Servers have readiness and liveness probes; run-to-completion pods have a deadline and retry bound."""
    problems = []
    for workload in workloads(docs):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        if workload["kind"] in LONG_RUNNING:
            for container in pod_template(workload)["spec"]["containers"]:
                if not {"readinessProbe", "livenessProbe"} <= set(container):
                    problems.append(f"{where}/{container['name']}: missing probes")
        else:
            job = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
            if "activeDeadlineSeconds" not in job or "backoffLimit" not in job:
                problems.append(f"{where}: no activeDeadlineSeconds/backoffLimit")
    assert problems == []


def test_triton_ready_probe_metrics_and_object_store_repository(docs):
    triton = named(docs, "Deployment", "triton")
    (container,) = pod_template(triton)["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {port["containerPort"] for port in container["ports"]} == {8000, 8001, 8002}
    assert "--model-control-mode=explicit" in container["args"]
    endpoints = named(docs, "ServiceMonitor", "triton")["spec"]["endpoints"]
    assert [endpoint["port"] for endpoint in endpoints] == ["metrics"]


IMAGE = re.compile(r"^(?P<repo>[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+):(?P<tag>[A-Za-z0-9._-]+)$")


def test_images_are_pinned(docs):
    for workload in workloads(docs):
        for container in containers(workload):
            match = IMAGE.match(container["image"])
            assert match, f"{container['image']}: not registry/repository:tag"
            assert match["tag"] not in {"latest", "main", "master", "stable", "dev"}, container["image"]
            assert container.get("imagePullPolicy") in (None, "IfNotPresent"), container["image"]
    kafka = named(docs, "Kafka", "musicrl")
    assert re.fullmatch(r"\d+\.\d+\.\d+", kafka["spec"]["kafka"]["version"])


# ----------------------------------------------------------------- selectors and references


def test_selectors_match_their_pods(docs):
    pods = {(w["kind"], w["metadata"]["name"]): pod_template(w)["metadata"].get("labels", {}) for w in workloads(docs)}
    for workload in workloads(docs):
        if workload["kind"] in LONG_RUNNING:
            assert selects(workload["spec"]["selector"], pods[(workload["kind"], workload["metadata"]["name"])])
    for service in by_kind(docs, "Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        targets = [w for w in workloads(docs) if selects(selector, pods[(w["kind"], w["metadata"]["name"])])]
        assert targets, f"Service/{service['metadata']['name']} selects no pod"
        port_names = {p.get("name") for w in targets for c in containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert isinstance(port["targetPort"], int) or port["targetPort"] in port_names, port
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"], labels) for labels in pods.values()), pdb["metadata"]["name"]
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        named(docs, target["kind"], target["name"])
    for policy in by_kind(docs, "NetworkPolicy"):
        assert any(selects(policy["spec"]["podSelector"], labels) for labels in pods.values())
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(selects(peer["podSelector"], labels) for labels in pods.values()), peer
    for monitor in by_kind(docs, "ServiceMonitor"):
        services = [
            s for s in by_kind(docs, "Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, f"ServiceMonitor/{monitor['metadata']['name']} selects {len(services)} Services"
        port_names = {port["name"] for port in services[0]["spec"]["ports"]}
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= port_names


def test_config_maps_and_secrets_are_referenced_never_written(docs):
    assert by_kind(docs, "Secret") == []
    config_maps = {doc["metadata"]["name"] for doc in by_kind(docs, "ConfigMap")}
    strimzi_secrets = {user["metadata"]["name"] for user in by_kind(docs, "KafkaUser")} | {STRIMZI_CA_SECRET}
    for workload in workloads(docs):
        pod = pod_template(workload)["spec"]
        for container in containers(workload):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                assert "secretRef" not in source, "reference secret keys one by one"
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {})
                if "configMapKeyRef" in reference:
                    assert reference["configMapKeyRef"]["name"] in config_maps
                if "secretKeyRef" in reference:
                    assert reference["secretKeyRef"]["name"] in OPERATOR_SECRETS | strimzi_secrets, variable
                name = variable["name"]
                if re.search(r"(PASSWORD|SECRET|TOKEN|_KEY$)", name) and "value" in variable:
                    pytest.fail(f"{name} is written in the manifest instead of referenced from a Secret")
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in OPERATOR_SECRETS | strimzi_secrets


# ----------------------------------------------------------------- settings


def settings_class(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"settings class {dotted} named by the manifests does not exist: {err}")


def container_environment(docs, container: dict) -> dict[str, str | None]:
    """Every variable a container gets: ConfigMap values, literal values, None for Secret references."""
    environment: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        environment.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        environment[variable["name"]] = variable.get("value")
    return environment


def test_musicrl_services_declare_their_settings_class(docs):
    for workload in workloads(docs):
        annotations = pod_template(workload)["metadata"].get("annotations", {})
        for container in containers(workload):
            image_repo = container["image"].rsplit(":", 1)[0]
            if image_repo.split("/")[-1] in MUSICRL_IMAGES and image_repo.startswith("ghcr.io/musicrl/"):
                assert SETTINGS_ANNOTATION in annotations, workload["metadata"]["name"]
            if SETTINGS_ANNOTATION not in annotations:
                environment = container_environment(docs, container)
                assert not [name for name in environment if name.startswith("MUSICRL_")], workload["metadata"]["name"]


def test_every_environment_variable_is_a_settings_field(docs, monkeypatch):
    """Each MUSICRL_* variable names a field of the service's settings class, and its value parses."""
    import os

    checked = 0
    for workload in workloads(docs):
        dotted = pod_template(workload)["metadata"].get("annotations", {}).get(SETTINGS_ANNOTATION)
        if not dotted:
            continue
        settings = settings_class(dotted)
        fields = {f"MUSICRL_{name.upper()}" for name in settings.model_fields}
        for container in containers(workload):
            environment = container_environment(docs, container)
            musicrl = {name: value for name, value in environment.items() if name.startswith("MUSICRL_")}
            unknown = sorted(set(musicrl) - fields)
            assert unknown == [], f"{workload['metadata']['name']}: {unknown} are not fields of {dotted}"
            for name in [name for name in os.environ if name.startswith("MUSICRL_")]:
                monkeypatch.delenv(name)
            for name, value in musicrl.items():
                monkeypatch.setenv(name, value if value is not None else secret_placeholder(name))
            settings()  # raises if a value does not parse
            checked += 1
    assert checked >= 4


def test_container_commands_exist_in_the_cli(docs):
    from musicrl.cli import app

    root = typer.main.get_command(app)
    for workload in workloads(docs):
        if SETTINGS_ANNOTATION not in pod_template(workload)["metadata"].get("annotations", {}):
            continue
        for container in pod_template(workload)["spec"]["containers"]:
            if "command" in container:  # not the image's `musicrl` entry point
                continue
            group, command = container["args"][:2]
            commands = getattr(root.commands.get(group), "commands", {})
            assert command in commands, f"`musicrl {group} {command}` ({workload['metadata']['name']}) does not exist"


# ----------------------------------------------------------------- component rules


def test_feedback_consumers_never_outnumber_partitions(docs):
    consumer = named(docs, "Deployment", "feedback-consumer")
    topic = named(docs, "KafkaTopic", "preferences.v1")
    partitions = topic["spec"]["partitions"]
    assert int(named(docs, "ConfigMap", "musicrl-kafka")["data"]["MUSICRL_TOPIC_PARTITIONS"]) == partitions
    assert named(docs, "KafkaTopic", "preferences.v1.dlq")["spec"]["partitions"] == partitions
    assert consumer["spec"]["replicas"] <= partitions
    assert consumer["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == "feedback-consumer":
            assert hpa["spec"]["maxReplicas"] <= partitions


def test_finetune_worker_is_single_flight(docs):
    """One replica, replaced with Recreate, no autoscaler, and the worker's object-store lease."""
    finetune = named(docs, "Deployment", "finetune")
    assert finetune["spec"]["replicas"] == 1
    assert finetune["spec"]["strategy"] == {"type": "Recreate"}
    assert not [
        h for h in by_kind(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "finetune"
    ]
    (container,) = pod_template(finetune)["spec"]["containers"]
    assert container["args"] == ["finetune", "loop"]
    assert "MUSICRL_FINETUNE_LEASE_TTL_S" in container_environment(docs, container)


def test_finetune_worker_and_triton_share_the_object_store_model_repository(docs):
    """Triton reads s3://http://<MUSICRL_S3_ENDPOINT>/<bucket>/<prefix>, where the worker writes s3://<bucket>/<prefix>."""
    from serving.model_repository import s3_repository  # noqa: PLC0415

    assert not by_kind(docs, "PersistentVolumeClaim")
    (finetune,) = pod_template(named(docs, "Deployment", "finetune"))["spec"]["containers"]
    finetune_env = container_environment(docs, finetune)
    repository = s3_repository(finetune_env["MUSICRL_FINETUNE_TRITON_REPO"])
    assert repository is not None and repository.bucket == finetune_env["MUSICRL_BUCKET_MODELS"]
    triton_pod = pod_template(named(docs, "Deployment", "triton"))["spec"]
    (triton,) = [c for c in triton_pod["containers"] if c["name"] == "triton"]
    assert f"--model-repository={repository.triton_url(finetune_env['MUSICRL_S3_ENDPOINT'])}" in triton["args"]
    assert not any("persistentVolumeClaim" in v for v in triton_pod["volumes"])
    credentials = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in triton["env"] if "valueFrom" in e}
    assert credentials["AWS_ACCESS_KEY_ID"] == {"name": "musicrl-s3-triton", "key": "MUSICRL_S3_ACCESS_KEY"}
    assert credentials["AWS_SECRET_ACCESS_KEY"] == {"name": "musicrl-s3-triton", "key": "MUSICRL_S3_SECRET_KEY"}
    assert {"name": "AWS_DEFAULT_REGION", "value": finetune_env["MUSICRL_S3_REGION"]} in triton["env"]


def ingress_peers(docs, pod_labels: dict, port: int) -> list[dict]:
    """Every peer that some NetworkPolicy lets reach ``port`` of a pod with these labels."""
    peers = []
    for policy in by_kind(docs, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], pod_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers.extend(rule.get("from", [{"everyone": True}]))
    return peers


def test_only_the_finetune_worker_reaches_triton_model_control(docs):
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in by_kind(docs, "NetworkPolicy"))
    labels = {w["metadata"]["name"]: pod_template(w)["metadata"]["labels"] for w in workloads(docs)}
    triton = labels["triton"]
    control = ingress_peers(docs, triton, 8000)
    assert control, "nobody may load models"
    for peer in control:
        assert set(peer) == {"podSelector"}, peer
        allowed = [name for name, pod in labels.items() if selects(peer["podSelector"], pod)]
        assert allowed == ["finetune"], allowed
    inference = ingress_peers(docs, triton, 8001)
    inference_clients = {
        name for peer in inference for name, pod in labels.items() if selects(peer["podSelector"], pod)
    }
    assert inference_clients == {"gateway", "finetune"}
    args = pod_template(named(docs, "Deployment", "triton"))["spec"]["containers"][0]["args"]
    assert any(arg.startswith("--grpc-restricted-protocol=model-repository") for arg in args)


def test_gateway_and_reward_scale_and_survive_disruptions(docs):
    for name in ("gateway", "reward"):
        hpa = named(docs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        named(docs, "PodDisruptionBudget", name)
        named(docs, "ServiceMonitor", name)


def test_kafka_topics_users_and_object_store_buckets(docs):
    topics = {t["metadata"]["name"] for t in by_kind(docs, "KafkaTopic")}
    kafka = named(docs, "ConfigMap", "musicrl-kafka")["data"]
    assert topics == {kafka["MUSICRL_TOPIC_PREFERENCES"], kafka["MUSICRL_TOPIC_DEAD_LETTER"]}
    users = {u["metadata"]["name"]: u for u in by_kind(docs, "KafkaUser")}
    for deployment, user in (("gateway", "musicrl-gateway"), ("feedback-consumer", "musicrl-consumer")):
        (container,) = pod_template(named(docs, "Deployment", deployment))["spec"]["containers"]
        environment = container_environment(docs, container)
        assert environment["MUSICRL_KAFKA_SASL_USERNAME"] == user
        assert user in users
    job = named(docs, "Job", "minio-create-buckets")
    script = " ".join(pod_template(job)["spec"]["containers"][0]["args"])
    for key in ("MUSICRL_BUCKET_CLIPS", "MUSICRL_BUCKET_GENERATIONS", "MUSICRL_BUCKET_BUFFER", "MUSICRL_BUCKET_MODELS"):
        assert f"${key}" in script


def test_overlays_place_accelerators(overlay, docs):
    def resources(workload):
        return pod_template(workload)["spec"]["containers"][0]["resources"]["limits"]

    triton, finetune = named(docs, "Deployment", "triton"), named(docs, "Deployment", "finetune")
    device = named(docs, "ConfigMap", "finetune")["data"]["MUSICRL_FINETUNE_DEVICE"]
    if overlay == "gpu":
        assert resources(triton)["nvidia.com/gpu"] == 1 and resources(finetune)["nvidia.com/gpu"] == 1
        assert device == "cuda"
    elif overlay == "tpu":
        assert resources(finetune)["google.com/tpu"] == 4
        assert pod_template(finetune)["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"]
        assert device == "xla"
    else:
        assert not any("nvidia.com/gpu" in resources(w) or "google.com/tpu" in resources(w) for w in workloads(docs))
        assert device == "cpu"
        assert all(named(docs, "Deployment", n)["spec"]["replicas"] == 1 for n in ("gateway", "reward", "triton"))


# ----------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("service", MUSICRL_IMAGES + ("triton",))
def test_dockerfiles_are_multi_stage_pinned_and_non_root(service):
    dockerfile = (K8S / "docker" / f"{service}.Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert len(stages) >= 2, "multi-stage: build, then a slim runtime"
    arguments = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, flags=re.MULTILINE))
    for image in stages:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: arguments.get(m[1], m[0]), image)
        if image in {"build", "builder", "runtime"} or ":" not in image:
            assert image in re.findall(r"\bAS\s+(\w+)", dockerfile, flags=re.IGNORECASE), image
            continue
        assert not image.endswith((":latest", ":stable")), image
    user = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"root", "0"}


def test_kafka_clients_authenticate_with_the_mounted_ca_and_their_user(docs, monkeypatch):
    """The Kafka settings in the manifests make kafka-python use SCRAM over TLS with the Strimzi CA."""
    import os

    from musicrl.config import KafkaConfig

    for name in ("gateway", "feedback-consumer"):
        pod = pod_template(named(docs, "Deployment", name))["spec"]
        (container,) = pod["containers"]
        for variable in [v for v in os.environ if v.startswith("MUSICRL_")]:
            monkeypatch.delenv(variable)
        for variable, value in container_environment(docs, container).items():
            if variable.startswith("MUSICRL_"):
                monkeypatch.setenv(variable, value if value is not None else secret_placeholder(variable))
        options = KafkaConfig().kafka_client_options()
        assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_username"] in {u["metadata"]["name"] for u in by_kind(docs, "KafkaUser")}
        assert options["sasl_plain_password"] == "from-a-secret"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        ca_dir = os.path.dirname(options["ssl_cafile"])
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[ca_dir])
        assert volume["secret"]["secretName"] == STRIMZI_CA_SECRET
        assert [item["path"] for item in volume["secret"]["items"]] == [os.path.basename(options["ssl_cafile"])]


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_thread_counts_fit_the_cpu_limits(docs):
    """Intra-op threads never exceed the container's CPU limit (torch would otherwise use every core of the node)."""
    checked = 0
    for workload in workloads(docs):
        for container in containers(workload):
            limit = cpu_cores(container["resources"]["limits"]["cpu"])
            for name, value in container_environment(docs, container).items():
                if name.endswith(("_TORCH_THREADS", "_INTRA_OP_THREADS")):
                    assert 1 <= int(value) <= limit, f"{workload['metadata']['name']}: {name}={value} > {limit} CPUs"
                    checked += 1
    assert checked >= 3


def test_the_gateway_runs_in_production_mode_with_its_secrets(docs, monkeypatch):
    """MUSICRL_ENV=production, and the secrets it then requires (vote-token key, user-hash key, API keys) are
    referenced."""
    import os

    from serving.settings import GatewaySettings

    (container,) = pod_template(named(docs, "Deployment", "gateway"))["spec"]["containers"]
    environment = container_environment(docs, container)
    assert environment["MUSICRL_ENV"] == "production"
    for variable in ("MUSICRL_GATEWAY_USER_HASH_KEY", "MUSICRL_GATEWAY_VOTE_TOKEN_KEY", "MUSICRL_GATEWAY_API_KEYS"):
        assert environment[variable] is None, f"{variable} must come from a Secret"
    for variable in [v for v in os.environ if v.startswith("MUSICRL_")]:
        monkeypatch.delenv(variable)
    for variable, value in environment.items():
        if variable.startswith("MUSICRL_"):
            monkeypatch.setenv(variable, value if value is not None else secret_placeholder(variable))
    assert GatewaySettings().production_problems() == []


# ----------------------------------------------------------------- least privilege (issue 16)

# What each service may do in which bucket (ConfigMap keys of musicrl-objectstore); docs/deploy.md has the
# same table. Writes (PutObject, DeleteObject) appear only where the service writes.
READ_BUCKET = {"s3:GetBucketLocation", "s3:ListBucket"}
MULTIPART = {"s3:ListBucketMultipartUploads", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
S3_GRANTS = {
    "gateway": {
        "MUSICRL_BUCKET_CLIPS": READ_BUCKET | {"s3:GetObject", "s3:PutObject"},
        "MUSICRL_BUCKET_GENERATIONS": READ_BUCKET | {"s3:GetObject", "s3:PutObject"},
        "MUSICRL_BUCKET_MODELS": {"s3:GetObject"},
    },  # the canary record only (test below)
    "reward": {
        "MUSICRL_BUCKET_MODELS": READ_BUCKET | {"s3:GetObject"},
        "MUSICRL_BUCKET_CLIPS": {"s3:GetObject"},
        "MUSICRL_BUCKET_GENERATIONS": {"s3:GetObject"},
    },
    "consumer": {
        "MUSICRL_BUCKET_BUFFER": READ_BUCKET | {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
        "MUSICRL_BUCKET_GENERATIONS": {"s3:GetObject"},
    },
    "finetune": {
        "MUSICRL_BUCKET_MODELS": READ_BUCKET | MULTIPART | {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"},
        "MUSICRL_BUCKET_BUFFER": READ_BUCKET | {"s3:GetObject"},
    },
    "triton": {"MUSICRL_BUCKET_MODELS": READ_BUCKET | {"s3:GetObject"}},
}
WRITES = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}


def s3_policies(docs) -> dict[str, list[dict]]:
    """Service -> the statements of its MinIO policy (ConfigMap minio-policies)."""
    data = named(docs, "ConfigMap", "minio-policies")["data"]
    return {name.removesuffix(".json"): json.loads(text)["Statement"] for name, text in data.items()}


def granted(statements: list[dict], buckets: dict[str, str]) -> dict[str, set[str]]:
    """Bucket variable -> the actions the statements allow on it or its objects."""
    by_name = {bucket: variable for variable, bucket in buckets.items()}
    grants: dict[str, set[str]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow" and "Condition" not in statement, statement
        for resource in statement["Resource"]:
            match = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/.*)?", resource)
            assert match and "*" not in match[1], f"{resource}: name one bucket, no wildcards"
            assert match[1] in by_name, f"{resource}: not a bucket of musicrl-objectstore"
            actions = set(statement["Action"])
            assert not any("*" in action for action in actions), actions
            object_actions = {
                a for a in actions if a.endswith("Object") or a in MULTIPART - {"s3:ListBucketMultipartUploads"}
            }
            if match[2]:  # objects: only object actions
                assert actions == object_actions, (resource, actions)
            else:  # the bucket: no object actions
                assert not object_actions, (resource, actions)
            grants.setdefault(by_name[match[1]], set()).update(actions)
    return grants


def test_every_service_reads_the_object_store_with_its_own_secret(docs):
    """Each workload that talks to MinIO takes its credentials from its own Secret, which nothing else mounts."""
    readers: dict[str, set[str]] = {}
    for workload in workloads(docs):
        for container in containers(workload):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference and reference["name"].startswith("musicrl-s3-"):
                    readers.setdefault(reference["name"], set()).add(workload["metadata"]["name"])
                    assert reference["key"] in ("MUSICRL_S3_ACCESS_KEY", "MUSICRL_S3_SECRET_KEY"), reference
        credentials = {
            v["name"]: v["valueFrom"]["secretKeyRef"]["name"]
            for c in containers(workload)
            for v in c.get("env", [])
            if v["name"]
            in ("MUSICRL_S3_ACCESS_KEY", "MUSICRL_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }
        name = workload["metadata"]["name"]
        if name in S3_SECRETS:
            assert set(credentials.values()) == {S3_SECRETS[name]}, (name, credentials)
            assert len(credentials) == 2, (name, credentials)
        else:
            assert not credentials, f"{name} has object-store credentials it does not need"
    job = named(docs, "Job", "minio-create-buckets")["metadata"]["name"]
    for service, secret in S3_SECRETS.items():
        assert readers[secret] == {service, job}, (
            secret,
            readers[secret],
        )  # the service, and the Job creating its user


def test_object_store_policies_grant_only_the_listed_buckets_and_actions(docs):
    buckets = {
        k: v
        for k, v in named(docs, "ConfigMap", "musicrl-objectstore")["data"].items()
        if k.startswith("MUSICRL_BUCKET_")
    }
    policies = s3_policies(docs)
    services = {"gateway", "reward", "consumer", "finetune", "triton"}
    assert set(policies) == services == set(S3_GRANTS)
    writers: dict[str, set[str]] = {}
    for service, statements in policies.items():
        grants = granted(statements, buckets)
        assert grants == S3_GRANTS[service], (service, grants)
        for bucket, actions in grants.items():
            if actions & WRITES:
                writers.setdefault(bucket, set()).add(service)
    # Only the finetune worker writes models; the gateway only clips and generations; the consumer only the buffer.
    assert writers == {
        "MUSICRL_BUCKET_MODELS": {"finetune"},
        "MUSICRL_BUCKET_CLIPS": {"gateway"},
        "MUSICRL_BUCKET_GENERATIONS": {"gateway"},
        "MUSICRL_BUCKET_BUFFER": {"consumer"},
    }
    # Triton reads only its repository's prefix, the finetune worker's MUSICRL_FINETUNE_TRITON_REPO
    repository = named(docs, "ConfigMap", "finetune")["data"]["MUSICRL_FINETUNE_TRITON_REPO"].removeprefix("s3://")
    triton_objects = {r for s in policies["triton"] for r in s["Resource"] if "/" in r.removeprefix("arn:aws:s3:::")}
    assert triton_objects == {f"arn:aws:s3:::{repository}/*"}


def test_the_bucket_job_makes_one_user_per_service_with_its_policy(docs):
    job = named(docs, "Job", "minio-create-buckets")
    pod = pod_template(job)["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]
    environment = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"] if "valueFrom" in v}
    for service in s3_policies(docs):
        access, secret = f"S3_{service.upper()}_ACCESS_KEY", f"S3_{service.upper()}_SECRET_KEY"
        assert f'user {service} "${{{access}}}" "${{{secret}}}"' in script
        secret_name = S3_SECRETS["feedback-consumer" if service == "consumer" else service]
        assert environment[access] == {"name": secret_name, "key": "MUSICRL_S3_ACCESS_KEY"}
        assert environment[secret] == {"name": secret_name, "key": "MUSICRL_S3_SECRET_KEY"}
    assert 'mc admin policy create store "musicrl-$1" "/policies/$1.json"' in script
    assert 'mc admin policy attach store "musicrl-$1" --user "$2"' in script
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/policies"])
    assert volume["configMap"]["name"] == "minio-policies"
    assert "musicrl-*" not in script and "musicrl-services" not in script  # the old shared user is gone


def test_disruption_budgets_cover_the_serving_path(docs):
    labels = {w["metadata"]["name"]: pod_template(w)["metadata"]["labels"] for w in workloads(docs)}
    covered = {
        name
        for pdb in by_kind(docs, "PodDisruptionBudget")
        for name, pod in labels.items()
        if selects(pdb["spec"]["selector"], pod)
    }
    assert {"gateway", "reward", "triton", "feedback-consumer"} <= covered
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), pdb["metadata"]["name"]


def development_secrets() -> set[str]:
    from musicrl.config import DEV_S3_SECRET_KEY
    from serving.settings import DEV_USER_HASH_KEY, DEV_VOTE_TOKEN_KEY

    return {DEV_S3_SECRET_KEY, DEV_USER_HASH_KEY, DEV_VOTE_TOKEN_KEY}


def strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def test_no_development_secret_in_the_manifests_and_every_service_refuses_them(docs, monkeypatch):
    """No overlay carries a development default of a secret; every service runs with MUSICRL_ENV=production, so one
    that lost its Secret would refuse to start; with its Secrets each one starts (refuse_development_secrets passes)."""
    import os

    from musicrl.config import DEV_S3_ACCESS_KEY, InsecureSettings, refuse_development_secrets

    for doc in docs:
        for text in strings(doc):
            assert not any(secret in text for secret in development_secrets()), doc["metadata"]["name"]
    checked = 0
    for workload in workloads(docs):
        dotted = pod_template(workload)["metadata"].get("annotations", {}).get(SETTINGS_ANNOTATION)
        if not dotted or workload["kind"] == "Job":
            continue
        (container,) = pod_template(workload)["spec"]["containers"]
        environment = container_environment(docs, container)
        assert environment.get("MUSICRL_ENV") == "production", workload["metadata"]["name"]
        assert environment.get("MUSICRL_S3_ACCESS_KEY", "") is None, "object-store credentials come from a Secret"
        for variable in [v for v in os.environ if v.startswith("MUSICRL_")]:
            monkeypatch.delenv(variable)
        for variable, value in environment.items():
            if variable.startswith("MUSICRL_"):
                monkeypatch.setenv(variable, value if value is not None else secret_placeholder(variable))
        settings = settings_class(dotted)()
        assert refuse_development_secrets(settings, workload["metadata"]["name"]) == []
        monkeypatch.setenv("MUSICRL_S3_ACCESS_KEY", DEV_S3_ACCESS_KEY)  # a Secret holding the development user
        with pytest.raises(InsecureSettings):
            refuse_development_secrets(settings_class(dotted)(), workload["metadata"]["name"])
        checked += 1
    assert checked == 4


def test_triton_model_control_needs_the_admin_key_only_the_finetune_worker_holds(docs):
    triton = named(docs, "Deployment", "triton")
    (container,) = pod_template(triton)["spec"]["containers"]
    args = container["args"]
    assert "--model-control-mode=explicit" in args
    restricted = "model-repository,model-config:triton-admin-key=$(TRITON_ADMIN_KEY)"
    assert f"--http-restricted-api={restricted}" in args and f"--grpc-restricted-protocol={restricted}" in args
    admin = {"name": "musicrl-triton-admin", "key": "key"}
    assert next(v for v in container["env"] if v["name"] == "TRITON_ADMIN_KEY")["valueFrom"]["secretKeyRef"] == admin
    holders = {
        w["metadata"]["name"]
        for w in workloads(docs)
        for c in containers(w)
        for v in c.get("env", [])
        if v.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "musicrl-triton-admin"
    }
    assert holders == {"triton", "finetune"}
    (finetune,) = pod_template(named(docs, "Deployment", "finetune"))["spec"]["containers"]
    keys = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in finetune["env"] if "valueFrom" in v}
    assert keys["MUSICRL_FINETUNE_TRITON_ADMIN_KEY"] == admin
    # The HTTP port (model control) is behind its own Service, used by the finetune worker alone.
    services = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
        for s in by_kind(docs, "Service")
        if s["spec"]["selector"] == {"app.kubernetes.io/name": "triton"}
    }
    assert services == {"triton": {8001, 8002}, "triton-control": {8000}}
    http_users = {
        w["metadata"]["name"]
        for w in workloads(docs)
        for c in containers(w)
        if "triton-control" in str(container_environment(docs, c).get("MUSICRL_TRITON_HTTP_URL"))
    }
    assert http_users == {"finetune"}
    (gateway,) = pod_template(named(docs, "Deployment", "gateway"))["spec"]["containers"]
    assert container_environment(docs, gateway).get("MUSICRL_TRITON_HTTP_URL") is None


def test_the_finetune_worker_has_time_to_finish_a_deploy_after_sigterm(docs):
    from finetune_worker.settings import FinetuneSettings

    finetune = named(docs, "Deployment", "finetune")
    (container,) = pod_template(finetune)["spec"]["containers"]
    timeout = float(
        container_environment(docs, container).get("MUSICRL_FINETUNE_DEPLOY_TIMEOUT_S")
        or FinetuneSettings.model_fields["finetune_deploy_timeout_s"].default
    )
    assert pod_template(finetune)["spec"]["terminationGracePeriodSeconds"] >= timeout + 120


def test_the_gateway_reads_only_the_canary_record_of_the_registry(docs):
    models = named(docs, "ConfigMap", "musicrl-objectstore")["data"]["MUSICRL_BUCKET_MODELS"]
    resources = {r for statement in s3_policies(docs)["gateway"] for r in statement["Resource"] if f":::{models}" in r}
    assert resources == {f"arn:aws:s3:::{models}/generator/canary"}
