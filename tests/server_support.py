"""A real ``captioner serve`` process on a free port, for tests that need real sockets: the
soak benchmark's launcher, with one model thread (a test box's cores are shared)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.servers import Server
from benchmarks.soak import running_server as _running_server

__all__ = ["Server", "running_server"]


@contextmanager
def running_server(checkpoint: Path | None, log: Path, env: dict[str, str]) -> Iterator[Server]:
    with _running_server(checkpoint, log, {"CAPTIONER_TORCH_THREADS": "1", **env}) as server:
        yield server
