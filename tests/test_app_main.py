from __future__ import annotations

import json

import pytest

import app as app_package
from app.errors import ERROR_TYPES
from app.main import create_app
from app.settings import get_settings
from tests.app_support import ready_client, tiny_settings

ENDPOINTS = {
    ("post", "/v1/captions/image"),
    ("post", "/v1/captions/images"),
    ("post", "/v1/captions/video"),
    ("get", "/v1/models"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/health"),
    ("get", "/metrics"),
}


@pytest.fixture(scope="module")
def schema(tiny_checkpoint) -> dict:
    return create_app(tiny_settings(tiny_checkpoint)).openapi()


def test_public_surface() -> None:
    assert app_package.__all__ == ["Settings", "create_app", "get_settings"]


def test_every_endpoint_is_documented(schema) -> None:
    documented = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert documented == ENDPOINTS
    for path, ops in schema["paths"].items():
        for op in ops.values():
            assert op.get("summary"), path
    # FastAPI's own 422 shape never appears: validation errors use the one error shape.
    assert "HTTPValidationError" not in json.dumps(schema)
    assert all(f"`{name}`" in schema["info"]["description"] for name in ERROR_TYPES)


def test_caption_endpoints_document_bodies_options_errors_and_examples(schema) -> None:
    image = schema["paths"]["/v1/captions/image"]["post"]
    content = image["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "image/*", "application/json"}
    assert content["application/json"]["example"]["image_base64"]
    params = {p["name"]: p for p in image["parameters"]}
    assert set(params) == {"beam_size", "num_captions", "max_length", "length_penalty", "tags"}
    beam = params["beam_size"]["schema"]["anyOf"][0]
    assert (beam["minimum"], beam["maximum"]) == (1, 10)
    assert params["beam_size"].get("examples") or params["beam_size"]["schema"].get("examples")
    assert {"400", "413", "415", "422", "429", "503", "504"} <= set(image["responses"])
    error_example = image["responses"]["413"]["content"]["application/json"]["example"]
    assert error_example["error"]["type"] == "payload_too_large"
    video = schema["paths"]["/v1/captions/video"]["post"]
    assert set(video["requestBody"]["content"]) == {"multipart/form-data", "video/*"}
    assert "num_frames" in {p["name"] for p in video["parameters"]}
    response = schema["components"]["schemas"]["ImageCaptionResponse"]
    assert response["properties"]["caption"]["examples"]


def test_docs_page_is_served(tiny_checkpoint) -> None:
    with ready_client(create_app(tiny_settings(tiny_checkpoint))) as client:
        assert "swagger" in client.get("/docs").text.lower()
        assert client.get("/openapi.json").json()["info"]["title"] == "captioner"


def test_create_app_reads_the_environment_by_default(tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setenv("CAPTIONER_MODEL_PATH", str(tiny_checkpoint))
    monkeypatch.setenv("CAPTIONER_DEVICE", "cpu")
    monkeypatch.setenv("CAPTIONER_TORCH_THREADS", "1")
    get_settings.cache_clear()
    try:
        with ready_client(create_app()) as client:
            assert client.get("/v1/models").json()["models"][0]["name"] == "tiny"
    finally:
        get_settings.cache_clear()


def test_docs_load_nothing_from_outside_the_server(tiny_checkpoint) -> None:
    import re

    from app.main import create_app
    from tests.app_support import ready_client, tiny_settings

    with ready_client(create_app(tiny_settings(tiny_checkpoint))) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"} <= set(assets)
        assert "cdn" not in page.text.lower() and "http" not in "".join(assets)
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
        assert "SwaggerUIBundle" in client.get("/docs/static/swagger-ui-bundle.js").text
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")  # UI 5 reads it


def test_two_apps_in_one_process_each_answer_by_their_own_settings(tiny_checkpoint) -> None:
    """Settings travel on the app, not through a dependency override: with any override set,
    FastAPI re-inspects every route's dependencies on every request."""
    open_app = create_app(tiny_settings(tiny_checkpoint))
    locked_app = create_app(tiny_settings(tiny_checkpoint, api_keys="secret"))
    assert not open_app.dependency_overrides and not locked_app.dependency_overrides
    with ready_client(open_app) as open_client, ready_client(locked_app) as locked_client:
        assert open_client.get("/v1/models").status_code == 200
        assert locked_client.get("/v1/models").status_code == 401
        headers = {"Authorization": "Bearer secret"}
        assert locked_client.get("/v1/models", headers=headers).status_code == 200
