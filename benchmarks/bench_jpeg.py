"""JPEG decoding for the model's input: PIL at full size, captioner's draft decoding, and
(on a GPU) ``torchvision.io.decode_jpeg(device="cuda")``.

For the corpora of benchmarks/bench_http.py (640x480 and 4000x3000 photos) it reports
milliseconds per image from the bytes to the model's input tensor:
- ``pil_full``: decode at full size, then resize and crop (what the baseline server does);
- ``captioner``: ``Captioner.prepare_image``, which lets libjpeg decode large JPEGs at 1/2 to
  1/8 scale first (captioner/media.py), as the server does;
- ``cuda_batch_N`` (only with a GPU): a batch of N decoded on the GPU by nvJPEG, then resized
  there; the bytes-to-tensor time per image, the copy to the GPU included.

A measurement, not a test: prints JSON and writes it to --out.

    python -m benchmarks.bench_jpeg [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from benchmarks.bench_http import SIZES, corpus
from benchmarks.reporting import machine, write_report
from captioner.inference import Captioner


def ms_per_image(work: Callable[[], object], images: int, repeats: int) -> float:
    """The best of ``repeats`` timed calls, per image."""
    work()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return round(best / images * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--out", type=Path, default=None, help="default: results/jpeg_<dev>")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    captioner = Captioner.load(device="cpu")
    size = captioner.checkpoint.preprocess.image_size
    results: dict[str, dict[str, float]] = {}
    for name, dimensions in SIZES.items():
        jpegs = corpus(dimensions)

        def pil_full(jpegs: list[bytes] = jpegs) -> None:
            for data in jpegs:
                image = Image.open(io.BytesIO(data)).convert("RGB")
                captioner.media.preprocess(image)  # resize, crop, normalise

        def draft(jpegs: list[bytes] = jpegs) -> None:
            for data in jpegs:
                captioner.prepare_image(data)

        row = {
            "pil_full_ms": ms_per_image(pil_full, len(jpegs), repeats),
            "captioner_ms": ms_per_image(draft, len(jpegs), repeats),
        }
        if torch.cuda.is_available():
            from torchvision.io import decode_jpeg
            from torchvision.transforms.v2.functional import center_crop, resize

            encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
            for batch in (8, 64):
                tensors = (encoded * (batch // len(encoded) + 1))[:batch]

                def on_gpu(tensors: list[torch.Tensor] = tensors) -> None:
                    for image in decode_jpeg(tensors, device="cuda"):
                        center_crop(resize(image, [size], antialias=True), [size])

                row[f"cuda_batch_{batch}_ms"] = ms_per_image(on_gpu, batch, repeats)
        results[name] = row
        print(name, row, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"machine": machine(device), "results": results}
    text = json.dumps(report, indent=1)
    print(text)
    write_report(text, "jpeg", device, args.out)


if __name__ == "__main__":
    main()
