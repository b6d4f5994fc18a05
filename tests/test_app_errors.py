from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from app.engine_errors import InputFailed, NotReady, QueueFull, RequestTimeout, TooManyFrames
from app.errors import (
    ERROR_TYPES,
    GENERIC_500,
    ApiError,
    error_responses,
    from_exception,
    from_http_exception,
    from_validation_error,
)
from captioner.errors import (
    CaptionerError,
    DecodeTimeoutError,
    InvalidMediaError,
    InvalidOptionError,
    MediaTooLargeError,
    ModelLoadError,
)
from tests.app_support import assert_error, tiny_client

DOCUMENTED = {
    "invalid_request": 400,
    "invalid_image": 400,
    "invalid_video": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "payload_too_large": 413,
    "decode_timeout": 413,
    "too_many_images": 413,
    "too_many_frames": 413,
    "unsupported_media_type": 415,
    "invalid_parameter": 422,
    "tags_unavailable": 422,
    "overloaded": 429,
    "internal_error": 500,
    "not_ready": 503,
    "timeout": 504,
}


def test_the_error_types_and_their_statuses_are_stable() -> None:
    assert {name: kind.status for name, kind in ERROR_TYPES.items()} == DOCUMENTED
    assert all(kind.description for kind in ERROR_TYPES.values())
    with pytest.raises(ValueError, match="unknown error type"):
        ApiError("oops", "x")


@pytest.mark.parametrize(
    ("exc", "kwargs", "type", "param"),
    [
        (InvalidOptionError("bad", param="beam_size"), {}, "invalid_parameter", "beam_size"),
        (MediaTooLargeError("big"), {"param": "image"}, "payload_too_large", "image"),
        (InvalidMediaError("bad"), {"param": "image"}, "invalid_image", "image"),
        (InvalidMediaError("bad"), {"media": "video"}, "invalid_video", None),
        (CaptionerError("other"), {}, "invalid_request", None),
        (QueueFull("full"), {}, "overloaded", None),
        (NotReady("closing"), {}, "not_ready", None),
        (TooManyFrames("too many"), {}, "too_many_frames", "num_frames"),
        (
            InputFailed(InvalidMediaError("bad"), media="video", param="frames"),
            {},
            "invalid_video",
            "frames",
        ),
        (
            InputFailed(MediaTooLargeError("big"), media="image", param="images[2]"),
            {},
            "payload_too_large",
            "images[2]",
        ),
        (
            InputFailed(DecodeTimeoutError("slow"), media="video", param="video"),
            {},
            "decode_timeout",
            "video",
        ),
        (RequestTimeout("slow"), {}, "timeout", None),
        (TimeoutError(), {}, "timeout", None),
    ],
)
def test_library_and_engine_errors_map_to_one_type(exc, kwargs, type, param) -> None:
    error = from_exception(exc, **kwargs)
    assert (error.type, error.param) == (type, param)
    assert error.status == DOCUMENTED[type]


def test_busy_errors_say_when_to_retry() -> None:
    for exc in (QueueFull("full"), NotReady("closing")):
        assert from_exception(exc, retry_after_s=7).headers == {"Retry-After": "7"}


def test_unexpected_errors_become_a_generic_500_and_are_logged(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        error = from_exception(ModelLoadError.__mro__[-2]("secret internals"))
    assert (error.type, error.message) == ("internal_error", GENERIC_500)
    assert "secret internals" in caplog.text


def test_http_and_validation_errors_in_the_one_shape() -> None:
    assert from_http_exception(HTTPException(404)).type == "not_found"
    allowed = from_http_exception(HTTPException(405, headers={"Allow": "GET"}))
    assert allowed.type == "method_not_allowed" and allowed.headers == {"Allow": "GET"}
    assert from_http_exception(HTTPException(400, "Invalid multipart")).type == "invalid_request"
    assert from_http_exception(HTTPException(502)).type == "internal_error"
    invalid = from_validation_error(
        RequestValidationError(
            [{"loc": ("query", "beam_size"), "msg": "too big", "type": "less_than_equal"}]
        )
    )
    assert invalid.body() == {
        "error": {
            "type": "invalid_parameter",
            "message": "beam_size: too big",
            "param": "beam_size",
        }
    }


def test_error_responses_document_each_status_once() -> None:
    docs = error_responses("invalid_image", "invalid_video", "timeout")
    assert sorted(docs) == [400, 504]
    assert "`invalid_image`" in docs[400]["description"]
    assert "`invalid_video`" in docs[400]["description"]


def test_unknown_paths_and_methods_over_http(tiny_checkpoint) -> None:
    with tiny_client(tiny_checkpoint) as client:
        assert_error(client.get("/v2/nothing"), 404, "not_found")
        wrong = client.get("/v1/captions/image")
        assert_error(wrong, 405, "method_not_allowed")
        assert wrong.headers["allow"] == "POST"


def test_the_readme_documents_every_error_type_with_its_status() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- service:start -->")[1].split("<!-- service:end -->")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d{3}) \|", section, flags=re.M))
    assert {name: int(status) for name, status in rows.items()} == DOCUMENTED
