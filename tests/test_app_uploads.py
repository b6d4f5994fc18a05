from __future__ import annotations

import asyncio

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from app.errors import ApiError
from app.uploads import _form, bounded, media_type


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


BOUNDARY = "test-boundary"


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    body = b""
    for name, data in parts:
        body += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="x.jpg"'
                "\r\nContent-Type: image/jpeg\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def parsed_parts(
    body: bytes, headers: dict[str, str], spool_bytes: int | None
) -> list[tuple[bytes, bool]]:
    """Each file part's bytes and whether it stayed in memory (spool None: the default)."""
    spool = {} if spool_bytes is None else {"spool_bytes": spool_bytes}

    async def parse() -> list[tuple[bytes, bool]]:
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        req = request(chunks, headers)
        req.scope["app"] = None  # inside an app, Starlette turns parse errors into a 400
        async with _form(req, 10 << 20, max_files=4, param="image", **spool) as form:
            parts = [value for _, value in form.multi_items()]
            return [(await part.read(), part._in_memory) for part in parts]

    return asyncio.run(parse())


def test_image_parts_up_to_the_spool_size_stay_in_memory_and_larger_ones_go_to_disk() -> None:
    photo = bytes(range(256)) * 6000  # 1.5 MB: over Starlette's 1 MB default spool
    body, headers = multipart([("image", photo), ("image", photo[:1000])])
    assert parsed_parts(body, headers, spool_bytes=None) == [(photo, False), (photo[:1000], True)]
    assert parsed_parts(body, headers, spool_bytes=2 << 20) == [(photo, True), (photo[:1000], True)]
    assert parsed_parts(body, headers, spool_bytes=1 << 19) == [
        (photo, False),
        (photo[:1000], True),
    ]


@pytest.mark.parametrize("spool_bytes", [None, 2 << 20])
def test_malformed_multipart_is_a_400_with_either_spool(spool_bytes) -> None:
    body, headers = multipart([("image", b"abc")])
    headers["Content-Type"] = "multipart/form-data"  # no boundary
    with pytest.raises(HTTPException) as caught:
        parsed_parts(body, headers, spool_bytes=spool_bytes)
    assert caught.value.status_code == 400
