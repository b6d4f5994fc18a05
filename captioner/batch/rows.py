"""One output row per input, the same from both engines: the Parquet schema, the decode step
and the batched captioning step.

Decoding goes through ``MediaPreparer`` and captioning through ``Captioner.caption_tensors``,
the code the server and ``captioner caption`` run, so a batch job's captions are the
service's captions.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from captioner.batch.inputs import Item, read_source, suffix
from captioner.errors import CaptionerError, StillImageError
from captioner.media_types import VIDEO_SUFFIXES

if TYPE_CHECKING:
    import torch

    from captioner.config import DecodingOptions
    from captioner.inference import Captioner, CaptionResult
    from captioner.media import MediaPreparer

CAPTION = pa.struct([("text", pa.string()), ("log_prob", pa.float64()), ("score", pa.float64())])
TAG = pa.struct([("name", pa.string()), ("wordnet_id", pa.string()), ("probability", pa.float64())])
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # as listed: a local path, a URL or shard.tar#member
        ("kind", pa.string()),  # "image" or "video"
        ("caption", pa.string()),  # the best caption; null when the input failed
        ("captions", pa.list_(CAPTION)),  # the n-best, best first
        ("tags", pa.list_(TAG)),  # ImageNet tags when asked for (--tags K), else null
        ("in_domain", pa.bool_()),  # null when the model has no domain summary
        ("domain_score", pa.float64()),
        ("width", pa.int32()),  # as shown (after EXIF orientation / display rotation)
        ("height", pa.int32()),
        ("duration_s", pa.float64()),  # videos only
        ("frames", pa.int32()),  # frames captioned: 1 for an image
        ("error_type", pa.string()),  # the exception's class, e.g. InvalidMediaError
        ("error_message", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


@dataclass(frozen=True)
class Prepared:
    """One decoded input, ready for the model."""

    path: str
    kind: str
    tensor: torch.Tensor  # (T, 3, S, S)
    width: int
    height: int
    duration_s: float | None = None


def kind_of(path: str) -> str:
    return "video" if suffix(path) in VIDEO_SUFFIXES else "image"


def prepare(media: MediaPreparer, item: Item, num_frames: int | None = None) -> Prepared:
    """Decode one input as the server would; raises what the decoders raise."""
    source = read_source(item)
    if kind_of(item.path) == "video":
        # A one-frame GIF is captioned as the image it is, as `captioner caption` does.
        with contextlib.suppress(StillImageError):
            tensor, video = media.video(source, num_frames, label=item.path)
            return Prepared(item.path, "video", tensor, video.width, video.height, video.duration_s)
    tensor, image = media.image(source, label=item.path)
    return Prepared(item.path, "image", tensor, image.width, image.height)


def prepare_or_fail(
    media: MediaPreparer, item: Item, num_frames: int | None = None
) -> Prepared | dict[str, Any]:
    """``prepare``, or the failed input's row: any error is this input's alone (a decoder can
    raise more than the library's errors on hostile files), and the job goes on."""
    try:
        return prepare(media, item, num_frames)
    except Exception as exc:
        return failure_row(item.path, exc)


def failure_row(path: str, exc: BaseException, kind: str | None = None) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(
        path=path,
        kind=kind or kind_of(path),
        error_type=type(exc).__name__,
        error_message=str(exc),
    )
    return row


def caption_rows(
    captioner: Captioner, batch: list[Prepared], options: DecodingOptions
) -> list[dict[str, Any]]:
    """Caption decoded inputs in one batched model call; one row each, in order.

    An input the model refuses (a ``CaptionerError``) is retried alone, so that it fails by
    itself; any other error is the model's or the machine's, not the input's, and stops the
    job (which resumes where it stopped).
    """
    try:
        results = captioner.caption_tensors([p.tensor for p in batch], options)
    except CaptionerError as exc:
        if len(batch) == 1:
            return stamp([failure_row(batch[0].path, exc, batch[0].kind)], captioner)
        return [row for p in batch for row in caption_rows(captioner, [p], options)]
    return stamp([_row(p, r) for p, r in zip(batch, results, strict=True)], captioner)


def _row(prepared: Prepared, result: CaptionResult) -> dict[str, Any]:
    return {
        "path": prepared.path,
        "kind": prepared.kind,
        "caption": result.caption,
        "captions": [asdict(c) for c in result.captions],
        "tags": [asdict(t) for t in result.tags] or None,
        "in_domain": result.in_domain,
        "domain_score": result.domain_score,
        "width": prepared.width,
        "height": prepared.height,
        "duration_s": prepared.duration_s,
        "frames": len(prepared.tensor),
        "error_type": None,
        "error_message": None,
    }


def stamp(rows: list[dict[str, Any]], captioner: Captioner) -> list[dict[str, Any]]:
    """The rows with the model's name and version (failed inputs' rows included)."""
    for row in rows:
        row["model"] = captioner.name
        row["model_version"] = captioner.version
    return rows


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)
