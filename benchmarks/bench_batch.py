"""Batch captioning throughput: the single-machine engine, the Ray engine and the server.

On the same images (the shipped sample images, repeated into a folder of files):

* ``server``: the serving engine in process (``app.service.CaptionService``: its decode pool
  and dynamic batcher, at its default settings), kept busy by concurrent callers sending the
  files' bytes; HTTP is left out, so this is the most the server could do;
* ``local``: ``captioner batch`` (``run_local``) over the folder, at its defaults;
* ``ray``: ``captioner batch --engine ray`` on a local Ray with ``--ray-cpus`` CPUs, once on
  one image (the fixed cost: Ray's start-up, the actor's model load, the writing) and once
  on all of them; its overhead is measured against the local engine.

``--rss-items N`` also runs ``captioner batch`` in a subprocess over an N-row JSONL list of
paths and samples its resident memory (VmRSS) every half second.

Models load and warm up before timing (both engines' and the server's rates are sustained
rates, not start-up). Prints a JSON object and writes it to benchmarks/results/ (a
measurement, not a test); the machine it ran on is shared, so expect +-10-20% between runs:

    python -m benchmarks.bench_batch [--images 240] [--ray-cpus 2] [--rss-items 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "captioner" / "assets" / "samples"
log = logging.getLogger("bench_batch")


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` image files, the sample images repeated (each copy a file of its own)."""
    sources = [SAMPLES / "scene.png", *sorted((SAMPLES / "frames").glob("*.png"))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.png"
        shutil.copyfile(sources[i % len(sources)], path)
        paths.append(path)
    return paths


def bench_server(model: Path | None, paths: list[Path]) -> dict:
    from app.metrics import Metrics
    from app.service import CaptionService
    from app.settings import Settings

    settings = Settings(model_path=model)
    payloads = [path.read_bytes() for path in paths]

    async def run() -> float:
        service = CaptionService(settings, Metrics())
        await service.start()
        options = service.options({})
        await asyncio.gather(*(service.caption_image(p, options) for p in payloads[:16]))
        queue = list(payloads)

        async def client() -> None:
            while queue:
                await service.caption_image(queue.pop(), options)

        started = time.perf_counter()
        # Enough callers to keep every batch full and the decode pool busy.
        await asyncio.gather(*(client() for _ in range(4 * settings.max_batch_size)))
        seconds = time.perf_counter() - started
        await service.close()
        return seconds

    seconds = asyncio.run(run())
    return {
        "items": len(paths),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(paths) / seconds, 2),
        "max_batch_size": settings.max_batch_size,
    }


def bench_local(model: Path | None, folder: Path, out: Path, batch_size: int) -> dict:
    from captioner.batch.local import run_local
    from captioner.inference import Captioner

    captioner = Captioner.load(model)
    captioner.warm_up((1, batch_size))
    summary = run_local(
        captioner,
        [str(folder)],
        str(out),
        options=captioner.options(),
        batch_size=batch_size,
        overwrite=True,
        count_first=False,
    )
    items = summary.done + summary.failed
    return {
        "items": items,
        "seconds": round(summary.seconds, 2),
        "items_per_s": round(summary.rate, 2),
        "batch_size": batch_size,
    }


def bench_ray(model: Path | None, folder: Path, one: Path, out: Path, cpus: int) -> dict:
    import ray

    from captioner.batch.ray_engine import run_ray
    from captioner.checkpoint import load_configs
    from captioner.inference import DEFAULT_MODEL_DIR

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started
    _, options = load_configs(model or DEFAULT_MODEL_DIR)

    def job(source: Path, name: str):
        return run_ray([str(source)], str(out / name), model=model, options=options, overwrite=True)

    job(one, "warm")  # fills the encoder export cache, as a first run on any machine would
    fixed = job(one, "one")
    full = job(folder, "all")
    ray.shutdown()
    items = full.done + full.failed
    return {
        "cpus": cpus,
        "init_s": round(init_s, 2),  # ray.init: starting the local Ray
        "one_item_s": round(fixed.seconds, 2),  # a job's fixed cost: actor, model, plan, write
        "items": items,
        "seconds": round(full.seconds, 2),  # without init_s
        "items_per_s": round(full.rate, 2),
    }


def bench_rss(
    model: Path | None, paths: list[Path], items: int, work: Path, extra: list[str]
) -> dict:
    """Peak and sampled resident memory of `captioner batch` over an ``items``-row list."""
    listing = work / "list.jsonl"
    with listing.open("w") as handle:
        for i in range(items):
            handle.write(json.dumps({"path": str(paths[i % len(paths)])}) + "\n")
    out = work / "rss-out"
    command = [sys.executable, "-m", "captioner.cli", "batch", str(listing), "-o", str(out)]
    command += ["--overwrite", *extra] + (["--model", str(model)] if model else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    samples = []  # (seconds, MiB, shards written)
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            break
        rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")]
        kib = int(rss[0]) if rss else 0
        shards = len(list(out.glob("part-*.parquet"))) if out.exists() else 0
        samples.append((round(time.perf_counter() - started, 1), round(kib / 1024), shards))
        time.sleep(0.5)
    summary = process.communicate()[0].decode().strip()
    peak = max(s[1] for s in samples)
    shards = -(-items // 1000)  # the default --shard-size
    marks = {
        f"{p}%": next((s[1] for s in samples if s[2] >= -(-p * shards // 100)), None)
        for p in (10, 25, 50, 75, 100)
    }
    return {
        "items": items,
        "summary": summary,
        "peak_rss_mib": peak,
        "rss_mib_when_shards_written": marks,
        "seconds": round(time.perf_counter() - started, 1),
    }


def tiny_checkpoint(folder: Path) -> Path:
    """A small random model (the tests' preset): for memory runs where the model is not the
    point and the shipped one would take hours on a CPU."""
    import torch

    from captioner.checkpoint import Checkpoint, save_checkpoint
    from captioner.config import preset
    from captioner.model import create_model
    from captioner.vocab import Vocab

    vocab = Vocab.build(["a red circle", "a blue square to the left of a green star"])
    torch.manual_seed(0)
    config, preprocess = preset("test-tiny")
    config.vocab_size = len(vocab)
    model = create_model(config).eval()
    save_checkpoint(Checkpoint(model, vocab, preprocess, metadata={"name": "tiny"}), folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16, help="the local engine's")
    parser.add_argument("--rounds", type=int, default=4, help="server and local, alternating")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["server", "local", "ray"])
    parser.add_argument("--rss-items", type=int, default=0, help="0: no memory run")
    parser.add_argument(
        "--rss-model", default=None, help="checkpoint, or 'tiny' (the tests' preset); --model's"
    )
    parser.add_argument(
        "--rss-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="the rest: options for the memory run's `captioner batch` (e.g. --max-length 2)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_cpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        paths = make_images(work / "images", args.images)
        (work / "one").mkdir()
        shutil.copyfile(paths[0], work / "one" / "one.png")
        report: dict = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), CPU only",
            "images": f"{args.images} files: the sample PNGs (224x224), repeated",
        }
        # Server and local alternate, round after round, so that drift in the shared machine's
        # speed hits both alike: the median of the rounds' ratios is the comparison.
        rounds: dict[str, list[dict]] = {"server": [], "local": []}
        for round_index in range(args.rounds):
            if "server" not in args.skip:
                rounds["server"].append(bench_server(args.model, paths))
            if "local" not in args.skip:
                rounds["local"].append(
                    bench_local(args.model, work / "images", work / "local", args.batch_size)
                )
            log.info("round %d of %d done", round_index + 1, args.rounds)
        for name, results in rounds.items():
            if results:
                report[name] = {
                    **{k: v for k, v in results[0].items() if k not in ("seconds", "items_per_s")},
                    "items_per_s_rounds": [r["items_per_s"] for r in results],
                    "items_per_s_median": statistics.median(r["items_per_s"] for r in results),
                    "seconds_median": round(statistics.median(r["seconds"] for r in results), 2),
                }
        if rounds["server"] and rounds["local"]:
            ratios = [
                local["items_per_s"] / server["items_per_s"]
                for server, local in zip(rounds["server"], rounds["local"], strict=True)
            ]
            report["local_vs_server"] = {
                "ratio_rounds": [round(r, 3) for r in ratios],
                "ratio_median": round(statistics.median(ratios), 3),
            }
        if "ray" not in args.skip:
            report["ray"] = bench_ray(args.model, work / "images", work / "one", work / "ray",
                                      args.ray_cpus)  # fmt: skip
            if "local" in report:
                local_s = report["local"]["seconds_median"]
                report["ray"]["overhead_vs_local_s"] = round(report["ray"]["seconds"] - local_s, 2)
                report["ray"]["ray_vs_local_items_per_s"] = round(
                    report["ray"]["items_per_s"] / report["local"]["items_per_s_median"], 3
                )
        if args.rss_items:
            rss_model = args.rss_model or args.model
            if rss_model == "tiny":
                rss_model = tiny_checkpoint(work / "tiny-model")
            report["rss"] = bench_rss(rss_model, paths, args.rss_items, work, args.rss_args)
            report["rss"]["model"] = str(args.rss_model or args.model or "shipped")
            report["rss"]["options"] = args.rss_args
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
