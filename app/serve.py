"""``captioner serve``: run the app with uvicorn, one process, one model.

On SIGTERM/SIGINT the server stops accepting connections, answers any new request with 503,
lets in-flight requests finish (at most CAPTIONER_SHUTDOWN_TIMEOUT_S), then drains the batcher.

Exit codes: 0 once a stop asked by either signal has finished (a second Ctrl-C cuts the drain
short), 1 when the model failed to load. uvicorn itself re-raises the signal
after its graceful shutdown, which made SIGTERM exit 143 and Ctrl-C 130 with a
KeyboardInterrupt, but 0 for either as PID 1 in a container, where the kernel ignores it; a
stop that was asked for and done is a success, as it is for gunicorn and systemd.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from app import logs
from app.main import create_app
from app.service import CaptionService, State
from app.settings import Settings
from captioner.errors import ConfigError

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, telling the app as soon as a shutdown signal arrives (not once it is idle)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's own handling, except that the signal is not re-raised on the way out."""
        self.on_signal()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        self.should_exit = True


class _HeadTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1, closing a connection that has not sent a whole request head within
    ``head_timeout_s`` of opening or of its last answer (slowloris). uvicorn alone waits forever
    for the first request head, and a byte at a time restarts its keep-alive timer."""

    head_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting_after = self.cycle  # the request answered last (None: none yet)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_due, waiting_after)

    def _head_due(self, waiting_after: object) -> None:
        # A new request head arrived in time if a new cycle started since the timer was armed
        # (or one is still being answered: a pipelined request starts as the last one ends).
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is waiting_after and idle and not self.transport.is_closing():
            self.transport.close()


def http_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """The HTTP protocol class for uvicorn, with this head timeout."""
    return type("HeadTimeoutH11", (_HeadTimeoutH11,), {"head_timeout_s": head_timeout_s})


M_ARENA_MAX = -8  # glibc's mallopt parameter, as in <malloc.h>


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``count``, as ``MALLOC_ARENA_MAX`` would; True if done.

    glibc gives each thread that allocates its own arena (up to 8 per core), and the decoding
    pool's and FFmpeg's threads each fragment theirs: over a 10-minute soak the server's RSS
    grew 408 MB with the default and stayed flat with 2 arenas. Must run before those threads
    start. An operator's own MALLOC_ARENA_MAX wins; elsewhere (musl, macOS) it does nothing.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):  # not glibc
        return False


def run(model: Path | None = None, host: str | None = None, port: int | None = None) -> int:
    """Serve until stopped; returns the exit code (1 if the model failed to load)."""
    given = {"model_path": model, "host": host, "port": port}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"CAPTIONER_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid setting: {problems}") from exc
    logs.configure(settings.log_level)
    limit_malloc_arenas()
    app = create_app(settings)
    service: CaptionService = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logs.configure did it: JSON lines
        access_log=False,  # ours carries the request id
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        # Slow and idle clients (the body timeouts are the app's: app.middleware).
        http=http_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
    )
    server = _Server(config, on_signal=service.begin_drain)

    def stop() -> None:
        server.should_exit = True

    service.on_fatal = stop
    log.info("serving on http://%s:%d", settings.host, settings.port)
    server.run()
    return 1 if service.state is State.FAILED else 0
