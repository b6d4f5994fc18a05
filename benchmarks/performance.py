"""Run the performance benchmarks and write docs/performance.md and its plot from their results.

    python -m benchmarks.performance            # run bench_model, bench_http, bench_video; write
    python -m benchmarks.performance --quick    # the same, each with --quick (under 10 minutes)
    python -m benchmarks.performance --render   # only rewrite the page from benchmarks/results/

Each benchmark writes its JSON to benchmarks/results/ (``*_cpu.json``); this script only turns
those into a markdown page (docs/performance.md) and a PNG plot (docs/performance.png), so the
page shows exactly what the last run measured, and names the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.servers import ROOT

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
BENCHMARKS = ("bench_model", "bench_http", "bench_video")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _number(value: object, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plot_http(http: dict[str, Any], path: Path) -> None:
    """Throughput against concurrency, captioner and the baseline, one panel per image size."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    sizes = list(http["results"])
    figure, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.0), squeeze=False)
    for axis, size in zip(axes[0], sizes, strict=True):
        rows = http["results"][size]["rows"]
        levels = [row["concurrency"] for row in rows]
        series = [key for key in rows[0] if isinstance(rows[0][key], dict)]
        for key in series:
            label = "captioner serve" if key == "captioner" else _baseline_label(key)
            style = "o-" if key == "captioner" else "s--"
            axis.plot(levels, [row[key]["per_second"] for row in rows], style, label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel("images/s")
        axis.set_title(f"{size} JPEGs")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Throughput over HTTP on {http['machine']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _baseline_label(key: str) -> str:
    runtime = key.removeprefix("baseline_")
    return "baseline (PyTorch CNN)" if runtime == "torch" else "baseline (ONNX Runtime CNN)"


def http_section(http: dict[str, Any]) -> list[str]:
    lines = [
        "## End to end over HTTP",
        "",
        f"Measured on **{http['machine']}** (`python -m benchmarks.bench_http`; each cell a "
        f"window of at least {http['seconds_per_cell']:g} s after a {http['warm_up_s']:g} s "
        "warm-up; the servers ran side by side and were measured alternately).",
        "",
    ]
    for size, result in http["results"].items():
        rows = result["rows"]
        baselines = [key for key in rows[0] if key.startswith("baseline_")]
        header = "| clients | captioner img/s | p50 / p95 / p99 ms |"
        rule = "|---|---|---|"
        for key in baselines:
            header += f" {_baseline_label(key)} img/s | p50 / p95 / p99 ms | ratio |"
            rule += "---|---|---|"
        corpus = http["corpus"][size]
        lines += [f"### {size} JPEGs ({corpus['images']} images, {corpus['mean_kb']} KB each)"]
        lines += ["", header, rule]
        for row in rows:
            mine = row["captioner"]
            line = f"| {row['concurrency']} | {mine['per_second']} | {_latencies(mine)} |"
            for key in baselines:
                runtime = key.removeprefix("baseline_")
                theirs = row[key]
                ratio = row.get(f"ratio_vs_{runtime}")
                line += f" {theirs['per_second']} | {_latencies(theirs)} | **{ratio}×** |"
            lines.append(line)
        lines.append("")
    server = http["captioner_server"]
    lines += [
        "### The server's resources",
        "",
        f"- From process start to `/health/ready`: **{server['ready_s']} s** (model load, "
        "ONNX Runtime session from its cache, warm-up).",
        f"- Peak resident memory (VmHWM) over the whole run: **{server['peak_rss_mb']} MB**.",
        "",
    ]
    return lines


def _latencies(cell: dict[str, Any]) -> str:
    return " / ".join(_number(cell[key], 0) for key in ("p50_ms", "p95_ms", "p99_ms"))


def model_section(model: dict[str, Any]) -> list[str]:
    runtimes = model["results"]
    names = list(runtimes)
    lines = [
        "## The model alone",
        "",
        f"Measured on **{model['machine']}**, {model['threads']} threads, "
        f"{model['precision']} (`python -m benchmarks.bench_model`): images/s, best of three "
        "stretches. *Encoder* is the CNN alone; *+ beam 3* is the whole batched call the "
        "server makes (CNN, temporal LSTM, beam-3 decoding).",
        "",
    ]
    decoder_threads = model.get("decoder_threads", {})
    if any(threads != model["threads"] for threads in decoder_threads.values()):
        lines[-2] += " PyTorch's threads beside each CNN runtime (what `Captioner.load` sets): " + (
            ", ".join(f"{name} {threads}" for name, threads in decoder_threads.items()) + "."
        )
    header = "| batch |" + "".join(f" {n} encoder | {n} + beam 3 |" for n in names)
    lines += [header, "|---|" + "---|---|" * len(names)]
    batches = [key for key in runtimes[names[0]] if key.startswith("batch_")]
    for key in batches:
        cells = "".join(
            f" {runtimes[n][key]['encoder_images_per_s']} |"
            f" {runtimes[n][key]['encoder_and_beam3_images_per_s']} |"
            for n in names
        )
        lines.append(f"| {key.removeprefix('batch_')} |{cells}")
    lines += ["", "| clip | " + " | ".join(f"{n} clips/s" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for key in [key for key in runtimes[names[0]] if key.startswith("clips_")]:
        frames, batch = key.split("_")[1], key.split("_")[-1]
        cells = " | ".join(str(runtimes[n][key]["clips_per_s"]) for n in names)
        lines.append(f"| {frames} frames, batch {batch} | {cells} |")
    if "onnxruntime_spinning_encoder_images_per_s" in model:
        spinning = model["onnxruntime_spinning_encoder_images_per_s"]
        figures = ", ".join(f"{v} at batch {k.removeprefix('batch_')}" for k, v in spinning.items())
        lines += [
            "",
            "With ONNX Runtime's threads busy-waiting between runs (`spinning`), the CNN alone "
            f"does {figures} images/s; captioner turns that off, because in the server the "
            "spinning threads take the cores the decoder and the image decoding need "
            "(`captioner/onnx_encoder.py` gives the numbers).",
        ]
    if "max_abs_feature_difference" in model:
        lines += [
            "",
            f"The two runtimes' features differ by at most "
            f"{model['max_abs_feature_difference']:.1e} (the tolerance checked at start-up is "
            "1e-3 of the feature scale).",
        ]
    return [*lines, ""]


def video_section(video: dict[str, Any]) -> list[str]:
    lines = [
        "## Long videos",
        "",
        f"Measured on **{video['machine']}**, PyAV {video['pyav']}, {video['clip']} "
        "(`python -m benchmarks.bench_video`): seconds to describe a clip with the shipped "
        "model (reading, sampling and captioning), against only decoding every frame and then "
        "sampling, with PyAV's default decoder settings and with its threaded decoding. "
        "*fast* is the default sampling (a segment's keyframe stands in for its centre when "
        "reaching the centre would decode more than 15 frames); *exact* takes the centres.",
        "",
        "| clip | describe, fast | describe, exact | decode all (default / threaded) "
        "| speed-up, fast | speed-up, exact |",
        "|---|---|---|---|---|---|",
    ]
    for name, clip in video["results"].items():
        seconds = clip["seconds"]
        plain, threaded = clip["speedup_vs_decode_all_default"], clip["speedup_vs_decode_all_auto"]
        length, _, keyframes = name.partition("_keyint_")
        keyframes = "x264 default" if keyframes == "x264_default" else keyframes
        lines.append(
            f"| {length}, keyframes {keyframes} | {seconds['describe_fast']} s "
            f"| {seconds['describe_exact']} s "
            f"| {seconds['decode_all_default']} / {seconds['decode_all_auto']} s "
            f"| **{plain['describe_fast']}×** / {threaded['describe_fast']}× "
            f"| {plain['describe_exact']}× / {threaded['describe_exact']}× |"
        )
    lines += ["", "Speed-ups are against decoding everything with the default / threaded decoder."]
    return [*lines, ""]


def render() -> Path:
    http, model, video = (_load(f"{n}_cpu.json") for n in ("http", "model", "video"))
    lines = [
        "# Performance",
        "",
        "What captioner does on the machine named in each section, measured by the benchmarks "
        "in `benchmarks/` (measurements, not tests). This page and its plot are written by",
        "",
        "```",
        "python -m benchmarks.performance      # run them all, then write this page",
        "python -m benchmarks.performance --render   # only rewrite it from benchmarks/results/",
        "```",
        "",
        "and nothing on it is typed by hand. A GPU run is `benchmarks/gpu.sh`. On a small "
        "machine, figures from separate runs differ by up to about 20%; ratios are taken "
        "within one run.",
        "",
    ]
    if http:
        plot_http(http, DOCS / "performance.png")
        lines += ["![throughput against concurrency](performance.png)", "", *http_section(http)]
    if model:
        lines += model_section(model)
    if video:
        lines += video_section(video)
    for precision in ("bf16", "fp16"):
        gpu = _load(f"model_gpu_{precision}.json")
        if gpu:
            lines += [*model_section(gpu), "(GPU run: `benchmarks/gpu.sh`.)", ""]
    gpu_http = _load("http_gpu.json")
    if gpu_http:
        lines += http_section(gpu_http)
    page = DOCS / "performance.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark with --quick")
    parser.add_argument("--render", action="store_true", help="only write the page")
    args = parser.parse_args()
    if not args.render:
        for name in BENCHMARKS:
            command = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] * args.quick)
            print("running", " ".join(command[1:]), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)
    print("wrote", render())


if __name__ == "__main__":
    main()
