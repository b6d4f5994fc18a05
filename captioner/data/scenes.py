"""The scenes corpus: a deterministic synthetic captioning dataset of coloured shapes.

Images hold one to three shapes on a muted background; clips show one shape moving (left,
right, up, down) or changing size (grow, shrink), sometimes beside a static one. Every item
carries five captions and its ground truth (``meta``), and :func:`score_caption` checks any
caption, a model's included, against that ground truth. The same seed always writes the same
images, captions and ground truth, so a corpus can be regenerated instead of shipped; the clip
files are nearly the same, since libx264 encodes a few clips differently from one process to
the next (see :func:`write_video`).

The caption grammar and the caption parser live in :mod:`captioner.data.scenes_grammar` and
are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

from captioner.data.scenes_grammar import (
    BACKGROUNDS,
    COLOURS,
    LEFT_TO_RIGHT,
    MOTIONS,
    RELATIONS,
    SHAPES,
    ParsedCaption,
    clip_captions,
    image_captions,
    parse_caption,
    score_caption,
)
from captioner.errors import ConfigError

logger = logging.getLogger(__name__)

# Clearly distinct hues, all far from the gray backgrounds (see _background).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 195),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
}
assert tuple(PALETTE) == COLOURS
SCENE_TYPES = {"one_object": 1, "two_objects": 2, "three_objects": 3}
SCENE_WEIGHTS = (0.35, 0.40, 0.25)
FPS = 8
FRAME_RANGE = (8, 16)  # frames per clip, inclusive
MIN_IMAGE_SIZE = 32

# Object extent: the longer side of the box a shape spans (unrotated), as a fraction of the image.
_EXTENT = {"small": (0.22, 0.28), "large": (0.36, 0.44)}
_LARGE_FROM = 0.32  # a clip object this big or bigger is "large"
_MAX_ROTATION = 12.0  # degrees; more would turn a square into a diamond
_COLOUR_JITTER = 10  # per channel
_MAX_HIDDEN = 0.2  # the most of an object that others may cover
_MARGIN = 0.01  # kept clear between every object and the border
_MIN_GAP_TWO = 0.22  # centres of two objects, along the axis of their relation
_MIN_GAP_THREE = 0.18  # consecutive centres of three objects, left to right
_TRAVEL = (0.40, 0.50)  # distance a sliding object covers
_SLIDER_EXTENT = (0.22, 0.30)
_GROWER_EXTENT = (0.22, 0.25)  # the smaller end of a growing or shrinking object
_SCALE = (1.9, 2.1)
_MAX_ATTEMPTS = 200
_VIDEO_CRF = 18


def _regular(vertices: int, radius: float, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(vertices) / vertices)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


# Unit outlines, y down: each spans 2 along its longer side, so an object's extent is its size.
_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(64, 1.0, 0.0),
    "square": np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]),
    "triangle": np.array([[0.0, -0.866], [1.0, 0.866], [-1.0, 0.866]]),
    "star": _star(5, 1.0 / math.cos(math.radians(18)), 0.5) + np.array([0.0, 0.1]),  # centred
    "hexagon": _regular(6, 1.0, 0.0),
    "diamond": np.array([[0.0, -1.0], [0.78, 0.0], [0.0, 1.0], [-0.78, 0.0]]),
}
assert tuple(_OUTLINES) == SHAPES


def _rotated(outline: np.ndarray, degrees: float) -> np.ndarray:
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    return outline @ np.array([[cos, sin], [-sin, cos]])


def _reach(outline: np.ndarray) -> float:
    """How far a unit outline reaches from its centre along x or y, at any allowed rotation."""
    angles = np.linspace(-_MAX_ROTATION, _MAX_ROTATION, 25)
    return max(float(np.abs(_rotated(outline, float(angle))).max()) for angle in angles)


_REACH = {name: _reach(outline) for name, outline in _OUTLINES.items()}


@dataclass(frozen=True)
class _Placed:
    """One shape where it is drawn: centre and extent as fractions of the image side."""

    shape: str
    x: float
    y: float
    extent: float
    angle: float

    def outline(self, side: int) -> list[tuple[float, float]]:
        """The polygon in pixels of a ``side`` x ``side`` canvas."""
        points = _rotated(_OUTLINES[self.shape], self.angle) * (self.extent * side / 2)
        points += (self.x * side, self.y * side)
        return [(float(x), float(y)) for x, y in points]

    def inside(self, side: int) -> bool:
        points = np.array(self.outline(side))
        return bool(points.min() >= _MARGIN * side and points.max() <= (1 - _MARGIN) * side)


def _half(shape: str, extent: float) -> float:
    """How far a centre must stay from the border for the shape to fit (fraction of the side)."""
    return extent / 2 * _REACH[shape] + _MARGIN


def _masks(shapes: Sequence[_Placed], side: int) -> list[np.ndarray]:
    masks = []
    for placed in shapes:
        canvas = Image.new("L", (side, side))
        ImageDraw.Draw(canvas).polygon(placed.outline(side), fill=255)
        masks.append(np.asarray(canvas) > 0)
    return masks


def _well_visible(shapes: Sequence[_Placed], order: Sequence[int], side: int) -> bool:
    """Whether each shape is inside the image and at most _MAX_HIDDEN covered by later ones."""
    if not all(placed.inside(side) for placed in shapes):
        return False
    masks = _masks([shapes[i] for i in order], side)
    covering = np.zeros((side, side), dtype=bool)
    for mask in reversed(masks):
        if (mask & covering).sum() > _MAX_HIDDEN * mask.sum():
            return False
        covering |= mask
    return True


def _spaced(
    rng: np.random.Generator, count: int, gap: float, low: float, high: float
) -> list[float]:
    """``count`` increasing values in [low, high], consecutive ones at least ``gap`` apart."""
    values = np.sort(rng.uniform(low, high - (count - 1) * gap, size=count))
    return (values + gap * np.arange(count)).tolist()


def _jittered(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    r, g, b = np.clip(np.array(PALETTE[colour]) + jitter, 0, 255).tolist()
    return r, g, b


def _background(rng: np.random.Generator, kind: str, side: int) -> np.ndarray:
    """A muted, grayish (side, side, 3) uint8 background of the given kind."""
    level = rng.uniform(75.0, 150.0)
    tint = rng.uniform(-6.0, 6.0, size=3)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == "plain":
        gray = np.full((side, side), level, dtype=np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0.0, 2 * math.pi)
        ramp = (xs - 0.5) * math.cos(theta) + (ys - 0.5) * math.sin(theta)  # in [-0.71, 0.71]
        gray = level + rng.uniform(40.0, 70.0) * ramp
    elif kind == "noise":
        gray = level + rng.normal(0.0, 12.0, size=(side, side)).astype(np.float32)
    elif kind == "texture":
        gray = np.full((side, side), level, dtype=np.float32)
        for _ in range(2):
            theta = rng.uniform(0.0, math.pi)
            waves = side / rng.uniform(6.0, 16.0)  # periods of 6-16 px at 224 px, and alike
            phase = rng.uniform(0.0, 2 * math.pi)
            along = xs * math.cos(theta) + ys * math.sin(theta)
            gray += rng.uniform(7.0, 11.0) * np.sin(2 * math.pi * waves * along + phase)
    else:
        raise ConfigError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    pixels = gray[:, :, None] + tint.astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _canvas(background: np.ndarray) -> Image.Image:
    """A 2x canvas to draw on: drawing at twice the size and halving anti-aliases the edges."""
    side = background.shape[0]
    return Image.fromarray(background).resize((2 * side, 2 * side), Image.Resampling.NEAREST)


def _draw(canvas: Image.Image, placed: _Placed, rgb: tuple[int, int, int]) -> None:
    ImageDraw.Draw(canvas).polygon(placed.outline(canvas.width), fill=rgb)


def _object_meta(colour: str, placed: _Placed, size: str) -> dict[str, Any]:
    return {
        "shape": placed.shape,
        "colour": colour,
        "size": size,
        "extent": round(placed.extent, 4),
        "x": round(placed.x, 4),
        "y": round(placed.y, 4),
    }


def _image_layout(
    rng: np.random.Generator, shapes: Sequence[str], side: int
) -> tuple[list[_Placed], list[str], str | None, list[int]]:
    """Places 1-3 shapes: (placements, size classes, relation, drawing order).

    Two shapes stand in a clear relation (objects[0] relative to objects[1]); three stand
    clearly left to right in list order. Shapes may overlap a little, never hiding much.
    """
    count = len(shapes)
    for attempt in range(_MAX_ATTEMPTS):
        large_p = 0.5 if attempt < _MAX_ATTEMPTS // 2 else 0.0  # crowded: fall back to small
        sizes = ["large" if rng.random() < large_p else "small" for _ in shapes]
        extents = [rng.uniform(*_EXTENT[size]) for size in sizes]
        angles = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, size=count)
        halves = [_half(shape, extent) for shape, extent in zip(shapes, extents, strict=True)]
        low, high = max(halves), 1 - max(halves)
        relation: str | None = None
        if count == 1:
            xs, ys = [rng.uniform(low, high)], [rng.uniform(low, high)]
        elif count == 2:
            # Far apart along the relation's axis, and offset across it by at most half that.
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            near, far = _spaced(rng, 2, _MIN_GAP_TWO, low, high)
            across = rng.uniform(low, high)
            across_both = [across, across + rng.uniform(-0.5, 0.5) * (far - near)]
            along_both = [near, far] if relation in ("left of", "above") else [far, near]
            horizontal = relation in ("left of", "right of")
            xs, ys = (along_both, across_both) if horizontal else (across_both, along_both)
        else:
            relation = LEFT_TO_RIGHT
            xs = _spaced(rng, 3, _MIN_GAP_THREE, low, high)
            ys = [rng.uniform(half, 1 - half) for half in halves]
        placed = [
            _Placed(shape, float(x), float(y), float(extent), float(angle))
            for shape, x, y, extent, angle in zip(shapes, xs, ys, extents, angles, strict=True)
        ]
        order = [int(i) for i in rng.permutation(count)]
        if _well_visible(placed, order, side):
            return placed, sizes, relation, order
    raise RuntimeError(f"could not lay out {count} shapes in {_MAX_ATTEMPTS} attempts")


def render_scene(
    rng: np.random.Generator, image_size: int = 224
) -> tuple[Image.Image, dict[str, Any]]:
    """Draws one random image scene: the RGB image and its ground truth (``meta``).

    ``meta`` holds the scene type, the objects (shape, colour, size class, extent, centre
    x/y as fractions of the image side), the relation between them and the background kind.
    """
    scene = str(rng.choice(list(SCENE_TYPES), p=SCENE_WEIGHTS))
    count = SCENE_TYPES[scene]
    colours = [COLOURS[int(i)] for i in rng.choice(len(COLOURS), size=count, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=count)]
    rgbs = [_jittered(colour, rng) for colour in colours]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    placed, sizes, relation, order = _image_layout(rng, shapes, image_size)
    canvas = _canvas(_background(rng, background, image_size))
    for i in order:
        _draw(canvas, placed[i], rgbs[i])
    meta = {
        "scene": scene,
        "objects": [_object_meta(c, p, s) for c, p, s in zip(colours, placed, sizes, strict=True)],
        "relation": relation,
        "background": background,
    }
    return canvas.reduce(2), meta


def _clip_layout(
    rng: np.random.Generator, kind: str, shapes: Sequence[str], num_frames: int, side: int
) -> tuple[list[_Placed], _Placed | None]:
    """The moving shape in every frame, and the static shape (if two shapes) off its path."""
    for _ in range(_MAX_ATTEMPTS):
        angle = float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
        if kind in ("grow", "shrink"):
            small = rng.uniform(*_GROWER_EXTENT)
            large = small * rng.uniform(*_SCALE)
            half = _half(shapes[0], large)
            start_x = end_x = rng.uniform(half, 1 - half)
            start_y = end_y = rng.uniform(half, 1 - half)
            start_extent, end_extent = (small, large) if kind == "grow" else (large, small)
        else:
            start_extent = end_extent = rng.uniform(*_SLIDER_EXTENT)
            half = _half(shapes[0], start_extent)
            travel = rng.uniform(*_TRAVEL)
            low = rng.uniform(half, 1 - half - travel)
            start, end = (low, low + travel) if kind in ("right", "down") else (low + travel, low)
            across = rng.uniform(half, 1 - half)
            if kind in ("left", "right"):
                (start_x, end_x), (start_y, end_y) = (start, end), (across, across)
            else:
                (start_x, end_x), (start_y, end_y) = (across, across), (start, end)
        path = [
            _Placed(
                shapes[0],
                float(start_x + t * (end_x - start_x)),
                float(start_y + t * (end_y - start_y)),
                float(start_extent + t * (end_extent - start_extent)),
                angle,
            )
            for t in np.linspace(0.0, 1.0, num_frames)
        ]
        if not (path[0].inside(side) and path[-1].inside(side)):
            continue
        if len(shapes) == 1:
            return path, None
        swept = Image.new("L", (side, side))
        for placed in path:
            ImageDraw.Draw(swept).polygon(placed.outline(side), fill=255)
        swept_mask = np.asarray(swept) > 0
        for _ in range(_MAX_ATTEMPTS // 10):
            extent = rng.uniform(*_EXTENT["small"])
            half = _half(shapes[1], extent)
            other = _Placed(
                shapes[1],
                float(rng.uniform(half, 1 - half)),
                float(rng.uniform(half, 1 - half)),
                float(extent),
                float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)),
            )
            (mask,) = _masks([other], side)
            if other.inside(side) and not (mask & swept_mask).any():
                return path, other
    raise RuntimeError(f"could not lay out a {kind!r} clip in {_MAX_ATTEMPTS} attempts")


def render_clip(
    rng: np.random.Generator, image_size: int = 224
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Draws one random motion clip: its RGB frames, (H, W, 3) uint8, and its ground truth.

    ``meta`` holds the objects as in the first frame (the moving one first), the motion
    (``object`` indexes ``objects``; ``kind``; ``end``: where the moving object is in the last
    frame), the number of frames and the background kind.
    """
    kind = MOTIONS[int(rng.integers(len(MOTIONS)))]
    num_frames = int(rng.integers(FRAME_RANGE[0], FRAME_RANGE[1] + 1))
    count = 2 if rng.random() < 0.5 else 1
    colours = [COLOURS[int(i)] for i in rng.choice(len(COLOURS), size=count, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=count)]
    rgbs = [_jittered(colour, rng) for colour in colours]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    path, other = _clip_layout(rng, kind, shapes, num_frames, image_size)
    backdrop = _canvas(_background(rng, background, image_size))
    if other is not None:
        _draw(backdrop, other, rgbs[1])
    frames = []
    for placed in path:
        canvas = backdrop.copy()
        _draw(canvas, placed, rgbs[0])
        frames.append(np.asarray(canvas.reduce(2)))
    placed_objects = [path[0]] if other is None else [path[0], other]
    end = path[-1]
    meta = {
        "scene": "motion",
        "objects": [
            _object_meta(colour, placed, "large" if placed.extent >= _LARGE_FROM else "small")
            for colour, placed in zip(colours, placed_objects, strict=True)
        ],
        "motion": {
            "object": 0,
            "kind": kind,
            "end": {"x": round(end.x, 4), "y": round(end.y, 4), "extent": round(end.extent, 4)},
        },
        "num_frames": num_frames,
        "background": background,
    }
    return frames, meta


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = FPS) -> None:
    """Writes RGB frames (even width and height) as an mp4: H.264 if available, else MPEG-4."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4") as container:
        if "libx264" in av.codecs_available:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            # Single-threaded x264, set in its own parameters (clips this small gain nothing from
            # threads). Even so, libx264's output for a few clips depends on the state of the
            # process that encodes them (measured: 32 of 2,000 clips differed between two
            # generations of the same corpus; images and captions never did), so clip bytes,
            # and the features and model trained on them, are not exactly reproducible.
            stream.options = {
                "crf": str(_VIDEO_CRF),
                "preset": "medium",
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:sync-lookahead=0",
            }
        else:
            stream = container.add_stream("mpeg4", rate=Fraction(fps))
            stream.bit_rate = 4_000_000
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_image(rng: np.random.Generator, image_size: int, path: Path) -> tuple[dict, list[str]]:
    image, meta = render_scene(rng, image_size)
    image.save(path, format="PNG")
    return meta, image_captions(meta, rng)


def _write_clip(rng: np.random.Generator, image_size: int, path: Path) -> tuple[dict, list[str]]:
    frames, meta = render_clip(rng, image_size)
    write_video(path, frames)
    return meta, clip_captions(meta, rng)


@dataclass(frozen=True)
class _ItemKind:
    """How one kind of item is named, stored, seeded and written."""

    kind: str  # the manifest's "kind"
    prefix: str  # of ids: img-000000
    folder: str
    suffix: str
    # Random streams: an item draws from (seed, stream, index), the split from (seed, split_stream).
    stream: int
    split_stream: int
    write: Callable[[np.random.Generator, int, Path], tuple[dict, list[str]]]


_ITEM_KINDS = (
    _ItemKind("image", "img", "images", ".png", 11, 13, _write_image),
    _ItemKind("video", "vid", "videos", ".mp4", 12, 14, _write_clip),
)


def _splits(count: int, seed: int, stream: int, val: float, test: float) -> list[str]:
    """A split per item: exactly round(count * fraction) val and test items, at random."""
    num_val, num_test = round(count * val), round(count * test)
    splits = ["train"] * count
    order = np.random.default_rng([seed, stream]).permutation(count)
    for rank, index in enumerate(order[: num_val + num_test]):
        splits[int(index)] = "val" if rank < num_val else "test"
    return splits


def _check_arguments(
    num_images: int, num_videos: int, seed: int, image_size: int, val: float, test: float
) -> None:
    if num_images < 0 or num_videos < 0:
        raise ConfigError(f"item counts must be >= 0, got {num_images} images, {num_videos} videos")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if image_size < MIN_IMAGE_SIZE or image_size % 2:
        raise ConfigError(
            f"image_size must be an even number >= {MIN_IMAGE_SIZE} (H.264 needs even sides),"
            f" got {image_size}"
        )
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(
            f"val_fraction and test_fraction must be in [0, 1) and sum to less than 1,"
            f" got {val} and {test}"
        )


class _Progress:
    """Logs how far generation is, about every tenth of the way, when asked to."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.every = max(1, total // 10)
        self.started = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled and (self.done % self.every == 0 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            logger.info("scenes: %d/%d items (%.1f items/s)", self.done, self.total, rate)


def generate_corpus(
    out_dir: Path,
    num_images: int,
    num_videos: int,
    seed: int,
    *,
    image_size: int = 224,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = False,
) -> Path:
    """Writes a scenes corpus: out_dir/images/*.png, out_dir/videos/*.mp4, out_dir/manifest.jsonl.

    Returns the manifest's path. Each manifest line is one item: id, path (relative to the
    manifest's folder), kind ("image" or "video"), five distinct captions, split and meta (the
    ground truth that :func:`score_caption` scores captions against). The same arguments
    always write the same files. An item's content does not depend on how many items are
    generated; the splits do (each holds exactly round(n * fraction) items of each kind).
    """
    _check_arguments(num_images, num_videos, seed, image_size, val_fraction, test_fraction)
    out_dir = Path(out_dir)
    tracker = _Progress(num_images + num_videos, progress)
    records: list[dict[str, Any]] = []
    for item_kind, count in zip(_ITEM_KINDS, (num_images, num_videos), strict=True):
        (out_dir / item_kind.folder).mkdir(parents=True, exist_ok=True)
        splits = _splits(count, seed, item_kind.split_stream, val_fraction, test_fraction)
        for index, split in enumerate(splits):
            item_id = f"{item_kind.prefix}-{index:06d}"
            path = f"{item_kind.folder}/{item_id}{item_kind.suffix}"
            rng = np.random.default_rng([seed, item_kind.stream, index])
            meta, captions = item_kind.write(rng, image_size, out_dir / path)
            records.append(
                {
                    "id": item_id,
                    "path": path,
                    "kind": item_kind.kind,
                    "captions": captions,
                    "split": split,
                    "meta": meta,
                }
            )
            tracker.step()
    manifest = out_dir / "manifest.jsonl"
    partial = manifest.with_name(manifest.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    partial.replace(manifest)
    logger.info("scenes: wrote %d images and %d clips to %s", num_images, num_videos, out_dir)
    return manifest


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "FPS",
    "MOTIONS",
    "PALETTE",
    "RELATIONS",
    "SCENE_TYPES",
    "SHAPES",
    "ParsedCaption",
    "clip_captions",
    "generate_corpus",
    "image_captions",
    "parse_caption",
    "render_clip",
    "render_scene",
    "score_caption",
    "write_video",
]
