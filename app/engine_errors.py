"""What the serving engine raises when it cannot take, read or finish a request.

The batcher and the service raise these and know nothing about HTTP: ``app/errors.py`` is the
one place that turns them, like the library's own errors, into status codes and headers.
"""

from __future__ import annotations

from typing import Literal


class EngineError(Exception):
    """Base class of the serving engine's errors."""


class NotReady(EngineError):
    """The model is loading or failed to load, or the server is shutting down: retry later."""


class QueueFull(EngineError):
    """The server is at capacity (preprocessing or the model's queue): retry later."""


class TooManyFrames(EngineError):
    """More frames were asked for than the server allows."""


class RequestTimeout(EngineError, TimeoutError):
    """The request did not finish within the server's time limit."""


class InputFailed(EngineError):
    """One input could not be read: ``error`` says why, ``param`` names the input and
    ``media`` says what it was meant to be."""

    def __init__(
        self, error: BaseException, *, media: Literal["image", "video"], param: str
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.media = media
        self.param = param


__all__ = [
    "EngineError",
    "InputFailed",
    "NotReady",
    "QueueFull",
    "RequestTimeout",
    "TooManyFrames",
]
