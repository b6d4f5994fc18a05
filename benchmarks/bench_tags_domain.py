"""What tags and the domain flag cost: captioning latency with and without them, same model.

Three set-ups of the same Captioner, timed in interleaved rounds (so that drift in the
machine's speed hits them alike), on real photos prepared once (the CNN and decoding are timed,
not JPEG decoding):

* ``before``: the model without its domain summary, no tags: captioner as it was;
* ``flag``: the domain flag on (every caption gets it), no tags: the default now;
* ``tags``: the domain flag and ``tags=5``.

The tag step is also timed alone (the head over the CNN's features, softmax and top-k).

Prints a JSON object and writes it to benchmarks/results/ (a measurement, not a test):

    python benchmarks/bench_tags_domain.py [--batch-sizes 1 8] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.inference import Captioner
from captioner.tags import top_tags

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "brick", "moon")


def tag_step_seconds(captioner: Captioner, batch: list[torch.Tensor], repeats: int) -> float:
    """Fastest time of the work that ``tags`` adds to a call, on this batch's CNN features."""
    with torch.inference_mode():
        features = captioner.cnn(torch.cat(batch))
        best = float("inf")
        for _ in range(repeats + 1):
            started = time.perf_counter()
            probabilities = captioner.tagger(features).float().softmax(-1)
            for row in probabilities:
                top_tags(row, 5)
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tags_domain_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import skimage.data

    captioner = Captioner.load(args.model, device="cpu")
    summary = captioner.model.domain
    if summary is None:
        raise SystemExit("this model has no domain summary; run `captioner domain fit` first")
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    tensors = [captioner.prepare_image(photo)[0] for photo in photos]
    setups = {
        "before": (None, captioner.options()),
        "flag": (summary, captioner.options()),
        "tags": (summary, captioner.options(tags=5)),
    }
    report: dict = {
        "machine": f"{platform.machine()}, {args.threads} torch threads, CPU",
        "encoder_runtime": captioner.describe()["encoder_runtime"],
        "rounds": args.rounds,
        "seconds_per_call": {},
    }
    for batch_size in args.batch_sizes:
        batch = (tensors * batch_size)[:batch_size]
        times: dict[str, list[float]] = {name: [] for name in setups}
        for round_index in range(args.rounds + 1):  # round 0 warms every set-up up
            for name, (domain, options) in setups.items():
                captioner.model.domain = domain
                started = time.perf_counter()
                captioner.caption_tensors(batch, options)
                if round_index:
                    times[name].append(time.perf_counter() - started)
        # On a shared 2-core machine single calls swing by +-10%, more than what is measured.
        # So three views: the fastest round (least disturbed), the median of paired ratios
        # (each round's set-ups ran back to back, so drift cancels), and the tag step alone,
        # timed directly: the head, the softmax and the top-k over this batch's CNN features.
        fastest = {name: min(values) for name, values in times.items()}
        paired = {
            f"{new}_vs_{old}": [n / o - 1 for n, o in zip(times[new], times[old], strict=True)]
            for new, old in (("flag", "before"), ("tags", "flag"))
        }
        step = tag_step_seconds(captioner, batch, repeats=max(20, args.rounds))
        report["seconds_per_call"][f"batch_{batch_size}"] = {
            "fastest": {name: round(value, 5) for name, value in fastest.items()},
            "median": {name: round(statistics.median(v), 5) for name, v in times.items()},
            "fastest_ratio": {
                "flag_vs_before": round(fastest["flag"] / fastest["before"] - 1, 4),
                "tags_vs_flag": round(fastest["tags"] / fastest["flag"] - 1, 4),
            },
            "paired_median_ratio": {k: round(statistics.median(v), 4) for k, v in paired.items()},
            "tag_step": {
                "seconds_fastest": round(step, 5),
                "share_of_fastest_flag_call": round(step / fastest["flag"], 4),
            },
        }
    captioner.model.domain = summary
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
