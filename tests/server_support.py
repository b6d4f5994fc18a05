"""A real ``captioner serve`` process on a free port, for tests that need real sockets."""

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

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    checkpoint: Path | None, log: Path, env: dict[str, str], ready_within_s: float = 120.0
) -> Iterator[Server]:
    """``captioner serve`` (this checkout's code), once /health/ready; stopped by SIGTERM."""
    port = free_port()
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CAPTIONER_DEVICE": "cpu",
        "CAPTIONER_TORCH_THREADS": "1",
        **({"CAPTIONER_MODEL_PATH": str(checkpoint)} if checkpoint else {}),
        **env,
    }
    command = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, env=environment, stdout=sink, stderr=sink
        )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
            if time.monotonic() - started > ready_within_s:
                raise TimeoutError(f"not ready after {ready_within_s} s")
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield Server(process, url, port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
