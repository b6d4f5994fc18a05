"""A corpus of mutated real media through the app: the sample images and clips, truncated,
bit-flipped, spliced and overwritten by a seeded generator. Every answer must be a 200 or a
documented 4xx in the one error shape; none may be a 5xx.

The same 300 cases every run (seed below): about a minute on 2 busy cores.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from app.errors import ERROR_TYPES
from tests.app_support import tiny_client
from tests.conftest import make_video

SAMPLES = Path(__file__).resolve().parents[1] / "captioner" / "assets" / "samples"
SEED = 11
MiB = 1024 * 1024


def real_images() -> list[bytes]:
    pngs = [SAMPLES / "scene.png", *sorted((SAMPLES / "frames").glob("*.png"))]
    images = [path.read_bytes() for path in pngs]
    scene = Image.open(pngs[0]).convert("RGB")
    for fmt, size in (("JPEG", 160), ("GIF", 96), ("WEBP", 128), ("BMP", 64), ("TIFF", 64)):
        buffer = io.BytesIO()
        scene.resize((size, size)).save(buffer, format=fmt)
        images.append(buffer.getvalue())
    return images


def real_videos(folder: Path) -> list[bytes]:
    clips = [(SAMPLES / "motion.mp4").read_bytes()]
    for name, codec in (("clip.webm", "libvpx-vp9"), ("clip.avi", "mjpeg"), ("clip.gif", "gif")):
        clips.append(make_video(folder / name, codec, num_frames=12).read_bytes())
    return clips


def mutate(data: bytes, other: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of ``data`` (``other`` is a second file to splice in), and its name."""
    kind = rng.choice(["truncate", "flip", "splice", "overwrite", "repeat"])
    buffer = bytearray(data)
    if kind == "truncate":
        buffer = buffer[: rng.randrange(len(buffer))]
    elif kind == "flip":
        for _ in range(rng.choice([1, 2, 8, 64])):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif kind == "splice":
        buffer = buffer[: rng.randrange(len(buffer))] + other[rng.randrange(len(other)) :]
    elif kind == "overwrite":
        at, size = rng.randrange(len(buffer)), rng.choice([4, 64, 1024])
        buffer[at : at + size] = rng.randbytes(size)
    else:
        at, size = rng.randrange(len(buffer)), rng.choice([16, 512])
        buffer[at:at] = buffer[at : at + size] * rng.randint(2, 50)
    return kind, bytes(buffer)


def check(response, seen: Counter) -> None:
    seen[response.status_code] += 1
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        return
    error = response.json()["error"]
    assert error["type"] in ERROR_TYPES and 400 <= response.status_code < 500, error
    assert ERROR_TYPES[error["type"]].status == response.status_code, error
    assert "Traceback" not in response.text


@pytest.mark.slow
def test_mutated_real_media_is_answered_200_or_a_documented_4xx(tiny_checkpoint, tmp_path) -> None:
    rng = random.Random(SEED)
    images, videos = real_images(), real_videos(tmp_path)
    seen: Counter[int] = Counter()
    by_kind: Counter[str] = Counter()
    limits = {"max_image_bytes": MiB, "max_video_bytes": 4 * MiB, "max_decode_s": 10}
    with tiny_client(tiny_checkpoint, **limits) as client:
        for _ in range(180):  # images
            kind, data = mutate(rng.choice(images), rng.choice(images), rng)
            by_kind[kind] += 1
            response = client.post(
                "/v1/captions/image", content=data, headers={"Content-Type": "image/png"}
            )
            check(response, seen)
        for _ in range(80):  # video files
            kind, data = mutate(rng.choice(videos), rng.choice(videos + images), rng)
            by_kind[kind] += 1
            response = client.post(
                "/v1/captions/video?num_frames=4",
                content=data,
                headers={"Content-Type": "video/mp4"},
            )
            check(response, seen)
        for _ in range(40):  # frame lists: some frames mutated, some intact
            frames = []
            for index in range(rng.randint(2, 6)):
                frame = rng.choice(images)
                if rng.random() < 0.5:
                    kind, frame = mutate(frame, rng.choice(images), rng)
                    by_kind[kind] += 1
                frames.append(("frames", (f"{index}.png", frame, "image/png")))
            check(client.post("/v1/captions/video", files=frames), seen)
    print(f"\nmutated media: {seen.total()} requests, statuses {dict(seen)}, {dict(by_kind)}")
    assert seen.total() == 300
    assert seen[200] > 0 and sum(n for status, n in seen.items() if status >= 400) > 0
