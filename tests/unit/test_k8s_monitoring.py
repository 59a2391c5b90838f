"""The Grafana dashboard and the Prometheus alerts (k8s/base/monitoring/), checked offline against the code.

Every PromQL expression may only use metrics some service defines (found by reading the
``Counter(``/``Histogram(``/``Gauge(``/``Summary(`` calls of the services' source, so a
renamed metric fails here), Triton's own ``nv_inference_*`` and Prometheus's ``up``;
every label it matches or groups by must exist on those metrics (or be a label
Prometheus adds to every target); every function must be a PromQL function. The
ConfigMap carries the Grafana sidecar's label and valid dashboard JSON; the alerts the
operators asked for (issue 18) exist, with a severity and a description.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
from test_k8s_manifests import by_kind, crd_schema, named, render

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = ("musicrl", "serving", "reward_service", "feedback_consumer", "finetune_worker")
# Labels Prometheus (with the Operator's ServiceMonitors) puts on every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint", "exported_service"}
# Triton's metrics (port 8002; https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md).
TRITON_METRICS = {
    name: {"model", "version"}
    for name in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_duration_us",
        "nv_inference_pending_request_count",
    )
}
PROMETHEUS_METRICS = {"up": set()}
PROMQL_FUNCTIONS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "changes",
    "resets",
    "absent",
    "absent_over_time",
    "histogram_quantile",
    "clamp",
    "clamp_min",
    "clamp_max",
    "abs",
    "ceil",
    "floor",
    "round",
    "vector",
    "scalar",
    "time",
    "timestamp",
    "label_replace",
    "label_join",
    "sort",
    "sort_desc",
    "predict_linear",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "quantile_over_time",
    "present_over_time",
}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}
REQUIRED_ALERTS = {
    "MusicRLNoCycleAccepted",
    "MusicRLConsumerLagHigh",
    "MusicRLGatewayErrorRate",
    "MusicRLFinetuneWorkerDown",
    "MusicRLCanaryRolledBack",
}


# ----------------------------------------------------------------- what the code exports


@cache
def code_metrics() -> dict[str, set[str]]:
    """Exported series name -> label names, for every prometheus_client metric the services define."""
    found: dict[str, set[str]] = {}
    for package in SERVICE_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                first = node.args[0]
                if kind not in ("Counter", "Histogram", "Gauge", "Summary") or not (
                    isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                    and first.value.startswith("musicrl_")
                ):
                    continue
                labels_node = (
                    node.args[2]
                    if len(node.args) > 2
                    else next((k.value for k in node.keywords if k.arg == "labelnames"), None)
                )
                labels = {e.value for e in getattr(labels_node, "elts", []) if isinstance(e, ast.Constant)}
                for name, extra in exported(kind, first.value):
                    found[name] = labels | extra
    return found


def exported(kind: str, name: str) -> list[tuple[str, set[str]]]:
    """The series prometheus_client exposes for one metric (and the labels it adds)."""
    if kind == "Counter":
        base = name.removesuffix("_total")
        return [(f"{base}_total", set()), (f"{base}_created", set())]
    if kind == "Histogram":
        return [
            (f"{name}_bucket", {"le"}),
            (f"{name}_sum", set()),
            (f"{name}_count", set()),
            (f"{name}_created", set()),
        ]
    if kind == "Summary":
        return [(name, {"quantile"}), (f"{name}_sum", set()), (f"{name}_count", set()), (f"{name}_created", set())]
    return [(name, set())]


def known_metrics() -> dict[str, set[str]]:
    return {**code_metrics(), **TRITON_METRICS, **PROMETHEUS_METRICS}


def test_the_metric_catalogue_is_read_from_the_code():
    metrics = code_metrics()
    assert metrics["musicrl_http_requests_total"] == {"service", "method", "route", "status"}
    assert metrics["musicrl_http_request_duration_seconds_bucket"] == {"service", "method", "route", "le"}
    assert metrics["musicrl_consumer_lag"] == {"partition"}
    assert metrics["musicrl_finetune_cycles_total"] == {"status"}
    assert metrics["musicrl_reward_clips_scored_total"] == {"source"}  # a name that already ends in _total
    assert {
        "musicrl_reward_batch_size_bucket",
        "musicrl_consumer_dead_letters_total",
        "musicrl_gateway_feedback_total",
        "musicrl_finetune_current_version",
        "musicrl_gateway_clips_total",
    } <= set(metrics)


# ----------------------------------------------------------------- PromQL


def parse_promql(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, label names, function names) of a PromQL expression; raises on unbalanced brackets."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for char in text:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            assert depth[closing[char]] >= 0, f"unbalanced {char!r} in {expr!r}"
    assert all(v == 0 for v in depth.values()), f"unbalanced brackets in {expr!r}"
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", text):
        matchers = [m for m in block.split(",") if m.strip()]
        for matcher in matchers:
            match = re.fullmatch(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*""\s*', matcher)
            assert match, f"bad label matcher {matcher!r} in {expr!r}"
            labels.add(match[1])
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    metrics, functions = set(), set()
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match[1], match[2]
        if name in PROMQL_KEYWORDS:  # binary operators may be followed by a parenthesis: `a unless (b)`
            continue
        (functions if call else metrics).add(name)
    return metrics, labels, functions


def check_promql(expr: str, where: str) -> list[str]:
    problems = []
    try:
        metrics, labels, functions = parse_promql(expr)
    except AssertionError as err:
        return [f"{where}: {err}"]
    known = known_metrics()
    if not metrics:
        problems.append(f"{where}: no metric in {expr!r}")
    for name in sorted(metrics - set(known)):
        problems.append(f"{where}: {name} is exported by no service")
    allowed = TARGET_LABELS.union(*(known.get(name, set()) for name in metrics))
    problems += [f"{where}: label {label!r} is on none of {sorted(metrics)}" for label in sorted(labels - allowed)]
    problems += [f"{where}: {name}() is not a PromQL function" for name in sorted(functions - PROMQL_FUNCTIONS)]
    return problems


def test_the_promql_checker_catches_mistakes():
    assert check_promql('sum by (route) (rate(musicrl_http_requests_total{service="gateway"}[5m]))', "ok") == []
    assert check_promql("rate(musicrl_http_request_total[5m])", "x") == [
        "x: musicrl_http_request_total is exported by no service"
    ]
    assert check_promql("sum by (model) (musicrl_consumer_lag)", "x") == [
        "x: label 'model' is on none of ['musicrl_consumer_lag']"
    ]
    assert check_promql("rat(musicrl_consumer_lag[5m])", "x") == ["x: rat() is not a PromQL function"]
    assert check_promql("sum(rate(musicrl_consumer_lag[5m])", "x")[0].startswith("x: unbalanced")
    assert (
        check_promql("histogram_quantile(0.95, sum by (le) (rate(musicrl_reward_batch_size_bucket[1m]))) / 1e-9", "x")
        == []
    )
    assert check_promql('sum(rate(nv_inference_count{model="g"}[1m])) unless (max(up) == 0)', "x") == []
    assert check_promql("sum by (le) (rate(nv_inference_count[1m]))", "x") == [
        "x: label 'le' is on none of ['nv_inference_count']"
    ]


# ----------------------------------------------------------------- the Grafana dashboard


@cache
def dashboard() -> tuple[dict, dict]:
    config_map = named(render("dev"), "ConfigMap", "musicrl-grafana-dashboard")
    (text,) = config_map["data"].values()
    return config_map, json.loads(text)


def panels() -> list[dict]:
    return [p for p in dashboard()[1]["panels"] if p["type"] != "row"]


def test_dashboard_config_map_is_labelled_for_the_grafana_sidecar():
    config_map, board = dashboard()
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(config_map["data"]) == ["musicrl-overview.json"]
    assert board["uid"] == "musicrl-overview" and board["title"] and board["schemaVersion"] >= 36
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for overlay in ("dev", "gpu", "tpu"):
        assert named(render(overlay), "ConfigMap", "musicrl-grafana-dashboard")["metadata"]["namespace"] == "musicrl"


def test_dashboard_panels_fit_the_grid_without_overlapping():
    taken = set()
    for panel in dashboard()[1]["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_dashboard_query_uses_exported_metrics():
    problems = []
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$__range", "1h")
            problems += check_promql(expr, f"panel {panel['title']!r}")
    assert problems == []


def test_the_dashboard_shows_what_operators_asked_for():
    """Issue 18: gateway rate, latency, errors; Triton queue; consumer lag, dead letters; buffer rows;
    cycles by status; deployed version; reward-service batch sizes."""
    used = set()
    for panel in panels():
        for target in panel["targets"]:
            used |= parse_promql(target["expr"].replace("$__rate_interval", "5m").replace("$__range", "1h"))[0]
    assert {
        "musicrl_http_requests_total",
        "musicrl_http_request_duration_seconds_bucket",
        "nv_inference_queue_duration_us",
        "nv_inference_pending_request_count",
        "musicrl_consumer_lag",
        "musicrl_consumer_dead_letters_total",
        "musicrl_consumer_events_total",
        "musicrl_finetune_cycles_total",
        "musicrl_finetune_current_version",
        "musicrl_gateway_clips_total",
        "musicrl_reward_batch_size_bucket",
    } <= used


# ----------------------------------------------------------------- the alerts


@cache
def rules() -> list[dict]:
    (rule_set,) = by_kind(render("dev"), "PrometheusRule")
    return [rule for group in rule_set["spec"]["groups"] for rule in group["rules"]]


def test_required_alerts_exist_with_severity_and_description():
    alerts = {rule["alert"]: rule for rule in rules()}
    assert REQUIRED_ALERTS <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_every_alert_expression_uses_exported_metrics():
    problems = []
    for rule in rules():
        problems += check_promql(rule["expr"], f"alert {rule['alert']}")
    assert problems == []


def test_alerts_on_up_name_services_that_a_service_monitor_scrapes():
    docs = render("dev")
    scraped = {
        service["metadata"]["name"]
        for monitor in by_kind(docs, "ServiceMonitor")
        for service in by_kind(docs, "Service")
        if all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    }
    namespace = named(docs, "Namespace", "musicrl")["metadata"]["name"]
    for rule in rules():
        for block in re.findall(r"up\{([^}]*)\}", rule["expr"]):
            matchers = dict(re.findall(r'(\w+)="([^"]*)"', block))
            assert matchers["namespace"] == namespace, rule["alert"]
            assert matchers["service"] in scraped, f"{rule['alert']}: no ServiceMonitor scrapes {matchers['service']}"
    assert any("finetune-metrics" in rule["expr"] for rule in rules() if rule["alert"] == "MusicRLFinetuneWorkerDown")


def test_the_prometheus_rule_schema_catches_mistakes():
    (rule_set,) = by_kind(render("dev"), "PrometheusRule")
    schema = crd_schema(rule_set["apiVersion"], "PrometheusRule")
    jsonschema.Draft202012Validator(schema).validate(rule_set)
    broken = json.loads(json.dumps(rule_set))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)
    broken = json.loads(json.dumps(rule_set))
    broken["spec"]["groups"][0]["rules"][0]["severity"] = "critical"  # belongs under labels
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)
