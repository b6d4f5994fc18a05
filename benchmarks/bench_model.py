"""The model alone, no HTTP and no image decoding: what each runtime does on this machine.

For the shipped default model, with the CNN in eager PyTorch and on ONNX Runtime (the same
weights), it measures:
- images/s for the CNN encoder alone at batch 1, 8, 16, 32 and 64;
- images/s for encoder plus beam-3 decoding (``Captioner.caption_tensors``, the call the
  server's batcher makes) at the same batch sizes;
- clips/s for 8- and 16-frame clips (encoder, temporal LSTM and beam-3 decoding);
- the largest difference between the two runtimes' features.

Each figure is the best of three timed stretches (the least disturbed by anything else). A
measurement, not a test: prints JSON and writes it to --out.

    python -m benchmarks.bench_model [--quick] [--threads 2] [--device cuda --precision bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.reporting import machine, write_report
from captioner.inference import Captioner
from captioner.onnx_encoder import onnx_encoder


def per_second(work: Callable[[], object], items: int, seconds: float) -> float:
    """Items/s of back-to-back ``work()`` calls: the best of three stretches after a warm-up."""

    def run() -> None:
        work()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a GPU's work is done when it is waited for

    run()
    best = 0.0
    for _ in range(3):
        done, started = 0, time.perf_counter()
        while True:
            run()
            done += items
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / 3:
                break
        best = max(best, done / elapsed)
    return best


def pixels(count: int, frames: int, size: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count * 100 + frames)
    return [torch.rand(frames, 3, size, size, generator=generator).to(device) for _ in range(count)]


def measure(captioner: Captioner, batches: list[int], clips: list[int], seconds: float) -> dict:
    size = captioner.checkpoint.preprocess.image_size
    options = captioner.options()  # the model's defaults: beam 3
    rows: dict[str, dict[str, float]] = {}
    for batch in batches:
        sequences = pixels(batch, 1, size, captioner.device)
        stacked = torch.cat(sequences)

        def encoder(stacked: torch.Tensor = stacked) -> object:
            with torch.inference_mode(), _autocast(captioner):
                return captioner.cnn(stacked)

        def captioned(sequences: list[torch.Tensor] = sequences) -> object:
            return captioner.caption_tensors(sequences, options)

        rows[f"batch_{batch}"] = {
            "encoder_images_per_s": round(per_second(encoder, batch, seconds), 1),
            "encoder_and_beam3_images_per_s": round(per_second(captioned, batch, seconds), 1),
        }
        print(captioner.describe()["encoder_runtime"], batch, rows[f"batch_{batch}"], flush=True)
    for frames in clips:
        for batch in (1, 4):
            sequences = pixels(batch, frames, size, captioner.device)

            def clip(sequences: list[torch.Tensor] = sequences) -> object:
                return captioner.caption_tensors(sequences, options)

            rows[f"clips_{frames}_frames_batch_{batch}"] = {
                "clips_per_s": round(per_second(clip, batch, seconds), 2)
            }
    return rows


def _autocast(captioner: Captioner) -> contextlib.AbstractContextManager[object]:
    """The precision the captioner runs its model in (a no-op in float32)."""
    if captioner.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(captioner.device.type, dtype=captioner.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1, 8, 32; 1.5 s each")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: results/model_<dev>")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([1, 8, 32] if args.quick else [1, 8, 16, 32, 64])
    seconds = 1.5 if args.quick else 4.5
    clips = [8] if args.quick else [8, 16]

    threads = torch.get_num_threads()  # loading the ONNX Runtime path halves PyTorch's
    runtimes = {}
    captioners = {}
    decoder_threads = {}
    # On a GPU the CNN stays in PyTorch (there is no ONNX Runtime path to compare).
    for runtime in ["torch", "auto"] if args.device == "cpu" else ["torch"]:
        captioner = Captioner.load(
            args.model,
            device=args.device,
            precision=args.precision,
            encoder_runtime=runtime,
            max_batch_size=max(batches),  # else a batch of 64 runs as two model calls of 32
        )
        captioners[runtime] = captioner
        name = captioner.describe()["encoder_runtime"]
        decoder_threads[name] = torch.get_num_threads()
        runtimes[name] = measure(captioner, batches, clips, seconds)

    spinning = None
    if args.device == "cpu":
        # The CNN alone with ONNX Runtime's threads busy-waiting between runs: faster on its
        # own, slower in the server (captioner/onnx_encoder.py), shown for comparison.
        size = captioners["auto"].checkpoint.preprocess.image_size
        spinner = onnx_encoder(
            captioners["auto"].model.encoder, size, threads=threads, spinning=True
        )
        if spinner is not None:
            spinning = {}
            for batch in batches:
                stacked = torch.cat(pixels(batch, 1, size, torch.device("cpu")))

                def encoder(stacked: torch.Tensor = stacked) -> object:
                    with torch.inference_mode():
                        return spinner(stacked)

                spinning[f"batch_{batch}"] = round(per_second(encoder, batch, seconds), 1)

    report: dict[str, object] = {
        "machine": machine(args.device),
        "threads": threads,
        "decoder_threads": decoder_threads,  # PyTorch's, per CNN runtime (Captioner.load)
        "model": str(args.model or "shipped default"),
        "precision": str(captioners["torch"].dtype).removeprefix("torch."),
        "decoding": vars(captioners["torch"].options()),
        "results": runtimes,
    }
    if spinning is not None:
        report["onnxruntime_spinning_encoder_images_per_s"] = spinning
    if "onnxruntime" in runtimes:
        probe = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            eager, fast = captioners["torch"].cnn(probe), captioners["auto"].cnn(probe)
        report["max_abs_feature_difference"] = float((fast - eager).abs().max())
        report["onnxruntime_speedup"] = {
            key: {
                metric: round(value / runtimes["torch"][key][metric], 2)
                for metric, value in row.items()
            }
            for key, row in runtimes["onnxruntime"].items()
        }
    text = json.dumps(report, indent=1)
    print(text)
    write_report(text, "model", args.device, args.out)


if __name__ == "__main__":
    main()
