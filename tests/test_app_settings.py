from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings, get_settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.model_path is None and settings.device == "auto"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.compile is False and settings.api_keys == []
    assert settings.auth_exempt_paths == ["/health/live", "/health/ready", "/metrics"]


def test_environment_variables_with_the_prefix(monkeypatch) -> None:
    monkeypatch.setenv("CAPTIONER_MODEL_PATH", "/models/x")
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("CAPTIONER_COMPILE", "true")
    monkeypatch.setenv("CAPTIONER_API_KEYS", " key-alpha, key-beta ,")
    monkeypatch.setenv("CAPTIONER_AUTH_EXEMPT_PATHS", "/health/live")
    settings = Settings()
    assert settings.model_path == Path("/models/x") and settings.max_batch_size == 16
    assert settings.compile is True
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-alpha", "key-beta"]
    assert "key-alpha" not in repr(settings)  # keys never show up in logs
    assert settings.auth_exempt_paths == ["/health/live"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_BATCH_SIZE", "0"), ("PRECISION", "fp8"), ("PORT", "99999"), ("MAX_QUEUE", "x")],
)
def test_bad_values_are_rejected(monkeypatch, name, value) -> None:
    monkeypatch.setenv(f"CAPTIONER_{name}", value)
    with pytest.raises(ValidationError):
        Settings()


def test_get_settings_is_cached(monkeypatch) -> None:
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("CAPTIONER_PORT", "9001")
        assert get_settings() is get_settings() and get_settings().port == 9001
    finally:
        get_settings.cache_clear()


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- service:start -->")[1].split("<!-- service:end -->")[0]
    documented = set(re.findall(r"^\| `CAPTIONER_(\w+)` \|", section, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}
