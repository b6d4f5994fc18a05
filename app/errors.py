"""The service's error types and the one JSON error shape, mapped to HTTP in this one place.

Every error a client sees is ``{"error": {"type", "message", "param"}}`` with a stable ``type``
from ``ERROR_TYPES``. Library errors (``captioner.errors``), the serving engine's errors
(``app.engine_errors``), Starlette's HTTP errors and FastAPI's validation errors are all
translated here, status codes and headers (``Retry-After``) included; anything else is logged
with the request id and answered with a generic ``internal_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from app import logs
from app.engine_errors import EngineError, InputFailed, NotReady, QueueFull, TooManyFrames
from captioner.errors import (
    CaptionerError,
    DecodeTimeoutError,
    InvalidMediaError,
    InvalidOptionError,
    MediaTooLargeError,
    StillImageError,
    TagsUnavailableError,
)

log = logging.getLogger("app.errors")


@dataclass(frozen=True)
class ErrorType:
    status: int
    description: str


# The documented, stable error types. /docs is generated from this table; the README's table is
# written by hand, and a test checks that it lists the same types with the same statuses.
ERROR_TYPES: dict[str, ErrorType] = {
    "invalid_request": ErrorType(400, "The body is malformed: bad JSON, bad multipart."),
    "invalid_image": ErrorType(400, "An image could not be decoded, or is not a supported format."),
    "invalid_video": ErrorType(400, "A video (or one of its frames) could not be decoded."),
    "unauthorized": ErrorType(401, "API keys are configured and no valid bearer key was sent."),
    "body_timeout": ErrorType(
        408,
        "The request body did not arrive within CAPTIONER_BODY_TIMEOUT_S, or paused longer than "
        "CAPTIONER_BODY_IDLE_TIMEOUT_S.",
    ),
    "not_found": ErrorType(404, "No such path."),
    "method_not_allowed": ErrorType(405, "The path exists but not for this HTTP method."),
    "payload_too_large": ErrorType(
        413, "Over a byte, pixel or duration limit (see GET /v1/models for the limits)."
    ),
    "decode_timeout": ErrorType(
        413, "A video took longer than CAPTIONER_MAX_DECODE_S to decode; send a smaller one."
    ),
    "too_many_images": ErrorType(413, "More images than CAPTIONER_MAX_IMAGES in one request."),
    "too_many_frames": ErrorType(413, "More frames than CAPTIONER_MAX_FRAMES were asked for."),
    "unsupported_media_type": ErrorType(415, "The Content-Type is not one this endpoint takes."),
    "invalid_parameter": ErrorType(
        422, "An option or field is missing, malformed or out of range; `param` names it."
    ),
    "tags_unavailable": ErrorType(
        422, "Tags were asked of a model that cannot give them (see `tags` in GET /v1/models)."
    ),
    "overloaded": ErrorType(429, "The queue is full; retry after the Retry-After header."),
    "internal_error": ErrorType(500, "An unexpected error; it is logged with the request id."),
    "not_ready": ErrorType(503, "The model is loading or the server is shutting down."),
    "timeout": ErrorType(504, "The request took longer than CAPTIONER_REQUEST_TIMEOUT_S."),
}

_TYPE_FOR_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "overloaded",
    503: "not_ready",
    504: "timeout",
}

GENERIC_500 = "The server hit an unexpected error; it has been logged with the request id."


class ApiError(Exception):
    """An error to show the client: a type from ``ERROR_TYPES``, a message and the culprit."""

    def __init__(
        self,
        type: str,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if type not in ERROR_TYPES:
            raise ValueError(f"unknown error type {type!r}")
        super().__init__(message)
        self.type = type
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return ERROR_TYPES[self.type].status

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_exception(
    exc: BaseException,
    *,
    media: Literal["image", "video"] = "image",
    param: str | None = None,
    retry_after_s: int = 1,
) -> ApiError:
    """The API error for any exception; ``media`` says which kind of input was being read.

    An exception nobody expected is logged here (with the request id) and becomes a generic
    ``internal_error``: clients never see a stack trace or an internal message.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputFailed):
        return from_exception(exc.error, media=exc.media, param=exc.param)
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, QueueFull):
        return ApiError("overloaded", f"{exc}; retry later", headers=retry)
    if isinstance(exc, NotReady):
        return ApiError("not_ready", str(exc), headers=retry)
    if isinstance(exc, TooManyFrames):
        return ApiError("too_many_frames", str(exc), param="num_frames")
    if isinstance(exc, TagsUnavailableError):
        return ApiError("tags_unavailable", str(exc), param="tags")
    if isinstance(exc, InvalidOptionError):
        return ApiError("invalid_parameter", str(exc), param=exc.param or param)
    if isinstance(exc, StillImageError):
        return ApiError("invalid_video", f"{exc}; send it to POST /v1/captions/image", param=param)
    if isinstance(exc, DecodeTimeoutError):
        return ApiError("decode_timeout", str(exc), param=param)
    if isinstance(exc, MediaTooLargeError):
        return ApiError("payload_too_large", str(exc), param=param)
    if isinstance(exc, InvalidMediaError):
        return ApiError(f"invalid_{media}", str(exc), param=param)
    if isinstance(exc, CaptionerError):
        return ApiError("invalid_request", str(exc), param=param)
    if isinstance(exc, TimeoutError):  # RequestTimeout among them
        return ApiError("timeout", "the request did not finish within the server's time limit")
    log.error(
        "unexpected error: %r", exc, exc_info=exc, extra={"request_id": logs.request_id.get()}
    )
    return ApiError("internal_error", GENERIC_500)


def from_http_exception(exc: HTTPException) -> ApiError:
    """Starlette's own errors (unknown path, wrong method, bad multipart) in the one shape."""
    type = _TYPE_FOR_STATUS.get(exc.status_code)
    if type is None:
        type = "internal_error" if exc.status_code >= 500 else "invalid_request"
    message = exc.detail if isinstance(exc.detail, str) else ERROR_TYPES[type].description
    if type == "not_found":
        message = "no such path"
    return ApiError(type, message, headers=exc.headers)


def from_validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's request validation errors become 422 ``invalid_parameter``."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("query", "body")]
    param = location[-1] if location else None
    message = first.get("msg", "invalid parameter")
    if param:
        message = f"{param}: {message}"
    return ApiError("invalid_parameter", message, param=param)


class ErrorDetail(BaseModel):
    type: str = Field(description="one of the documented error types", examples=["invalid_image"])
    message: str = Field(examples=["<1234 bytes>: not a readable image"])
    param: str | None = Field(None, description="the field or option at fault", examples=["image"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*types: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error types, grouped by status."""
    by_status: dict[int, list[str]] = {}
    for type in types:
        by_status.setdefault(ERROR_TYPES[type].status, []).append(type)
    return {
        status: {
            "model": ErrorResponse,
            "description": "; ".join(f"`{t}`: {ERROR_TYPES[t].description}" for t in names),
            "content": {
                "application/json": {
                    "example": ApiError(names[0], ERROR_TYPES[names[0]].description).body()
                }
            },
        }
        for status, names in sorted(by_status.items())
    }


def install(app: FastAPI, *, retry_after_s: int = 1) -> None:
    """Register the handlers that turn every known exception into the one error shape;
    ``retry_after_s`` is the ``Retry-After`` of the errors that ask the client to come back."""

    def respond(request: Request, error: ApiError) -> JSONResponse:
        request.state.error_type = error.type  # for the failure metric and the access log
        return error.response()

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, from_exception(exc, retry_after_s=retry_after_s))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return respond(request, from_http_exception(exc))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return respond(request, from_validation_error(exc))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(CaptionerError, api_error)
    app.add_exception_handler(EngineError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
