import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter

from musicrl.metrics import instrument_app, start_metrics_server

pytestmark = pytest.mark.unit


def test_instrumented_app_serves_metrics_by_route_template():
    app = FastAPI()

    @app.get("/v1/items/{item_id}")
    def item(item_id: str):
        return {"id": item_id}

    instrument_app(app, service="unit-test")
    client = TestClient(app)
    client.get("/v1/items/a")
    client.get("/v1/items/b")
    client.get("/nowhere")

    response = client.get("/metrics", follow_redirects=False)
    assert response.status_code == 200, "Prometheus should get the exposition directly, not a redirect"
    body = response.text
    assert (
        'musicrl_http_requests_total{method="GET",route="/v1/items/{item_id}",service="unit-test",status="200"} 2.0'
        in body
    )
    assert 'route="<unmatched>",service="unit-test",status="404"' in body
    assert 'route="/metrics"' not in body


def test_worker_metrics_server_on_a_free_port():
    registry = CollectorRegistry()
    processed = Counter("musicrl_test_events", "events", registry=registry)
    processed.inc(3)
    port = start_metrics_server(0, registry=registry)
    assert "musicrl_test_events_total 3.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
