from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from app.errors import ApiError
from app.uploads import bounded, media_type


def request(body_chunks: list[bytes], headers: dict[str, str]) -> Request:
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(body_chunks) - 1}
        for i, chunk in enumerate(body_chunks)
    ]
    received = []

    async def receive():
        received.append(1)
        return messages[len(received) - 1]

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    req = Request(scope, receive)
    req.received = received  # type: ignore[attr-defined]
    return req


def test_media_type_ignores_parameters_and_case() -> None:
    assert media_type(request([b""], {"Content-Type": "Image/PNG; q=1"})) == "image/png"
    assert media_type(request([b""], {})) == ""


def test_bodies_within_the_limit_pass_through() -> None:
    req = request([b"abc", b"def"], {})
    assert asyncio.run(bounded(req, 6, param="image").body()) == b"abcdef"


def test_streamed_bytes_past_the_limit_stop_the_read() -> None:
    req = request([b"abc", b"def", b"ghi", b"jkl"], {})
    with pytest.raises(ApiError) as caught:
        asyncio.run(bounded(req, 5, param="video").body())
    assert (caught.value.type, caught.value.param) == ("payload_too_large", "video")
    assert len(req.received) == 2  # it stopped at the chunk that crossed the limit


def test_a_declared_length_past_the_limit_fails_before_reading() -> None:
    req = request([b"x"], {"Content-Length": "1000"})
    with pytest.raises(ApiError, match="1000 bytes"):
        bounded(req, 10, param="image")
    assert req.received == []
