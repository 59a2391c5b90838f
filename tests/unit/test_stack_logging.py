import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from musicrl.config import BaseServiceSettings
from musicrl.logging import REQUEST_ID_HEADER, RequestIdMiddleware, bound_contextvars, configure_logging, get_logger

pytestmark = pytest.mark.unit


@pytest.fixture
def json_lines(capsys):
    """Configure JSON logging; returns a reader of the lines written to stderr since."""

    def read() -> list[dict]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]

    configure_logging(BaseServiceSettings(log_level="INFO", log_json=True), service="test-service")

    yield read
    logging.getLogger().handlers = []


def test_structlog_and_stdlib_lines_are_json_with_context(json_lines):
    log = get_logger("musicrl.test")
    with bound_contextvars(request_id="r-1"):
        log.info("generation.done", clips=2)
        logging.getLogger("uvicorn.error").warning("plain stdlib line")
    log.debug("hidden below INFO")

    lines = json_lines()
    assert [line["event"] for line in lines] == ["generation.done", "plain stdlib line"]
    first, second = lines
    assert first["clips"] == 2 and first["level"] == "info" and first["logger"] == "musicrl.test"
    assert first["service"] == second["service"] == "test-service"
    assert first["request_id"] == second["request_id"] == "r-1"
    assert first["timestamp"].endswith("Z")


def test_exceptions_are_structured(json_lines):
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("t").exception("failed")
    (line,) = json_lines()
    assert line["exception"][0]["exc_type"] == "ValueError"


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(BaseServiceSettings(log_level="LOUD"))


def test_request_id_middleware_binds_and_returns_the_id(json_lines):
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)

    @app.get("/ping")
    def ping():
        get_logger("handler").info("ping")
        return {"ok": True}

    client = TestClient(app)
    given = client.get("/ping", headers={REQUEST_ID_HEADER: "abc-123"})
    made = client.get("/ping", headers={REQUEST_ID_HEADER: "x" * 500})
    assert given.headers[REQUEST_ID_HEADER] == "abc-123"
    assert len(made.headers[REQUEST_ID_HEADER]) == 32  # an over-long caller id is replaced
    handler_lines = [line for line in json_lines() if line["event"] == "ping"]
    assert [line["request_id"] for line in handler_lines] == ["abc-123", made.headers[REQUEST_ID_HEADER]]
