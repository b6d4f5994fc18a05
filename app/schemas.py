"""Request options and response bodies: the shapes /docs shows, with examples."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import ErrorDetail
from captioner.config import DecodingOptions


def _option(name: str, description: str, example: float) -> Any:
    low, high = DecodingOptions.LIMITS[name]
    return Field(
        None,
        ge=low,
        le=high,
        description=f"{description}; {low:g} to {high:g}, default from the model",
        examples=[example],
    )


class CaptionOptions(BaseModel):
    """Decoding options, as query parameters or as form (or JSON) fields beside the media."""

    model_config = ConfigDict(extra="forbid")

    beam_size: int | None = _option("beam_size", "beams searched (1 = greedy)", 3)
    num_captions: int | None = _option(
        "num_captions", "captions returned, best first; at most beam_size", 1
    )
    max_length: int | None = _option("max_length", "most words in a caption", 20)
    length_penalty: float | None = _option(
        "length_penalty", "ranking: log_prob / length**length_penalty", 1.0
    )
    tags: int | None = _option("tags", "top ImageNet classes returned beside the captions", 5)

    def decoding(self) -> dict[str, Any]:
        """The options given, as keyword arguments for ``Captioner.options``."""
        return self.model_dump(include=set(CaptionOptions.model_fields), exclude_none=True)

    def merged(self, fields: dict[str, Any]) -> CaptionOptions:
        """These (query) options updated by the fields sent in the body, validated."""
        try:
            body = type(self).model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        return self.model_copy(update=body.model_dump(exclude_none=True))


class VideoOptions(CaptionOptions):
    num_frames: int | None = Field(
        None,
        ge=1,
        description="frames sampled uniformly from the video (a frame list is thinned to this "
        "many); at most CAPTIONER_MAX_FRAMES, default from the model",
        examples=[8],
    )


class ModelRef(BaseModel):
    name: str = Field(examples=["captioner-default"])
    version: str = Field(examples=["1"])


class CaptionText(BaseModel):
    text: str = Field(examples=["a red circle to the left of a blue square"])
    log_prob: float = Field(description="total log-probability of the caption", examples=[-4.21])
    score: float = Field(
        description="what the n-best list is ranked by: log_prob / length**length_penalty",
        examples=[-0.84],
    )


class TagOut(BaseModel):
    name: str = Field(description="the ImageNet-1k class", examples=["tabby, tabby cat"])
    wordnet_id: str = Field(examples=["n02123045"])
    probability: float = Field(examples=[0.28])


class DomainFields(BaseModel):
    """Whether the input looks like the model's training data, and the tags asked for."""

    tags: list[TagOut] = Field(
        default_factory=list, description="top ImageNet classes (when `tags` > 0), best first"
    )
    in_domain: bool | None = Field(
        description="false: the input is unlike the training data and the caption is probably "
        "wrong; null: the model has no summary of its training data to tell",
        examples=[True],
    )
    domain_score: float | None = Field(
        description="distance from the training data, in units of the calibrated threshold "
        "(at most 1 is in domain)",
        examples=[0.42],
    )
    warnings: list[str] = Field(
        default_factory=list, description="plain-words warnings, e.g. out of domain"
    )


class Timings(BaseModel):
    """Milliseconds spent: waiting for a batch, decoding media, in the model, and overall."""

    queue: float = Field(examples=[3.1])
    preprocess: float = Field(examples=[4.7])
    inference: float = Field(examples=[21.5])
    total: float = Field(examples=[31.0])


class ImageInput(BaseModel):
    width: int = Field(examples=[640])
    height: int = Field(examples=[480])
    format: str = Field(description="as detected from the bytes", examples=["png"])


class VideoInput(BaseModel):
    frames_used: int = Field(examples=[8])
    duration_s: float | None = Field(description="null for a frame list", examples=[2.0])
    fps: float | None = Field(examples=[25.0])
    codec: str | None = Field(examples=["h264"])
    width: int | None = Field(examples=[320])
    height: int | None = Field(examples=[240])


# Each answer lists what identifies it and its captions first, then DomainFields' (pydantic
# orders inherited fields by the reversed base list, so DomainFields is named first).


class _ImageAnswer(BaseModel):
    id: str = Field(description="the request id (also the X-Request-ID header)")
    model: ModelRef
    caption: str = Field(description="the best caption", examples=["a red circle"])
    captions: list[CaptionText] = Field(description="num_captions captions, best first")
    input: ImageInput
    timings_ms: Timings


class ImageCaptionResponse(DomainFields, _ImageAnswer):
    pass


class _VideoAnswer(BaseModel):
    id: str
    model: ModelRef
    caption: str = Field(examples=["a green star moves to the right"])
    captions: list[CaptionText]
    input: VideoInput
    timings_ms: Timings


class VideoCaptionResponse(DomainFields, _VideoAnswer):
    pass


class _BatchAnswer(BaseModel):
    index: int = Field(description="position of the image in the request")
    caption: str
    captions: list[CaptionText]
    input: ImageInput
    timings_ms: Timings


class BatchCaption(DomainFields, _BatchAnswer):
    pass


class BatchFailure(BaseModel):
    index: int
    error: ErrorDetail


class BatchCaptionResponse(BaseModel):
    id: str
    model: ModelRef
    results: list[BatchCaption | BatchFailure] = Field(
        description="one per image, in input order; a bad image gets an error entry"
    )


class OptionRange(BaseModel):
    min: int | float
    max: int | float
    default: int | float


class ModelInfo(BaseModel):
    name: str
    version: str
    device: str = Field(examples=["cpu"])
    dtype: str = Field(examples=["float32"])
    encoder: str = Field(examples=["efficientnet_lite0"])
    encoder_runtime: str = Field(
        description="what runs the CNN: onnxruntime (CPUs, when it works) or torch",
        examples=["onnxruntime"],
    )
    vocab_size: int
    tags: bool = Field(description="whether the `tags` option works with this model")
    tags_unavailable: str | None = Field(
        None, description="why not, when it does not", examples=[None]
    )
    domain: str | None = Field(
        description="what the model was trained to describe; null when it cannot tell "
        "in-domain inputs from others",
        examples=["generated scenes: coloured shapes on plain backgrounds, still or moving"],
    )
    retrieval_items: int = Field(
        description="training items whose captions the model looks up for each input "
        "(retrieval augmentation); 0 when it decodes from the picture alone",
        examples=[0],
    )
    preprocessing: dict[str, Any] = Field(description="how pixels become the model's input")
    options: dict[str, OptionRange] = Field(description="accepted request options")
    limits: dict[str, float | int] = Field(description="the service's limits (see README)")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str = Field(examples=["ok"])
