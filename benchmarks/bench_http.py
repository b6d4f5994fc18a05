"""End to end over HTTP: ``captioner serve`` against the tutorial-style server, same weights.

A fixed corpus of JPEGs (photos from scikit-image's bundled data and the shipped sample scenes,
cropped and resized to 640x480 and to 4000x3000, with a little sensor-like noise so that they
compress like photos) is sent by a bounded closed-loop load generator (benchmarks/loadgen.py)
as multipart uploads to real server processes: captioner's, and the baseline of
benchmarks/naive_server.py (PIL decoding and ``Captioner.caption_images([image])`` per request,
plain PyTorch). Both servers run side by side and are measured alternately, cell by cell, in one
run. For each image size and concurrency it reports throughput and p50/p95/p99 latency, and the
ratio captioner / baseline. It also reports captioner's start-to-ready time and peak RSS.

A measurement, not a test. Prints JSON and writes it to --out:

    python -m benchmarks.bench_http [--quick] [--baseline-runtimes torch auto]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.loadgen import LoadResult, Request, load, multipart
from benchmarks.reporting import machine, write_report
from benchmarks.servers import ROOT, Server, captioner_command, peak_rss_mb, running

log = logging.getLogger("bench_http")

SAMPLES = ROOT / "captioner" / "assets" / "samples"
SIZES = {"640x480": (640, 480), "4000x3000": (4000, 3000)}


def source_images() -> list[Image.Image]:
    """Eight different pictures: four photos and four of the model's own kind of scene."""
    from skimage import data  # a dev dependency: its photos ship inside the wheel

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    scenes = [SAMPLES / "scene.png", *sorted((SAMPLES / "frames").glob("*.png"))[:3]]
    return [Image.fromarray(p) for p in photos] + [Image.open(s).convert("RGB") for s in scenes]


def photo_jpeg(image: Image.Image, size: tuple[int, int], seed: int) -> bytes:
    """``image`` cropped to the aspect ratio of ``size``, resized to it, with Gaussian noise
    (sigma 4) like a camera's, as a quality-90 JPEG."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 4.0, pixels.shape).astype(np.float32)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def corpus(size: tuple[int, int]) -> list[bytes]:
    return [photo_jpeg(image, size, seed) for seed, image in enumerate(source_images())]


def captioner_requests(jpegs: list[bytes]) -> list[Request]:
    return [multipart("image", f"{i}.jpg", data, "image/jpeg") for i, data in enumerate(jpegs)]


def baseline_requests(jpegs: list[bytes]) -> list[Request]:
    return [multipart("file", f"{i}.jpg", data, "image/jpeg") for i, data in enumerate(jpegs)]


def check_answers(url: str, request: Request) -> None:
    """One request answered 200, before anything is timed (a broken server is not fast)."""
    response = httpx.post(url, content=request.content, headers=request.headers, timeout=120)
    if response.status_code != 200:
        raise SystemExit(f"{url} answered {response.status_code}: {response.text[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 16, 4 s each")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="measured window per cell")
    parser.add_argument(
        "--baseline-runtimes",
        nargs="*",
        choices=["torch", "auto"],
        default=None,
        help="the baseline's CNN: torch (the tutorial's plain PyTorch) and/or auto "
        "(captioner's ONNX Runtime CNN); none: captioner alone (default: both; --quick: torch)",
    )
    parser.add_argument("--device", default="cpu", help="both servers' (cuda: benchmarks/gpu.sh)")
    parser.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="settings for captioner serve, e.g. CAPTIONER_MAX_BATCH_SIZE=64",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results/http_<dev>")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    levels = args.concurrency or ([1, 16] if args.quick else [1, 4, 16, 64])
    if args.baseline_runtimes is None:
        args.baseline_runtimes = ["torch"] if args.quick else ["torch", "auto"]
    seconds = args.seconds or (4.0 if args.quick else 12.0)
    warm_up = 1.0 if args.quick else 3.0

    corpora = {}
    for name in args.sizes:
        started = time.perf_counter()
        corpora[name] = corpus(SIZES[name])
        mean_kb = sum(map(len, corpora[name])) / len(corpora[name]) / 1024
        log.info("corpus %s: %d JPEGs, mean %.0f KB (%.1f s)", name, len(corpora[name]),
                 mean_kb, time.perf_counter() - started)  # fmt: skip

    report: dict[str, object] = {
        "machine": machine(args.device),
        "server_env": args.server_env,
        "python": sys.version.split()[0],
        "corpus": {
            name: {"images": len(jpegs), "mean_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024)}
            for name, jpegs in corpora.items()
        },
        "seconds_per_cell": seconds,
        "warm_up_s": warm_up,
    }
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        logs = Path(folder)
        command, env = captioner_command(args.model, args.device)
        env |= {"CAPTIONER_ACCESS_LOG": "false", "CAPTIONER_LOG_LEVEL": "warning"}
        env |= dict(setting.split("=", 1) for setting in args.server_env)
        ours = stack.enter_context(running(command, logs / "captioner.log", env))
        log.info("captioner serve ready in %.1f s", ours.ready_s)
        baselines: dict[str, Server] = {}
        for runtime in args.baseline_runtimes:
            naive = [sys.executable, "-m", "benchmarks.naive_server", "--encoder-runtime", runtime]
            naive += ["--device", args.device]
            if args.model:
                naive += ["--model", str(args.model)]
            baselines[runtime] = stack.enter_context(
                running(naive, logs / f"naive-{runtime}.log", ready_path="/health")
            )
            log.info("baseline (%s) ready in %.1f s", runtime, baselines[runtime].ready_s)

        results: dict[str, dict[str, object]] = {}
        for name, jpegs in corpora.items():
            ours_requests, naive_requests = captioner_requests(jpegs), baseline_requests(jpegs)
            check_answers(f"{ours.url}/v1/captions/image", ours_requests[0])
            for server in baselines.values():
                check_answers(f"{server.url}/caption", naive_requests[0])
            rows = []
            for level in levels:
                row: dict[str, object] = {"concurrency": level}
                mine = load(f"{ours.url}/v1/captions/image", ours_requests, level,
                            warm_up_s=warm_up, seconds=seconds)  # fmt: skip
                row["captioner"] = mine.summary()
                for runtime, server in baselines.items():
                    theirs = load(f"{server.url}/caption", naive_requests, level,
                                  warm_up_s=warm_up, seconds=seconds)  # fmt: skip
                    row[f"baseline_{runtime}"] = theirs.summary()
                    row[f"ratio_vs_{runtime}"] = _ratio(mine, theirs)
                log.info("%s c=%d: %s", name, level, _line(row))
                rows.append(row)
            results[name] = {"rows": rows}
        report["results"] = results
        report["captioner_server"] = {
            "ready_s": round(ours.ready_s, 2),
            "peak_rss_mb": round(peak_rss_mb(ours.process.pid), 1),
        }
        report["baseline_servers"] = {
            runtime: {
                "ready_s": round(server.ready_s, 2),
                "peak_rss_mb": round(peak_rss_mb(server.process.pid), 1),
            }
            for runtime, server in baselines.items()
        }
    text = json.dumps(report, indent=1)
    print(text)
    write_report(text, "http", args.device, args.out)


def _ratio(ours: LoadResult, theirs: LoadResult) -> float | None:
    return round(ours.per_second / theirs.per_second, 2) if theirs.per_second else None


def _line(row: dict[str, object]) -> str:
    parts = []
    for key, value in row.items():
        if isinstance(value, dict):
            parts.append(f"{key} {value['per_second']}/s p50 {value['p50_ms']} ms")
        elif key.startswith("ratio"):
            parts.append(f"{key} {value}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
