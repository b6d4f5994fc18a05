from __future__ import annotations

import pytest

from app.auth import key_matches
from tests.app_support import assert_error, png, tiny_client

KEYS = "first-key-123,second-key-456"


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with tiny_client(tiny_checkpoint, api_keys=KEYS) as client:
        yield client


def caption(client, headers=None):
    headers = {"Content-Type": "image/png", **(headers or {})}
    return client.post("/v1/captions/image", content=png(), headers=headers)


def test_requests_need_a_valid_bearer_key(client) -> None:
    missing = caption(client)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(caption(client, {"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(caption(client, {"Authorization": "Basic Zmlyc3Qta2V5"}), 401, "unauthorized")
    assert_error(client.get("/v1/models"), 401, "unauthorized")
    for key in KEYS.split(","):
        assert caption(client, {"Authorization": f"Bearer {key}"}).status_code == 200


def test_probes_and_metrics_are_exempt(client) -> None:
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert 'reason="unauthorized"' in client.get("/metrics").text


def test_exemptions_are_a_setting(tiny_checkpoint) -> None:
    with tiny_client(tiny_checkpoint, api_keys="k", auth_exempt_paths="/health/live") as client:
        assert client.get("/health/live").status_code == 200
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_no_keys_means_no_auth(tiny_checkpoint) -> None:
    with tiny_client(tiny_checkpoint) as client:
        assert caption(client).status_code == 200


def test_key_matches_compares_every_key() -> None:
    assert key_matches("b", ["a", "b"]) and not key_matches("c", ["a", "b"])
    assert not key_matches("", ["a"]) and not key_matches("a", [])
    assert not key_matches("ab", ["a"]) and not key_matches("é", ["e"])


def test_the_openapi_schema_says_which_operations_need_a_key(client, tiny_checkpoint) -> None:
    from app.main import create_app
    from tests.app_support import tiny_settings

    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            exempt = path in ("/health/live", "/health/ready", "/metrics")
            assert ("security" not in operation) is exempt, path
            assert ("401" not in operation["responses"]) is exempt, path
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    open_schema = create_app(tiny_settings(tiny_checkpoint)).openapi()  # no keys: none needed
    for path, operations in open_schema["paths"].items():
        for operation in operations.values():
            assert "security" not in operation and "401" not in operation["responses"], path
    assert "securitySchemes" not in open_schema["components"]
