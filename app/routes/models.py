"""What this server runs: the model, its preprocessing, the options and limits it accepts."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ReadyServiceDep, SettingsDep
from app.errors import error_responses
from app.schemas import ModelInfo, ModelsResponse, OptionRange
from captioner.config import DecodingOptions

router = APIRouter(prefix="/v1", tags=["models"])

LIMIT_SETTINGS = (
    "max_image_bytes",
    "max_video_bytes",
    "max_images",
    "max_pixels",
    "max_frames",
    "max_video_duration_s",
    "max_video_pixels",
    "max_decode_s",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "request_timeout_s",
)
REQUEST_OPTIONS = ("beam_size", "num_captions", "max_length", "length_penalty", "tags")


@router.get(
    "/models",
    summary="The loaded model, its preprocessing, accepted options and limits",
    responses=error_responses("unauthorized", "not_ready"),
)
async def models(service: ReadyServiceDep, settings: SettingsDep) -> ModelsResponse:
    captioner = service.require_ready()
    info = captioner.describe()
    defaults = info["decoding_defaults"]
    options = {
        name: OptionRange(min=low, max=high, default=defaults[name])
        for name, (low, high) in DecodingOptions.LIMITS.items()
        if name in REQUEST_OPTIONS
    }
    options["num_frames"] = OptionRange(
        min=1, max=settings.max_frames, default=captioner.num_frames
    )
    model = ModelInfo(
        name=info["name"],
        version=info["version"],
        device=info["device"],
        dtype=info["dtype"],
        encoder=info["encoder"],
        encoder_runtime=info["encoder_runtime"],
        vocab_size=info["vocab_size"],
        tags=info["tags"],
        tags_unavailable=info["tags_unavailable"],
        domain=info["domain"],
        retrieval_items=info["retrieval_items"],
        preprocessing=info["preprocess"],
        options=options,
        limits={name: getattr(settings, name) for name in LIMIT_SETTINGS},
    )
    return ModelsResponse(models=[model])
