"""Batched beam search over N images in one call vs a per-image loop, same model, same options.

Prints a JSON object and writes it to benchmarks/results/ (a measurement, not a test):

    python benchmarks/bench_batched_decoding.py [--model DIR] [--images 32] [--beam-size 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner.decoding import generate
from captioner.inference import Captioner


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    captioner = Captioner.load(args.model, device=args.device)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    tensors = [captioner.prepare_image(image)[0] for image in images]
    options = captioner.options(beam_size=args.beam_size)
    lengths = torch.ones(args.images, dtype=torch.long, device=captioner.device)
    with torch.inference_mode():
        frames = torch.stack(tensors).to(captioner.device)
        visual = captioner.model.encode(lengths, frames=frames)

    def decode_batched() -> None:
        generate(captioner.model, visual, captioner.vocab, options)

    def decode_loop() -> None:
        for i in range(args.images):
            generate(captioner.model, visual[i : i + 1], captioner.vocab, options)

    def end_to_end_batched() -> None:
        captioner.caption_tensors(tensors, options)

    def end_to_end_loop() -> None:
        for tensor in tensors:
            captioner.caption_tensors([tensor], options)

    results = {}
    for name, fn in [
        ("decode_batched_s", decode_batched),
        ("decode_per_image_loop_s", decode_loop),
        ("end_to_end_batched_s", end_to_end_batched),
        ("end_to_end_per_image_loop_s", end_to_end_loop),
    ]:
        results[name] = round(statistics.median(timed(fn, args.repeats)), 4)
    report = {
        "benchmark": "batched_decoding",
        "images": args.images,
        "beam_size": args.beam_size,
        "model": captioner.name,
        "device": str(captioner.device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        **results,
        "decode_speedup": round(
            results["decode_per_image_loop_s"] / results["decode_batched_s"], 2
        ),
        "end_to_end_speedup": round(
            results["end_to_end_per_image_loop_s"] / results["end_to_end_batched_s"], 2
        ),
    }
    print(json.dumps(report, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"batched_decoding_{captioner.device.type}.json").write_text(
        json.dumps(report, indent=1)
    )


if __name__ == "__main__":
    main()
