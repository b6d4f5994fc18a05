"""The CNN encoder's images/s on this CPU: eager PyTorch against ONNX Runtime, same weights.

Also checks that the two agree (max abs difference of the features). Prints a JSON object
and writes it to benchmarks/results/ (a measurement, not a test):

    python -m benchmarks.bench_encoder [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from captioner.config import preset
from captioner.model import create_model
from captioner.onnx_encoder import onnx_encoder


def images_per_second(encoder: torch.nn.Module, batch: int, seconds: float) -> float:
    """The best of a few timed stretches of back-to-back calls (least disturbed by others)."""
    pixels = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        encoder(pixels)  # warm-up
        best = 0.0
        for _ in range(3):
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / 3:
                encoder(pixels)
                done += batch
            best = max(best, done / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1, 8, 32; 3 s each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, preprocess = preset("default")
    config.vocab_size = 4
    eager = create_model(config).encoder.eval()
    fast = onnx_encoder(eager, preprocess.image_size, threads=args.threads)
    if fast is None:
        raise SystemExit("ONNX Runtime is not available here (see the log line above)")
    probe = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = (fast(probe) - eager(probe)).abs().max().item()
    batches, seconds = ((1, 8, 32), 3.0) if args.quick else ((1, 8, 16, 32, 64), 6.0)
    rows = {}
    for batch in batches:
        torch_rate = images_per_second(eager, batch, seconds)
        onnx_rate = images_per_second(fast, batch, seconds)
        rows[f"batch_{batch}"] = {
            "pytorch_images_per_s": round(torch_rate, 1),
            "onnxruntime_images_per_s": round(onnx_rate, 1),
            "speedup": round(onnx_rate / torch_rate, 2),
        }
        print(batch, rows[f"batch_{batch}"], flush=True)
    report = {
        "machine": f"{platform.machine()}, {args.threads} threads, CPU",
        "encoder": config.encoder.name,
        "max_abs_difference": difference,
        "results": rows,
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
