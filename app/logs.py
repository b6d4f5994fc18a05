"""Structured logs: one JSON object per line, each carrying the request id it belongs to."""

from __future__ import annotations

import json
import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_DROPPED = _STANDARD | {"color_message"}  # uvicorn's terminal-coloured copy of the message
# uvicorn writes its server lines ("Started server process", "Shutting down") on a logger named
# "uvicorn.error", a name kept from gunicorn; shown as is, every start-up reads like an error.
# The level says whether a line is an error.
_LOGGER_NAMES = {"uvicorn.error": "uvicorn"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled (if any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": _LOGGER_NAMES.get(record.name, record.name),
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _DROPPED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info") -> None:
    """Send every log (ours, uvicorn's, the library's) to stderr as JSON lines.

    uvicorn is started with ``log_config=None`` (``app/serve.py``), so it keeps this
    configuration instead of installing its own.
    """
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            # The access log is ours (with request ids); uvicorn's would say it twice.
            "uvicorn.access": {"level": "WARNING"},
            "uvicorn": {"level": level.upper()},
        },
    }
    logging.config.dictConfig(config)
