"""Media in, pixels out: bytes/paths/PIL images -> RGB images; video files -> sampled frames.

Everything that can fail on user input raises ``InvalidMediaError`` (or ``MediaTooLargeError``)
with a message fit to show the user.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from captioner.config import PreprocessConfig
from captioner.errors import (
    ConfigError,
    DecodeTimeoutError,
    InvalidMediaError,
    MediaTooLargeError,
    StillImageError,
)

log = logging.getLogger(__name__)

ImageSource = Image.Image | bytes | str | Path
VideoSource = bytes | str | Path

DEFAULT_MAX_PIXELS = 40_000_000  # a decompression-bomb guard: about 6300 x 6300
MAX_ASPECT_RATIO = 50  # wider or taller images are refused (a 40000x1 strip is not a photo)

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _describe(source: object) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return type(source).__name__


@dataclass(frozen=True)
class ImageInfo:
    """What a decoded image was, upright (after EXIF orientation, as viewers show it, and as
    videos report their displayed size): reported to clients."""

    width: int
    height: int
    format: str  # "png", "jpeg", ...: the file's format, lower-case; "unknown" when it has none


ORIENTATION_TAG = 0x0112  # EXIF Orientation
TURNED_ORIENTATIONS = {5, 6, 7, 8}  # a quarter turn: width and height swap when shown


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: int | None = None,
    label: str | None = None,
) -> Image.Image:
    """Open an image from a PIL image, bytes or a path as RGB, honouring EXIF orientation.

    Errors name the image by ``label`` when given (``frames[2]``), else by its path or size.
    """
    return open_image(source, max_pixels=max_pixels, draft=draft, label=label)[0]


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: int | None = None,
    label: str | None = None,
) -> tuple[Image.Image, ImageInfo]:
    """``load_image``, and what the image was: its stored size and its file format.

    With ``draft``, a JPEG is decoded straight to a smaller size when both its sides stay at
    least ``draft`` pixels (libjpeg's DCT scaling, 1/2 to 1/8): a 4000x3000 photo for a
    224-pixel model then decodes 4x faster. Callers pass twice the size they resize to, so
    that the final resize still filters the picture as it would from full size.
    """
    name = label or _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            # A file is read whole first: PIL keeps a path's file open until the image is
            # closed, and a multi-frame GIF never closes it by itself.
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            image = Image.open(io.BytesIO(data))
        except FileNotFoundError as exc:
            raise InvalidMediaError(f"{name}: no such file") from exc
        except Image.DecompressionBombError as exc:
            raise MediaTooLargeError(f"{name}: {exc}") from exc
        except (OSError, Image.UnidentifiedImageError, ValueError) as exc:
            raise InvalidMediaError(f"{name}: not a readable image") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise MediaTooLargeError(
            f"{name}: image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Resizing the shorter side up to the model's size would blow the longer one up.
        raise MediaTooLargeError(
            f"{name}: image is {width}x{height}, more than {MAX_ASPECT_RATIO}:1"
        )
    file_format = (image.format or "unknown").lower()
    if draft and image.format == "JPEG" and min(width, height) >= 2 * draft:
        image.draft("RGB", (draft, draft))  # keeps both sides >= draft
    try:
        turned = image.getexif().get(ORIENTATION_TAG, 1) in TURNED_ORIENTATIONS
        image = ImageOps.exif_transpose(image) or image
        if turned:
            width, height = height, width
        return _to_rgb(image), ImageInfo(width, height, file_format)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidMediaError(f"{name}: image data is corrupt ({exc})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparency is composited onto white, as a viewer would show it."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: scale to 8 bits (a plain convert would clip to white).
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode != "F" else max(float(pixels.max()), 1.0)
        grey = np.clip(pixels / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class Preprocessor:
    """Turns RGB images into normalised (3, S, S) tensors exactly as the model was trained."""

    def __init__(self, config: PreprocessConfig) -> None:
        if config.interpolation not in _INTERPOLATION:
            raise ConfigError(
                f"unknown interpolation {config.interpolation!r}; choose {sorted(_INTERPOLATION)}"
            )
        if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
            raise ConfigError("preprocess mean and std need 3 values each, std > 0")
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32)
        self._std = np.asarray(config.std, dtype=np.float32)

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """Shorter side to ``resize_size``, then a centre crop of ``image_size``."""
        cfg = self.config
        width, height = image.size
        scale = cfg.resize_size / min(width, height)
        new_size = (
            max(cfg.image_size, round(width * scale)),
            max(cfg.image_size, round(height * scale)),
        )
        if new_size != image.size:
            image = image.resize(new_size, _INTERPOLATION[cfg.interpolation], reducing_gap=3.0)
        left = (new_size[0] - cfg.image_size) // 2
        top = (new_size[1] - cfg.image_size) // 2
        if (left, top) != (0, 0) or new_size[0] != cfg.image_size or new_size[1] != cfg.image_size:
            image = image.crop((left, top, left + cfg.image_size, top + cfg.image_size))
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(self.resize_and_crop(image.convert("RGB")), dtype=np.float32)
        # NumPy, not torch: this runs in the server's decoding threads, and a torch op there
        # starts an OpenMP team that fights the model's threads for the cores (a 224x224
        # normalisation took 25 ms instead of 0.3 ms on a busy 2-core machine).
        normalised = (pixels / np.float32(255.0) - self._mean) / self._std  # (S, S, 3)
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def frames(self, images: list[Image.Image]) -> torch.Tensor:
        """Stack a frame sequence into a (T, 3, S, S) tensor."""
        return torch.stack([self(image) for image in images])


class MediaPreparer:
    """Decodes images, frame sequences and videos into the model's input tensors.

    The one decoding path: ``Captioner.prepare_*`` (the server and the CLI) and the batch
    engines' decode tasks, which need the preprocessing config but not the model, use it.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.preprocess = Preprocessor(config)
        self.num_frames = config.num_frames
        # Large JPEGs decode at reduced size, still twice what the resize keeps (open_image).
        self.draft_size = 2 * config.resize_size

    def image(
        self,
        source: ImageSource,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        label: str | None = None,
    ) -> tuple[torch.Tensor, ImageInfo]:
        """An image as a one-frame sequence tensor (1, 3, S, S), and what the image was."""
        image, info = open_image(source, max_pixels=max_pixels, draft=self.draft_size, label=label)
        return self.preprocess(image).unsqueeze(0), info

    def frames(
        self, frames: list[ImageSource], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, ImageInfo]:
        """An ordered frame sequence as a (T, 3, S, S) tensor, and what its first frame was."""
        if not frames:
            raise InvalidMediaError("a frame sequence needs at least one frame")
        opened = [
            open_image(f, max_pixels=max_pixels, draft=self.draft_size, label=f"frames[{i}]")
            for i, f in enumerate(frames)
        ]
        return self.preprocess.frames([image for image, _ in opened]), opened[0][1]

    def video(
        self,
        source: VideoSource,
        num_frames: int | None = None,
        limits: VideoLimits | None = None,
        *,
        label: str | None = None,
    ) -> tuple[torch.Tensor, VideoInfo]:
        """``num_frames`` (default: the model's) frames sampled uniformly over a video, as a
        (T, 3, S, S) tensor."""
        frames, info = read_video(source, num_frames or self.num_frames, limits, label=label)
        return self.preprocess.frames(frames), info


@dataclass(frozen=True)
class VideoInfo:
    """What a decoded video was: reported back to clients."""

    duration_s: float
    fps: float
    codec: str
    total_frames: int
    width: int
    height: int
    frames_used: int


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on what a video may cost to decode."""

    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 2160
    max_total_frames: int = 100_000
    # Wall-clock seconds for the whole read (probe, packet count, decode), checked between
    # packets: a small file can still take minutes (thousands of flat 4K frames). None = none.
    max_decode_s: float | None = None


class _Deadline:
    """A wall-clock budget for reading one video; ``check`` raises ``DecodeTimeoutError``."""

    def __init__(self, seconds: float | None, name: str) -> None:
        self.seconds = seconds
        self.name = name
        self.ends = time.monotonic() + seconds if seconds is not None else None

    def passed(self) -> bool:
        return self.ends is not None and time.monotonic() > self.ends

    def remaining(self) -> float | None:
        return None if self.ends is None else max(0.001, self.ends - time.monotonic())

    def error(self) -> DecodeTimeoutError:
        return DecodeTimeoutError(
            f"{self.name}: decoding took longer than the limit of {self.seconds:g} s; "
            "send a shorter clip, fewer frames per second or fewer pixels"
        )

    def check(self) -> None:
        if self.passed():
            raise self.error()


def _reason(exc: Exception) -> str:
    """FFmpeg's own words for an error, without its errno and the file name it was given."""
    return getattr(exc, "strerror", None) or str(exc)


@contextmanager
def _open_container(
    source: VideoSource, name: str, deadline: _Deadline
) -> Iterator[av.container.InputContainer]:
    # FFmpeg's interrupt callback (PyAV's timeout) bounds probing and each read in C, where
    # the checks between packets cannot reach.
    timeout = deadline.remaining()
    try:
        if isinstance(source, bytes):
            container = av.open(io.BytesIO(source), mode="r", timeout=timeout)
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidMediaError(f"{name}: no such file")
            container = av.open(str(path), mode="r", timeout=timeout)
    except InvalidMediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        if deadline.passed():
            raise deadline.error() from exc
        raise InvalidMediaError(f"{name}: not a readable video ({_reason(exc)})") from exc
    try:
        yield container
    finally:
        container.close()


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``total_frames`` (segment centres)."""
    if total_frames <= 0:
        return []
    return [
        min(total_frames - 1, int((i + 0.5) * total_frames / num_frames)) for i in range(num_frames)
    ]


def read_video(
    source: VideoSource,
    num_frames: int,
    limits: VideoLimits | None = None,
    *,
    label: str | None = None,
) -> tuple[list[Image.Image], VideoInfo]:
    """Decode ``num_frames`` frames sampled uniformly over a video's duration.

    Memory stays bounded: frames stream through the decoder and only the sampled ones are kept.
    A first pass counts packets (no decoding) when the container does not state its frame count.
    Time is bounded by ``limits.max_decode_s`` when set: past it, ``DecodeTimeoutError``.
    """
    limits = limits or VideoLimits()
    name = label or _describe(source)
    if num_frames < 1:
        raise InvalidMediaError("num_frames must be at least 1")
    deadline = _Deadline(limits.max_decode_s, name)
    try:
        with _open_container(source, name, deadline) as container:
            if not container.streams.video:
                raise InvalidMediaError(f"{name}: has no video stream")
            stream = container.streams.video[0]
            if stream.codec_context is None:  # FFmpeg knows no decoder for it
                raise InvalidMediaError(f"{name}: its video codec is unknown or unsupported")
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > limits.max_pixels:
                raise MediaTooLargeError(
                    f"video frames are {width}x{height}, "
                    f"over the limit of {limits.max_pixels} pixels"
                )
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            duration = _duration_seconds(container, stream)
            if duration > limits.max_duration_s:
                raise MediaTooLargeError(
                    f"video lasts {duration:.1f} s, over the limit of {limits.max_duration_s:g} s"
                )
            total = (
                stream.frames if stream.frames > 0 else _count_packets(container, stream, deadline)
            )
            if total <= 1 or container.format.name.endswith("_pipe"):
                # One picture (a JPEG, a PNG, a one-frame GIF) is not a clip: sampled, it would
                # be 8 copies of one frame, described as if something moved.
                raise StillImageError(f"{name}: is a still image, not a video")
            if total > limits.max_total_frames:
                raise MediaTooLargeError(
                    f"video has {total} frames, over the limit of {limits.max_total_frames}"
                )
        with _open_container(source, name, deadline) as container:
            wanted = sample_indices(total, num_frames)
            frames, rotation = _decode_sampled(container, wanted, deadline)
    except (av.FFmpegError, EOFError, ValueError) as exc:
        if deadline.passed():  # FFmpeg's interrupt callback stopped a read
            raise deadline.error() from exc
        raise InvalidMediaError(f"{name}: video data is corrupt ({_reason(exc)})") from exc
    if not frames:
        raise InvalidMediaError(f"{name}: video has no decodable frames")
    if duration <= 0 and fps > 0:
        duration = total / fps
    if rotation % 180:  # a portrait phone video is stored landscape: report what is shown
        width, height = height, width
    info = VideoInfo(
        duration_s=round(duration, 3),
        fps=round(fps, 3),
        codec=codec,
        total_frames=total,
        width=width,
        height=height,
        frames_used=len(frames),
    )
    return frames, info


def _duration_seconds(
    container: av.container.InputContainer, stream: av.video.VideoStream
) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _count_packets(
    container: av.container.InputContainer, stream: av.video.VideoStream, deadline: _Deadline
) -> int:
    count = 0
    for packet in container.demux(stream):
        deadline.check()
        count += packet.size > 0
    return count


def _frames(
    container: av.container.InputContainer, stream: av.video.VideoStream, deadline: _Deadline
) -> Iterator[av.VideoFrame]:
    """``container.decode(stream)``, with the deadline checked before each packet's decode."""
    for packet in container.demux(stream):
        deadline.check()
        yield from packet.decode()


def _decode_sampled(
    container: av.container.InputContainer, wanted: list[int], deadline: _Deadline
) -> tuple[list[Image.Image], int]:
    """The frames at the ``wanted`` indices (sorted), decoding no further than the last one,
    turned upright; and the rotation that was applied (degrees counter-clockwise)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    wanted_set = set(wanted)
    picked: dict[int, Image.Image] = {}
    rotation = 0
    for index, frame in enumerate(_frames(container, stream, deadline)):
        if index in wanted_set:
            rotation = display_rotation(frame)
            picked[index] = upright(frame.to_image(), rotation)
        if index >= wanted[-1]:
            break
    if not picked:
        return [], 0
    # A stream can hold fewer frames than its header or packet count says: reuse the last one.
    frames: list[Image.Image] = []
    for i in wanted:
        frames.append(picked.get(i, frames[-1] if frames else picked[min(picked)]))
    return frames, rotation


def display_rotation(frame: av.VideoFrame) -> int:
    """How far a frame must turn counter-clockwise to be shown as intended: 0, 90, 180 or 270.

    Phones store portrait video as landscape frames plus a display matrix; FFmpeg reports its
    angle counter-clockwise (``av_display_rotation_get``), as PyAV's ``frame.rotation`` does.
    Angles that are not a multiple of 90 are rounded to the nearest quarter turn. A mirroring
    display matrix (rare: some front-camera clips) is not undone; only its rotation is.
    """
    if not hasattr(frame, "rotation"):
        _warn_no_rotation()
        return 0
    degrees = frame.rotation or 0
    return round(degrees / 90.0) % 4 * 90


@functools.cache
def _warn_no_rotation() -> None:
    log.warning(
        "PyAV %s does not report display rotation (VideoFrame.rotation); portrait phone videos "
        "will be read sideways. Upgrade PyAV to fix this.",
        av.__version__,
    )


_TURNS = {
    90: Image.Transpose.ROTATE_90,  # PIL's ROTATE_* turn counter-clockwise
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


def upright(image: Image.Image, rotation: int) -> Image.Image:
    """``image`` turned ``rotation`` degrees counter-clockwise (a multiple of 90)."""
    return image.transpose(_TURNS[rotation]) if rotation in _TURNS else image
