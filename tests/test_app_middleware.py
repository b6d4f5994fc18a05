from __future__ import annotations

import json
import logging

import pytest
from starlette.datastructures import Headers

from app.logs import JsonFormatter, RequestIdFilter
from app.main import create_app
from app.middleware import request_id_from
from tests.app_support import assert_error, png, ready_client, tiny_settings


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    app = create_app(tiny_settings(tiny_checkpoint))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    return app


@pytest.fixture(scope="module")
def client(app):
    with ready_client(app) as client:
        yield client


def test_request_ids_are_made_or_honoured() -> None:
    made = request_id_from(Headers({}))
    assert len(made) == 32 and made != request_id_from(Headers({}))
    assert request_id_from(Headers({"x-request-id": "abc-123_x.y"})) == "abc-123_x.y"
    for insane in ("a" * 200, "has space", "new\\nline", "-leading", "<script>"):
        assert request_id_from(Headers({"x-request-id": insane})) != insane


def test_every_response_carries_the_request_id(client) -> None:
    response = client.post(
        "/v1/captions/image",
        content=png(),
        headers={"Content-Type": "image/png", "X-Request-ID": "client-id-1"},
    )
    assert response.headers["x-request-id"] == "client-id-1"
    assert response.json()["id"] == "client-id-1"
    assert len(client.get("/nope").headers["x-request-id"]) == 32


def test_unexpected_errors_are_a_generic_500_logged_with_the_request_id(client, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        response = client.get("/boom", headers={"X-Request-ID": "trace-me"})
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and response.headers["x-request-id"] == "trace-me"
    assert "request id" in error["message"]
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.request_id == "trace-me" and "secret internal detail" in caplog.text
    assert (
        'captioner_request_failures_total{reason="internal_error"}' in client.get("/metrics").text
    )


def test_access_log_is_one_structured_record_per_request(client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="captioner.access"):
        client.get("/v1/models", headers={"X-Request-ID": "log-me"})
        client.get("/nope", headers={"X-Request-ID": "log-me-too"})
    records = [r for r in caplog.records if r.name == "captioner.access"]
    assert [(r.request_id, r.status, r.endpoint) for r in records] == [
        ("log-me", 200, "/v1/models"),
        ("log-me-too", 404, "unmatched"),
    ]
    assert records[1].error_type == "not_found" and records[0].duration_ms > 0
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "log-me" and line["message"] == "GET /v1/models 200"
    assert {"ts", "level", "logger", "method", "path", "status", "duration_ms"} <= set(line)


def test_json_formatter_adds_the_current_request_id_and_exceptions() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    RequestIdFilter().filter(record)
    try:
        raise ValueError("inner")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed here" and line["request_id"] is None
    assert "ValueError: inner" in line["exception"]


def test_uvicorns_server_lines_are_not_labelled_as_errors() -> None:
    def logger_of(name: str, level: int) -> str:
        record = logging.LogRecord(name, level, __file__, 1, "Started server process", (), None)
        return json.loads(JsonFormatter().format(record))["logger"]

    # uvicorn logs its start-up and shutdown lines (INFO) on the logger named "uvicorn.error".
    assert logger_of("uvicorn.error", logging.INFO) == "uvicorn"
    assert logger_of("uvicorn.error", logging.ERROR) == "uvicorn"
    assert logger_of("uvicorn.access", logging.INFO) == "uvicorn.access"


def test_the_docs_routes_have_their_own_metrics_label(client) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    text = client.get("/metrics").text
    assert 'captioner_requests_total{endpoint="/openapi.json",status="200"}' in text
    assert 'captioner_requests_total{endpoint="/docs",status="200"}' in text


def test_static_files_are_counted_under_their_folder_not_unmatched(client) -> None:
    assert client.get("/docs/static/swagger-ui.css").status_code == 200
    assert client.get("/docs/static/no-such-file.js").status_code == 404
    text = client.get("/metrics").text
    # One label per mounted folder, whatever the file: the label set stays bounded.
    assert 'captioner_requests_total{endpoint="/docs/static",status="200"}' in text
    assert 'captioner_requests_total{endpoint="/docs/static",status="404"}' in text
    assert "swagger-ui.css" not in text and "no-such-file" not in text
