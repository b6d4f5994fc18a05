"""Helpers for the app tests: settings pointing at the tiny model, a ready TestClient."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.service import State
from app.settings import Settings
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


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log: Path
    ready_after_s: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(env: dict[str, str], log: Path, within_s: float = 60) -> Iterator[Server]:
    """``captioner serve`` on a free local port with ``env`` added, once /health/ready says 200.

    Its output goes to ``log``; on the way out a server still running gets SIGTERM.
    """
    port = free_port()
    # The server imports this checkout's packages, wherever the installed ones point.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1"]
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": path} | env,
            stdout=sink,
            stderr=sink,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() - started < within_s, f"not ready after {within_s} s"
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield Server(process, url, port, log, time.monotonic() - started)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
