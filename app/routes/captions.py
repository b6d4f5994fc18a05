"""POST /v1/captions/{image,images,video}: read the upload, validate options, ask the service."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.deps import CaptionContextDep
from app.errors import error_responses, from_exception
from app.schemas import (
    BatchCaption,
    BatchCaptionResponse,
    BatchFailure,
    CaptionOptions,
    CaptionText,
    ImageCaptionResponse,
    ModelRef,
    TagOut,
    Timings,
    VideoCaptionResponse,
    VideoOptions,
)
from app.service import Captioned, CaptionService
from app.uploads import read_image, read_images, read_video

router = APIRouter(prefix="/v1/captions", tags=["captions"])

COMMON_ERRORS = (
    "invalid_request",
    "tags_unavailable",
    "unauthorized",
    "payload_too_large",
    "unsupported_media_type",
    "invalid_parameter",
    "overloaded",
    "internal_error",
    "not_ready",
    "timeout",
)
BINARY = {"type": "string", "format": "binary"}
FILES = {"type": "array", "items": BINARY, "minItems": 1}


def _form_schema(options: type[CaptionOptions], files: dict[str, Any]) -> dict[str, Any]:
    properties = dict(files)
    for name, schema in options.model_json_schema()["properties"].items():
        # An optional field is anyOf [T, null]; a form field is just T (with its range).
        schema = dict(schema)
        (value,) = (s for s in schema.pop("anyOf") if s["type"] != "null")
        properties[name] = schema | value
    return {"type": "object", "properties": properties}


def _body(content: dict[str, Any], description: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description, "content": content}}


IMAGE_BODY = _body(
    {
        "multipart/form-data": {
            "schema": _form_schema(CaptionOptions, {"image": BINARY}) | {"required": ["image"]}
        },
        "image/*": {"schema": BINARY},
        "application/json": {
            "schema": _form_schema(CaptionOptions, {"image_base64": {"type": "string"}})
            | {"required": ["image_base64"]},
            "example": {"image_base64": "iVBORw0KGgoAAAANSUhEUgAA...", "beam_size": 3},
        },
    },
    "The image as multipart field `image`, as the raw body (`image/png`, `image/jpeg`, ...), "
    'or as JSON `{"image_base64": ...}`. Options may be form fields or JSON keys too.',
)
IMAGES_BODY = _body(
    {
        "multipart/form-data": {
            "schema": _form_schema(CaptionOptions, {"images": FILES}) | {"required": ["images"]}
        }
    },
    "Up to CAPTIONER_MAX_IMAGES images, as repeated multipart fields `images`.",
)
VIDEO_BODY = _body(
    {
        "multipart/form-data": {
            "schema": _form_schema(VideoOptions, {"video": BINARY, "frames": FILES})
        },
        "video/*": {"schema": BINARY},
    },
    "A video file as multipart field `video` or the raw body (`video/mp4`, `video/webm`, "
    "`image/gif`, ...), or an ordered frame list as repeated multipart fields `frames`.",
)


@router.post(
    "/image",
    summary="Caption one image",
    openapi_extra=IMAGE_BODY,
    responses=error_responses("invalid_image", *COMMON_ERRORS),
)
async def caption_image(
    context: CaptionContextDep, options: Annotated[CaptionOptions, Query()]
) -> ImageCaptionResponse:
    service = context.service
    upload = await read_image(context.request, context.settings)
    decoding = service.options(options.merged(upload.fields).decoding())
    result = await service.caption_image(upload.data, decoding)
    return ImageCaptionResponse(
        id=context.request_id, model=_model(service), **_answer(result, context.started)
    )


@router.post(
    "/images",
    summary="Caption several images in one request",
    description="Results come back in input order; an image that cannot be read gets an "
    "`error` entry of its own and the others are still captioned.",
    openapi_extra=IMAGES_BODY,
    responses=error_responses("too_many_images", *COMMON_ERRORS),
)
async def caption_images(
    context: CaptionContextDep, options: Annotated[CaptionOptions, Query()]
) -> BatchCaptionResponse:
    service = context.service
    upload = await read_images(context.request, context.settings)
    decoding = service.options(options.merged(upload.fields).decoding())
    results = await service.caption_images(upload.images, decoding)
    items: list[BatchCaption | BatchFailure] = []
    for index, result in enumerate(results):
        if isinstance(result, Captioned):
            items.append(BatchCaption(index=index, **_answer(result, context.started)))
        else:
            error = from_exception(result)
            service.metrics.failures.labels(reason=error.type).inc()
            items.append(BatchFailure.model_validate({"index": index, **error.body()}))
    return BatchCaptionResponse(id=context.request_id, model=_model(service), results=items)


@router.post(
    "/video",
    summary="Describe a video, or an ordered list of frames",
    openapi_extra=VIDEO_BODY,
    responses=error_responses("invalid_video", "decode_timeout", "too_many_frames", *COMMON_ERRORS),
)
async def caption_video(
    context: CaptionContextDep, options: Annotated[VideoOptions, Query()]
) -> VideoCaptionResponse:
    service = context.service
    upload = await read_video(context.request, context.settings)
    try:
        merged = options.merged(upload.fields)
        decoding = service.options(merged.decoding())
        if upload.path is not None:
            num_frames = service.num_frames(merged.num_frames)
            result = await service.caption_video(upload.path, num_frames, decoding)
        else:
            if merged.num_frames is not None:
                service.num_frames(merged.num_frames)  # the same limit applies
            result = await service.caption_frames(upload.frames, merged.num_frames, decoding)
    finally:
        upload.close()
    return VideoCaptionResponse(
        id=context.request_id, model=_model(service), **_answer(result, context.started)
    )


def _model(service: CaptionService) -> ModelRef:
    captioner = service.captioner  # not require_ready: a draining server finishes its answers
    assert captioner is not None
    return ModelRef(name=captioner.name, version=captioner.version)


def _answer(result: Captioned, started: float) -> dict[str, Any]:
    """The fields every caption answer has: captions, what the input was, where time went."""

    def ms(seconds: float) -> float:
        return round(seconds * 1000, 3)

    found = result.result
    return {
        "caption": result.caption,
        "captions": [
            CaptionText(text=c.text, log_prob=c.log_prob, score=c.score) for c in result.captions
        ],
        "tags": [TagOut(**asdict(tag)) for tag in found.tags],
        "in_domain": found.in_domain,
        "domain_score": found.domain_score,
        "warnings": found.warnings,
        "input": result.input,
        "timings_ms": Timings(
            queue=ms(result.queue_s),
            preprocess=ms(result.preprocess_s),
            inference=ms(result.inference_s),
            total=ms(time.perf_counter() - started),
        ),
    }
