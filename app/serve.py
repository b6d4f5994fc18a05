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

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

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
    app = create_app(settings)
    service: CaptionService = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logs.configure did it: JSON lines
        access_log=False,  # ours carries the request id
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    server = _Server(config, on_signal=service.begin_drain)

    def stop() -> None:
        server.should_exit = True

    service.on_fatal = stop
    log.info("serving on http://%s:%d", settings.host, settings.port)
    server.run()
    return 1 if service.state is State.FAILED else 0
