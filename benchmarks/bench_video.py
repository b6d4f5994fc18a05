"""Seconds to describe a 720p H.264 clip, against decoding every frame and then sampling.

Clips of 10 s and 60 s (1280x720, 30 fps, libx264, a panning noisy texture and a moving disc)
are made on the first run (1-2 minutes on 2 cores) into a cache folder
($CAPTIONER_CACHE_DIR/bench_video, else ~/.cache/captioner/bench_video), never into the
repository: at x264's default keyframe interval (up to 250 frames) and at a phone-like 1 s
(keyint=30). Each is timed, best of a few runs (on a shared machine the least disturbed run is
the closest to the cost):

- describe: ``Captioner.load()`` (the shipped default model) then ``caption_video(path)``,
  which reads the sampled frames, preprocesses and captions them; with ``sampling="fast"`` (the
  default) and ``"exact"`` (``VideoLimits``);
- read: the same sampled frames with ``read_video`` alone, without the model;
- decode all, the baseline: every frame decoded by PyAV (``for frame in
  container.decode(video=0)``), with its default decoder settings and with
  ``thread_type="AUTO"``; the sampled frames are kept as decoded and converted to RGB images
  at the end.

Speed-ups are baseline / ours. Prints a JSON object and writes it to benchmarks/results/
(a measurement, not a test). Once the clips are made, ``--quick`` takes under 2 minutes here:

    python -m benchmarks.bench_video [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch

from captioner.inference import Captioner
from captioner.media import VideoLimits, read_video, sample_indices
from captioner.onnx_encoder import CACHE_ENV

SIZE = (1280, 720)
FPS = 30
DURATIONS_S = (10, 60)
KEYFRAME_INTERVALS = {"x264_default": None, "1s": FPS}  # None: x264 chooses (up to 250)
SAMPLINGS = ("fast", "exact")
BASELINES = {"default": None, "auto": "AUTO"}  # PyAV's decoder threading: as it comes, and AUTO
CLIP_VERSION = 2  # bump when the clips' content or encoding changes, to remake cached ones


def moving_frames(seconds: int) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) of a blocky random texture panning left under film grain, with a
    bright disc moving across: motion and detail everywhere, so that the encoder cannot make
    the frames trivially cheap to decode, as a real camera's would not be."""
    width, height = SIZE
    count = seconds * FPS
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 128, (height // 8, (width + 2 * count) // 8 + 1, 3), np.uint8)
    texture = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)  # pans 2 pixels a frame
    grain = rng.integers(0, 24, (4, height, width, 3), np.uint8)
    radius = 80
    disc = ((np.mgrid[-radius:radius, -radius:radius] ** 2).sum(0) < radius**2).astype(np.uint8)
    disc = disc[..., None] * 100
    frame = np.empty((height, width, 3), np.uint8)
    for i in range(count):
        np.add(texture[:, 2 * i : 2 * i + width], grain[i % len(grain)], out=frame)
        x = int(width / 2 + (width / 2 - radius) * np.sin(i / 25))
        y = int(height / 2 + (height / 2 - radius) * np.cos(i / 31))
        frame[y - radius : y + radius, x - radius : x + radius] += disc
        yield frame


def make_clip(path: Path, seconds: int, keyint: int | None) -> None:
    """Encode a clip with libx264. Preset veryfast (B-frames and x264's keyframe placement
    kept) so that making the 60 s clips takes about a minute, not several."""
    options = {"preset": "veryfast"} | ({"x264-params": f"keyint={keyint}"} if keyint else {})
    unfinished = path.with_suffix(".partial.mp4")
    with av.open(str(unfinished), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS, options=options)
        # x264's own threading, one slice per frame, as the x264 and ffmpeg command lines make
        # them (PyAV's default, slice threads, would cut frames into slices that decode apart).
        stream.thread_type = "FRAME"
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for pixels in moving_frames(seconds):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    unfinished.rename(path)  # an interrupted run leaves no half-written clip to be reused


def cached_clip(seconds: int, keyint: int | None) -> Path:
    """The clip's path in the cache folder, made first if it is not there."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "captioner")
    folder = root / "bench_video"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"v{CLIP_VERSION}_{seconds}s_keyint-{keyint or 'default'}.mp4"
    if not path.is_file():
        started = time.perf_counter()
        make_clip(path, seconds, keyint)
        print(f"made {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def decode_all_then_sample(path: Path, num_frames: int, thread_type: str | None) -> list:
    """The baseline: decode every frame, then take the sampled ones and convert them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if thread_type is not None:
            stream.thread_type = thread_type
        wanted = set(sample_indices(stream.frames, num_frames))
        # Decoded frames are kept only when sampled: all 1,800 of a 60 s 720p clip would be
        # 2.5 GB, and which ones are kept does not change the decoding work.
        kept = [f for i, f in enumerate(container.decode(video=0)) if i in wanted]
    return [frame.to_image() for frame in kept]


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(
    captioner: Captioner, path: Path, num_frames: int, repeats: int, baseline_repeats: int
) -> dict:
    """One clip's row: seconds for each way of reading it, the speed-ups, and the captions."""
    seconds: dict[str, float] = {}
    captions: dict[str, str] = {}
    for sampling in SAMPLINGS:
        limits = VideoLimits(sampling=sampling)
        describe = partial(captioner.caption_video, path, limits=limits)
        # The first call is untimed: it warms the model, the decoder and the file cache.
        captions[sampling] = describe().captions[0].text
        seconds[f"describe_{sampling}"] = best_seconds(describe, repeats)
        # The frames alone, without the model: what the sampling itself costs.
        read = partial(read_video, path, num_frames, limits)
        seconds[f"read_{sampling}"] = best_seconds(read, repeats)
    for name, thread_type in BASELINES.items():
        decode_all = partial(decode_all_then_sample, path, num_frames, thread_type)
        seconds[f"decode_all_{name}"] = best_seconds(decode_all, baseline_repeats)
    ours = [key for key in seconds if not key.startswith("decode_all")]
    return {
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
        **{
            f"speedup_vs_decode_all_{name}": {
                key: round(seconds[f"decode_all_{name}"] / seconds[key], 2) for key in ours
            }
            for name in BASELINES
        },
        "captions": captions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 timed runs each (decode all: 1) instead of 5 (3)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/video_cpu.json"))
    args = parser.parse_args()
    # Decoding a whole 60 s clip takes seconds, long enough that one run varies little.
    repeats, baseline_repeats = (2, 1) if args.quick else (5, 3)
    threads = torch.get_num_threads()  # before loading, which gives PyTorch half (inference.py)
    captioner = Captioner.load()
    num_frames = captioner.checkpoint.preprocess.num_frames
    rows = {}
    for interval, keyint in KEYFRAME_INTERVALS.items():
        for seconds in DURATIONS_S:
            clip = f"{seconds}s_keyint_{interval}"
            path = cached_clip(seconds, keyint)
            rows[clip] = measure(captioner, path, num_frames, repeats, baseline_repeats)
            print(clip, rows[clip], flush=True)
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs (shared), {threads} threads "
        f"({torch.get_num_threads()} for PyTorch's decoder), CPU only",
        "pyav": av.__version__,
        "clip": f"{SIZE[0]}x{SIZE[1]} {FPS} fps H.264 (libx264 veryfast), {num_frames} sampled",
        "repeats": {"ours": repeats, "decode_all": baseline_repeats},
        "results": rows,
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
