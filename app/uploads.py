"""Reading uploads: multipart, raw bodies and base64 JSON, within byte limits enforced while
the body streams in (a declared Content-Length over the limit is refused before any byte is read).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Message

from app.errors import ApiError
from app.settings import Settings

OVERHEAD = 64 * 1024  # multipart boundaries, part headers and option fields
# A single uploaded image up to this size stays in memory while the form is parsed. Starlette
# spools file parts over 1 MB to a temporary file through worker threads, and the image is read
# back whole at once: parsing a 1.8 MB photo took 7.6 ms of CPU that way, 1.8 ms in memory.
# Larger images still go to disk, so that a client holds at most this much extra memory.
IMAGE_SPOOL_BYTES = 8 * 1024 * 1024
PART_OVERHEAD = 1024  # per extra file part
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
RAW_VIDEO_TYPES = ("video/", "image/gif", "application/octet-stream")


@dataclass
class ImageUpload:
    data: bytes
    fields: dict[str, Any]  # option fields sent with the image (form fields or JSON keys)


@dataclass
class ImagesUpload:
    images: list[bytes | ApiError]  # one per part, in order; an oversized part is an error
    fields: dict[str, Any]


@dataclass
class VideoUpload:
    """A video spooled to a temporary file, or an ordered frame list; ``close`` cleans up."""

    fields: dict[str, Any]
    path: Path | None = None
    frames: list[bytes] = field(default_factory=list)

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower-cased ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def bounded(request: Request, limit: int, *, param: str) -> Request:
    """The same request, except that reading more than ``limit`` body bytes raises a 413."""

    def too_large(size: str) -> ApiError:
        return ApiError(
            "payload_too_large",
            f"the request body is {size}, over the limit of {limit} bytes for this endpoint",
            param=param,
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"{declared} bytes")
    received = 0
    upstream = request.receive

    async def receive() -> Message:
        nonlocal received
        message = await upstream()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large("larger")
        return message

    return Request(request.scope, receive)


def images_body_limit(settings: Settings) -> int:
    """The most bytes a /v1/captions/images request may have: every image at its limit."""
    return settings.max_images * (settings.max_image_bytes + PART_OVERHEAD) + OVERHEAD


def video_form_limit(settings: Settings) -> int:
    """The most bytes a multipart /v1/captions/video request may have: a video or frame list."""
    frames = settings.max_frames * (settings.max_image_bytes + PART_OVERHEAD)
    return max(settings.max_video_bytes, frames) + OVERHEAD


def image_json_limit(settings: Settings) -> int:
    """The most bytes a JSON /v1/captions/image request may have: the image in base64."""
    return 4 * math.ceil(settings.max_image_bytes / 3) + OVERHEAD


def largest_body(settings: Settings) -> int:
    """The largest request body any endpoint accepts: what a proxy in front must let through."""
    limits = (image_json_limit(settings), images_body_limit(settings), video_form_limit(settings))
    return max(limits)


async def read_image(request: Request, settings: Settings) -> ImageUpload:
    """One image: multipart field ``image``, a raw ``image/*`` body, or JSON ``image_base64``."""
    kind = media_type(request)
    limit = settings.max_image_bytes
    if kind == "multipart/form-data":
        one_image = ApiError(
            "invalid_parameter",
            "send exactly one image as multipart field 'image' "
            "(several images go to /v1/captions/images)",
            param="image",
        )
        async with _form(
            request,
            limit + OVERHEAD,
            max_files=1,
            param="image",
            too_many=one_image,
            spool_bytes=IMAGE_SPOOL_BYTES,
        ) as form:
            files = _files(form, "image")
            if len(files) != 1:
                raise one_image
            data = await _read_part(files[0], limit, param="image")
            return ImageUpload(data, _fields(form, exclude={"image"}))
    if kind == "application/json":
        body = await bounded(request, image_json_limit(settings), param="image").body()
        data, fields = await run_in_threadpool(_decode_json_image, body, limit)
        return ImageUpload(data, fields)
    if kind.startswith(RAW_IMAGE_TYPES):
        return ImageUpload(await bounded(request, limit, param="image").body(), {})
    raise _unsupported(kind, "multipart/form-data, image/* or application/json")


async def read_images(request: Request, settings: Settings) -> ImagesUpload:
    """Several images as repeated multipart fields ``images``."""
    kind = media_type(request)
    if kind != "multipart/form-data":
        raise _unsupported(kind, "multipart/form-data")
    count, per_image = settings.max_images, settings.max_image_bytes
    limit = images_body_limit(settings)
    too_many = ApiError(
        "too_many_images", f"send at most {count} images per request", param="images"
    )
    async with _form(request, limit, max_files=count, param="images", too_many=too_many) as form:
        files = _files(form, "images")
        if not files:
            raise ApiError(
                "invalid_parameter",
                "send one or more images as repeated multipart fields 'images'",
                param="images",
            )
        images: list[bytes | ApiError] = []
        for index, part in enumerate(files):
            try:
                images.append(await _read_part(part, per_image, param=f"images[{index}]"))
            except ApiError as exc:
                images.append(exc)
        return ImagesUpload(images, _fields(form, exclude={"images"}))


async def read_video(request: Request, settings: Settings) -> VideoUpload:
    """A video (multipart ``video`` or a raw ``video/*`` body) or ordered multipart ``frames``."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        limit = video_form_limit(settings)
        too_many = ApiError(
            "too_many_frames",
            f"send at most {settings.max_frames} frames per request",
            param="frames",
        )
        async with _form(
            request, limit, max_files=settings.max_frames, param="video", too_many=too_many
        ) as form:
            videos, frames = _files(form, "video"), _files(form, "frames")
            fields = _fields(form, exclude={"video", "frames"})
            if len(videos) + bool(frames) != 1:
                raise ApiError(
                    "invalid_parameter",
                    "send either one multipart field 'video' or repeated fields 'frames'",
                    param="video",
                )
            if videos:
                return VideoUpload(fields, path=await _spool_part(videos[0], settings))
            return VideoUpload(
                fields,
                frames=[
                    await _read_part(part, settings.max_image_bytes, param=f"frames[{i}]")
                    for i, part in enumerate(frames)
                ],
            )
    if kind.startswith(RAW_VIDEO_TYPES):
        stream = bounded(request, settings.max_video_bytes, param="video").stream()
        with _temporary_file() as (file, path):
            async for chunk in stream:
                file.write(chunk)  # page-cache writes of <=64 KiB chunks: cheap
        return VideoUpload({}, path=path)
    raise _unsupported(kind, "multipart/form-data or video/*")


# -- helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _form(
    request: Request,
    limit: int,
    *,
    max_files: int,
    param: str,
    too_many: ApiError | None = None,
    spool_bytes: int = MultiPartParser.spool_max_size,
) -> Any:
    """The multipart form, closed on exit; file parts up to ``spool_bytes`` stay in memory
    (by default Starlette's 1 MB), larger ones go to a temporary file."""
    try:
        form = await _parse_multipart(
            bounded(request, limit, param=param), max_files=max_files, spool_bytes=spool_bytes
        )
    except HTTPException as exc:
        # Starlette stops parsing at max_files with this message; say it in our own terms.
        if too_many is not None and "Too many files" in str(exc.detail):
            raise too_many from exc
        raise
    try:
        yield form
    finally:
        await form.close()


async def _parse_multipart(request: Request, *, max_files: int, spool_bytes: int) -> FormData:
    """What ``request.form()`` does for a multipart body, with the in-memory spool chosen."""
    async with contextlib.aclosing(request.stream()) as stream:
        parser = MultiPartParser(request.headers, stream, max_files=max_files, max_fields=64)
        parser.spool_max_size = spool_bytes  # read per part, as the class attribute would be
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(status_code=400, detail=exc.message) from exc


def _files(form: FormData, name: str) -> list[UploadFile]:
    values = form.getlist(name)
    for value in values:
        if not isinstance(value, UploadFile):
            raise ApiError(
                "invalid_parameter", f"multipart field '{name}' must be a file", param=name
            )
    return values  # type: ignore[return-value]


def _fields(form: FormData, *, exclude: set[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in exclude:
            continue
        if not isinstance(value, str):
            raise ApiError("invalid_parameter", f"unexpected file field '{key}'", param=key)
        fields[key] = value
    return fields


async def _read_part(part: UploadFile, limit: int, *, param: str) -> bytes:
    if part.size is not None and part.size > limit:
        raise ApiError(
            "payload_too_large",
            f"{param} is {part.size} bytes, over the limit of {limit}",
            param=param,
        )
    return await part.read()


async def _spool_part(part: UploadFile, settings: Settings) -> Path:
    if part.size is not None and part.size > settings.max_video_bytes:
        raise ApiError(
            "payload_too_large",
            f"the video is {part.size} bytes, over the limit of {settings.max_video_bytes}",
            param="video",
        )

    def copy() -> Path:
        with _temporary_file() as (file, path):
            part.file.seek(0)
            shutil.copyfileobj(part.file, file, 1024 * 1024)
        return path

    return await run_in_threadpool(copy)


@contextlib.contextmanager
def _temporary_file() -> Iterator[tuple[IO[bytes], Path]]:
    """A named temporary file (PyAV reads paths), removed again if filling it fails."""
    fd, name = tempfile.mkstemp(prefix="captioner-", suffix=".upload")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file, path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _decode_json_image(body: bytes, limit: int) -> tuple[bytes, dict[str, Any]]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_request", f"the body is not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get("image_base64"), str):
        raise ApiError(
            "invalid_parameter",
            'send a JSON object {"image_base64": "<base64 image>"}',
            param="image_base64",
        )
    encoded = document.pop("image_base64")
    if encoded.startswith("data:") and "," in encoded:  # a data: URL is fine too
        encoded = encoded.split(",", 1)[1]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            "invalid_image", "image_base64 is not valid base64", param="image_base64"
        ) from exc
    if len(data) > limit:
        raise ApiError(
            "payload_too_large",
            f"the image is {len(data)} bytes, over the limit of {limit}",
            param="image_base64",
        )
    return data, document


def _unsupported(kind: str, expected: str) -> ApiError:
    return ApiError(
        "unsupported_media_type",
        f"Content-Type {kind or '(none)'!r} is not accepted here; send {expected}",
    )
