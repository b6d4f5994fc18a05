"""Server processes for the benchmarks: start one, wait until it answers, read its memory, stop it.

The soak (benchmarks/soak.py), the HTTP benchmark (benchmarks/bench_http.py) and the tests of
real server processes (tests/server_support.py) all start servers through ``running``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
    ready_s: float  # from the process's start to its first 200 on the readiness path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def captioner_command(model: Path | None, device: str = "cpu") -> tuple[list[str], dict[str, str]]:
    """``captioner serve`` from this checkout (the port is added by ``running``)."""
    command = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1"]
    env = {"CAPTIONER_DEVICE": device, **({"CAPTIONER_MODEL_PATH": str(model)} if model else {})}
    return command, env


@contextlib.contextmanager
def running(
    command: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    *,
    ready_path: str = "/health/ready",
    ready_within_s: float = 300.0,
) -> Iterator[Server]:
    """``command --port P`` run from this checkout, once ``ready_path`` answers 200; SIGTERM
    (then SIGKILL after 30 s) when the block ends."""
    port = free_port()
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, env=environment, stdout=sink, stderr=sink
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
            if time.monotonic() - started > ready_within_s:
                raise TimeoutError(f"not ready after {ready_within_s} s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}{ready_path}", timeout=1).status_code == 200:
                    break
            time.sleep(0.02)
        yield Server(process, url, port, log, time.monotonic() - started)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    """Resident memory of a process now (Linux /proc), in MB."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """The most resident memory the process has had since it started (VmHWM), in MB."""
    return _status_kib(pid, "VmHWM") / 1024
