"""Helpers for the app tests: settings pointing at the tiny model, a ready TestClient."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.service import State
from app.settings import Settings
from benchmarks.servers import Server, captioner_command, running
from tests.conftest import frame_image, png_bytes

KiB = 1024
ROOT = Path(__file__).resolve().parents[1]


def tiny_settings(checkpoint: Path, **overrides: Any) -> Settings:
    """Settings for the tiny model on the CPU, with small limits tests can reach cheaply."""
    values: dict[str, Any] = {
        "model_path": checkpoint,
        "device": "cpu",
        # One model thread: OpenMP spin-waits crawl when a test box's cores are shared.
        "torch_threads": 1,
        "preprocess_workers": 2,
        "max_batch_size": 4,
        "max_wait_ms": 20,
        "max_image_bytes": 64 * KiB,
        "max_video_bytes": 256 * KiB,
        "max_images": 4,
        "max_frames": 12,
        "access_log": True,
    }
    values.update(overrides)
    return Settings(**values)


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    """Wait for the model (by the service's state: /health/ready may need a key)."""
    service = client.app.state.service
    deadline = time.monotonic() + timeout
    while service.state is not State.READY:
        if service.state is State.FAILED or time.monotonic() > deadline:
            raise TimeoutError(f"the app did not become ready: {service.load_error}")
        time.sleep(0.01)


@contextmanager
def ready_client(app: FastAPI, **kwargs: Any) -> Iterator[TestClient]:
    """A TestClient whose lifespan has run and whose model is loaded and warm."""
    with TestClient(app, **kwargs) as client:
        wait_ready(client)
        yield client


@contextmanager
def tiny_client(checkpoint: Path, **overrides: Any) -> Iterator[TestClient]:
    with ready_client(create_app(tiny_settings(checkpoint, **overrides))) as client:
        yield client


def png(index: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    return png_bytes(frame_image(index, size))


def image_files(count: int, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i:03d}.png", png(i), "image/png")) for i in range(count)]


def assert_error(response: Any, status: int, type: str, param: str | None = "*") -> dict:
    """The response is the one error shape with this status and type (and param, if given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}
    assert body["error"]["type"] == type, body
    if param != "*":
        assert body["error"]["param"] == param, body
    assert "Traceback" not in response.text
    return body["error"]


# -- the real server, as a process ----------------------------------------------------------------


@contextmanager
def server_process(env: dict[str, str], log: Path, within_s: float = 60) -> Iterator[Server]:
    """``captioner serve`` from this checkout on a free local port with ``env`` added, once
    /health/ready says 200 (the benchmarks' launcher). Its output goes to ``log``."""
    command, base_env = captioner_command(None)
    with running(command, log, base_env | env, ready_within_s=within_s) as server:
        yield server
