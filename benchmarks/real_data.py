"""Train on real caption data and compare with retrieval, in one command per split.

Runs the four documented CLI steps on the emoji development set (``captioner data emoji``) and
times each:

    captioner data emoji --split SPLIT
    captioner features extract --data MANIFEST --out RUN/features       (every split at once)
    captioner train data.train=MANIFEST out_dir=RUN features=RUN/features
    captioner evaluate --model RUN/best --data MANIFEST --split test --baselines --features ...

The training recipe is the one the defaults pick for the data's size: no per-split settings.
Prints one JSON object (the model against both retrieval baselines, CIDEr-D and BLEU-4, and the
time of each step) and writes it to benchmarks/results/real_data_<split>.json. A measurement,
not a test:

    python benchmarks/real_data.py --split small [--run runs/real-small] [--no-java]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import time
from pathlib import Path

import torch

from captioner.cli import main as cli
from captioner.data.emoji import SCHEMES

RESULTS = Path(__file__).parent / "results"


def step(name: str, argv: list[str], timings: dict[str, float]) -> str:
    """Run one CLI command in-process; returns what it printed, records how long it took."""
    started = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(argv)
    timings[name] = round(time.perf_counter() - started, 1)
    if code != 0:
        raise SystemExit(f"real_data: `captioner {' '.join(argv)}` exited {code}")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=[s for s in SCHEMES if s != "all"], required=True)
    parser.add_argument("--run", type=Path, default=None, help="run folder (default runs/real-*)")
    parser.add_argument("--cache", type=Path, default=None, help="emoji cache folder")
    parser.add_argument("--no-java", action="store_true", help="skip METEOR and PTB tokenizing")
    parser.add_argument("--workers", type=int, default=1, help="media decoding workers")
    args = parser.parse_args()
    run = args.run or Path("runs") / f"real-{args.split}"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    prepare = ["data", "emoji", "--split", args.split]
    prepare += ["--cache", str(args.cache)] if args.cache else []
    manifest = step("prepare", prepare, timings).strip().splitlines()[-1]
    features = str(run / "features")
    step(
        "extract",
        ["features", "extract", "--data", manifest, "--out", features,
         "--workers", str(args.workers)],
        timings,
    )  # fmt: skip
    best = step(
        "train",
        ["train", f"data.train={manifest}", f"out_dir={run}", f"features={features}",
         f"num_workers={args.workers}"],
        timings,
    ).strip()  # fmt: skip
    evaluate = ["evaluate", "--model", best, "--data", manifest, "--split", "test", "--baselines",
                "--features", features, "--out", str(run / "eval")]  # fmt: skip
    evaluate += ["--no-java"] if args.no_java else []
    report = json.loads(step("evaluate", evaluate, timings))
    timings["total"] = round(time.perf_counter() - started, 1)

    def scores(block: dict) -> dict:
        return {k: block.get(k) for k in ("CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L")}

    baselines = report["baselines"]
    strongest = max(baselines[b]["CIDEr-D"] for b in ("nearest_neighbour", "consensus"))
    result = {
        "split": args.split,
        "test_items": report["num_predictions"],
        "model": scores(report),
        "nearest_neighbour": scores(baselines["nearest_neighbour"]),
        "consensus": scores(baselines["consensus"]),
        "cider_gain_over_best_baseline": round(report["CIDEr-D"] / strongest - 1, 4),
        "seconds": timings,
        "train_summary": json.loads((run / "summary.json").read_text()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
    }
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"real_data_{args.split}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
