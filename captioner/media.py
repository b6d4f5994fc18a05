"""Media in, pixels out: bytes/paths/PIL images -> RGB images; video files -> sampled frames.

Everything that can fail on user input raises ``InvalidMediaError`` (or ``MediaTooLargeError``)
with a message fit to show the user.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
        if isinstance(source, Image.Image):
            image = ImageOps.exif_transpose(image) or image  # never change the caller's image
        else:
            # Ours: turned in place, which spares the copy exif_transpose otherwise makes of
            # every image, turned or not (5% of a decoding thread's time under load).
            ImageOps.exif_transpose(image, in_place=True)
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
        # Each channel's normalised value for every 8-bit level, computed as
        # (level / 255 - mean) / std in float32: looking pixels up in it gives the same floats
        # as doing that arithmetic on every pixel, in a third of the time.
        levels = np.arange(256, dtype=np.float32)[:, None]
        mean = np.asarray(config.mean, dtype=np.float32)
        std = np.asarray(config.std, dtype=np.float32)
        self._table = np.ascontiguousarray(((levels / np.float32(255.0) - mean) / std).T)

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
        pixels = np.asarray(self.resize_and_crop(image.convert("RGB")))  # (S, S, 3) uint8
        # NumPy, not torch: this runs in the server's decoding threads, and a torch op there
        # starts an OpenMP team that fights the model's threads for the cores (a 224x224
        # normalisation took 25 ms instead of 0.3 ms on a busy 2-core machine).
        normalised = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._table[channel], pixels[:, :, channel], out=normalised[channel])
        return torch.from_numpy(normalised)

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


Sampling = Literal["fast", "exact"]
SAMPLING_POLICIES: tuple[Sampling, ...] = ("fast", "exact")


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on what a video may cost to decode, and how its frames are sampled.

    ``sampling`` picks one frame from each of ``num_frames`` equal segments of the video:

    - ``"fast"`` (the default): the segment's centre, unless reaching it would decode more
      than ``SNAP_AFTER_FRAMES`` frames and a keyframe lies inside the segment; then that
      keyframe (the one closest to the centre), which decodes alone after a seek. A long
      phone clip then costs about one decoded frame per sample instead of up to a keyframe
      interval (hundreds of frames) each. Short clips get the exact centres.
    - ``"exact"``: the segment centres (``sample_indices``), always.

    Both seek past long stretches between samples instead of decoding them.
    """

    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 2160
    max_total_frames: int = 100_000
    # Wall-clock seconds for the whole read (probe, packet index, decode), checked between
    # packets: a small file can still take minutes (thousands of flat 4K frames). None = none.
    max_decode_s: float | None = None
    sampling: Sampling = "fast"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING_POLICIES:
            raise ConfigError(
                f"unknown video sampling {self.sampling!r}; choose one of {SAMPLING_POLICIES}"
            )


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


# "fast" sampling leaves a segment's centre for a keyframe inside the segment when reaching the
# centre would decode more than this many frames. A constant, so that the frames chosen (and so
# the caption) do not depend on the machine's core count. A seek already costs a few decoded
# frames (frame threads and B-frame reordering fill up before the keyframe comes out), so a
# centre this close to where decoding starts is nearly free; 15 frames is half a second at
# 30 fps and about 10 ms at 720p, while keyframes are 30 (phones) to 250 (x264) frames apart.
SNAP_AFTER_FRAMES = 15


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``total_frames`` (segment centres)."""
    if total_frames <= 0:
        return []
    return [
        min(total_frames - 1, int((i + 0.5) * total_frames / num_frames)) for i in range(num_frames)
    ]


def snapped_indices(total_frames: int, num_frames: int, keyframes: list[int]) -> list[int]:
    """``sample_indices``, except that a centre costing more than ``SNAP_AFTER_FRAMES`` decoded
    frames to reach gives way to the keyframe in its segment closest to it ("fast" sampling).

    ``keyframes`` are the ascending indices of the frames decoding can start from. Each index
    still comes from its own segment, so they stay in order and distinct.
    """
    chosen: list[int] = []
    position = 0  # the frame a decoder would give next, having given the ones chosen so far
    for segment, centre in enumerate(sample_indices(total_frames, num_frames)):
        cost = centre - _decode_start(centre, position, keyframes) + 1
        inside = _keyframes_in_segment(keyframes, segment, total_frames, num_frames)
        if cost > SNAP_AFTER_FRAMES and inside:
            centre = min(inside, key=lambda key: (abs(key - centre), key))
        chosen.append(centre)
        position = max(position, centre + 1)
    return chosen


def _keyframes_in_segment(
    keyframes: list[int], segment: int, total_frames: int, num_frames: int
) -> list[int]:
    # Segment i holds the frames j with i * total / num <= j < (i + 1) * total / num.
    first = -(-segment * total_frames // num_frames)
    end = -(-(segment + 1) * total_frames // num_frames)
    return keyframes[bisect.bisect_left(keyframes, first) : bisect.bisect_left(keyframes, end)]


def _decode_start(target: int, position: int, keyframes: list[int]) -> int:
    """Where decoding must start to reach frame ``target`` when the decoder would give frame
    ``position`` next: the last keyframe at or before ``target`` when that lies ahead (a seek),
    else ``position`` (keep decoding)."""
    at = bisect.bisect_right(keyframes, target) - 1
    return keyframes[at] if at >= 0 and keyframes[at] > position else position


def read_video(
    source: VideoSource,
    num_frames: int,
    limits: VideoLimits | None = None,
    *,
    label: str | None = None,
) -> tuple[list[Image.Image], VideoInfo]:
    """Decode ``num_frames`` frames sampled uniformly over a video's duration.

    Memory stays bounded: frames stream through the decoder and only the sampled ones are kept.
    A first pass reads the packets (no decoding) to find the keyframes, and the frame count when
    the container does not state it; decoding then seeks past long stretches between samples.
    ``limits.sampling`` chooses between exact segment centres and nearby keyframes
    (``VideoLimits``). Time is bounded by ``limits.max_decode_s`` when set: past it,
    ``DecodeTimeoutError``.
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
            timeline = _read_timeline(container, stream, deadline, limits.max_total_frames)
            total = stream.frames if stream.frames > 0 else timeline.frames
            if total <= 1 or container.format.name.endswith("_pipe"):
                # One picture (a JPEG, a PNG, a one-frame GIF) is not a clip: sampled, it would
                # be 8 copies of one frame, described as if something moved.
                raise StillImageError(f"{name}: is a still image, not a video")
            if total > limits.max_total_frames:
                raise MediaTooLargeError(
                    f"video has {total} frames, over the limit of {limits.max_total_frames}"
                )
        frames, rotation = _read_sampled(
            source, name, num_frames, total, timeline, limits.sampling, deadline
        )
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


@dataclass(frozen=True)
class _Timeline:
    """A video stream's frames as its packets describe them, without decoding."""

    frames: int  # packets that hold a frame
    # Presentation timestamps in presentation order (frame i shows at pts[i]), or empty when
    # some are missing or repeated (raw streams, some AVIs): then frames can only be counted.
    pts: list[int] = field(default_factory=list)
    keyframes: list[int] = field(default_factory=list)  # frames decoding can start from
    keyframe_dts: dict[int, int | None] = field(default_factory=dict)  # by frame index


def _read_timeline(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    deadline: _Deadline,
    max_frames: int,
) -> _Timeline:
    packets: list[tuple[int | None, int | None, bool]] = []  # pts, dts, keyframe
    for packet in container.demux(stream):
        deadline.check()
        # Empty packets flush the decoder; discarded ones (before an edit list's start) decode
        # to frames that are never shown.
        if packet.size == 0 or packet.is_discard:
            continue
        if len(packets) == max_frames:  # stop reading early: this also bounds the list
            raise MediaTooLargeError(f"video has more than the limit of {max_frames} frames")
        packets.append((packet.pts, packet.dts, packet.is_keyframe))
    known = [(pts, dts, key) for pts, dts, key in packets if pts is not None]
    if len(known) < len(packets) or len({pts for pts, _, _ in known}) < len(known):
        return _Timeline(len(packets))
    known.sort()  # decode order -> presentation order
    keyframe_dts = {index: dts for index, (_, dts, key) in enumerate(known) if key}
    return _Timeline(len(known), [pts for pts, _, _ in known], [*keyframe_dts], keyframe_dts)


class _TimestampMismatch(Exception):
    """Decoded frames did not come with the timestamps their packets promised (an AVI's made-up
    ones, in decode order), or a seek did not reach the keyframe asked for."""


def _read_sampled(
    source: VideoSource,
    name: str,
    num_frames: int,
    total: int,
    timeline: _Timeline,
    sampling: Sampling,
    deadline: _Deadline,
) -> tuple[list[Image.Image], int]:
    """The sampled frames, turned upright, and the rotation that was applied: found by seeking
    and by their timestamps, or, when those turn out not to describe the frames, by counting
    frames from the start."""
    if sampling == "fast":
        wanted = snapped_indices(total, num_frames, timeline.keyframes)
    else:
        wanted = sample_indices(total, num_frames)
    try:
        with _open_container(source, name, deadline) as container:
            return _decode_sampled(container, wanted, timeline, deadline)
    except _TimestampMismatch as exc:
        log.debug("%s: %s; decoding from the start instead", name, exc)
    # Decoding from the start, a keyframe costs as much to reach as the centre next to it.
    wanted = sample_indices(total, num_frames)
    with _open_container(source, name, deadline) as container:
        return _decode_sampled(container, wanted, _Timeline(timeline.frames), deadline)


def _decode_sampled(
    container: av.container.InputContainer,
    wanted: list[int],
    timeline: _Timeline,
    deadline: _Deadline,
) -> tuple[list[Image.Image], int]:
    """The frames at the ``wanted`` indices (ascending), turned upright; and the rotation that was
    applied (degrees counter-clockwise). Frames that are not wanted are never converted."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    targets = sorted(set(wanted))
    if timeline.pts:
        found = _seek_and_decode(container, stream, targets, timeline, deadline)
    else:
        found = _decode_from_start(container, stream, targets, deadline)
    picked: dict[int, Image.Image] = {}
    rotation = 0
    for index, frame in found:
        rotation = display_rotation(frame)
        picked[index] = upright(frame.to_image(), rotation)
    if not picked:
        return [], 0
    # A stream can hold fewer frames than its header or packet count says: reuse the last one.
    frames: list[Image.Image] = []
    for i in wanted:
        frames.append(picked.get(i, frames[-1] if frames else picked[min(picked)]))
    return frames, rotation


def _decode_from_start(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    targets: list[int],
    deadline: _Deadline,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """The frames at ``targets`` (ascending), found by counting decoded frames from the start,
    which needs no timestamps; decoding stops after the last one."""
    wanted = set(targets)
    decoded = 0
    try:
        for packet in container.demux(stream):
            deadline.check()
            for frame in packet.decode():
                if decoded in wanted:
                    yield decoded, frame
                decoded += 1
                if decoded > targets[-1]:
                    return
    finally:
        log.debug("%d frames sampled: %d decoded in 1 runs", len(targets), decoded)


def _seek_and_decode(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    targets: list[int],
    timeline: _Timeline,
    deadline: _Deadline,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """The frames at ``targets`` (ascending), found by their pts: decoding runs forward and
    seeks to a target's keyframe when that lies ahead (``_decode_runs``). Raises
    ``_TimestampMismatch`` when the decoded frames are not the ones the timeline promised."""
    index_of = {pts: index for index, pts in enumerate(timeline.pts)}
    runs = _decode_runs(targets, timeline.keyframes)
    decoded, position = 0, 0
    try:
        for start, run in runs:
            if start is None:
                packets = container.demux(stream)
            else:
                packets = _packets_from_keyframe(container, stream, timeline, start, position)
            position, wanted = run[-1] + 1, set(run)
            for index, frame in _run_frames(
                packets, stream, index_of, start or 0, run[-1], deadline
            ):
                decoded += 1
                if index in wanted:
                    yield index, frame
                if index == run[-1]:
                    break
    finally:
        log.debug("%d frames sampled: %d decoded in %d runs", len(targets), decoded, len(runs))


def _decode_runs(targets: list[int], keyframes: list[int]) -> list[tuple[int | None, list[int]]]:
    """``targets`` (ascending frame indices) grouped into runs of forward decoding: each starts
    with a seek to the given keyframe (None: no seek, go on from where decoding is) and decodes
    up to its last target."""
    runs: list[tuple[int | None, list[int]]] = []
    position = 0
    for target in targets:
        start = _decode_start(target, position, keyframes)
        if start > position:
            runs.append((start, [target]))
        elif runs:
            runs[-1][1].append(target)
        else:
            runs.append((None, [target]))
        position = target + 1
    return runs


def _packets_from_keyframe(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    timeline: _Timeline,
    key: int,
    position: int,
) -> Iterator[av.Packet]:
    """The stream's packets after a seek to keyframe ``key``, from it or from a keyframe between
    it and ``position``, where decoding would otherwise have gone on: else a seek saves nothing.

    MP4 and Matroska seek to a keyframe by its pts; MPEG-TS seeks by decode timestamps and
    lands after it, so then the seek is repeated with its dts.
    """
    lowest, highest = timeline.pts[position], timeline.pts[key]
    for stamp in dict.fromkeys([highest, timeline.keyframe_dts[key]]):
        if stamp is None:
            continue
        container.seek(stamp, stream=stream, backward=True)
        packets = container.demux(stream)
        first = next(packets, None)
        if first and first.is_keyframe and first.pts is not None and lowest <= first.pts <= highest:
            return itertools.chain([first], packets)
    raise _TimestampMismatch(f"a seek did not reach the keyframe at pts {highest}")


def _run_frames(
    packets: Iterator[av.Packet],
    stream: av.video.VideoStream,
    index_of: dict[int, int],
    first: int,
    last: int,
    deadline: _Deadline,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Frames ``first`` to ``last`` in order, with their index, decoded from ``packets``, which
    start at frame ``first`` (a keyframe, or the stream's start) or at a keyframe before it.
    The deadline is checked before each packet.

    The decoder is drained as soon as the packets of frames first to last have all been sent:
    a threaded decoder holds a few frames back and would decode as many more packets before
    giving them up, which is most of the work when a run is one keyframe after a seek.
    """
    unsent = last - first + 1  # in decode order, a B-frame comes after the later frames it uses
    expected = first
    for packet in packets:
        deadline.check()
        frames = packet.decode()
        sent = None if packet.pts is None else index_of.get(packet.pts)
        if sent is not None and first <= sent <= last:
            unsent -= 1
            if unsent == 0:  # drain: a seek or the end comes next
                frames += stream.codec_context.decode(None)
        for frame in frames:
            index = None if frame.pts is None else index_of.get(frame.pts)
            if index is not None and index < first and expected == first:
                continue  # from an earlier keyframe, or an open GOP's leading frames
            if index != expected:
                raise _TimestampMismatch(f"frame {expected} was expected, frame {index} came")
            yield expected, frame
            expected += 1
        if unsent == 0:
            return


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
