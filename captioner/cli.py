"""The ``captioner`` command line. ``main(argv)`` returns the exit code, so tests call it
in-process.

Subcommands: caption, batch, data generate, data emoji, features extract, train, evaluate, serve.
Results go to stdout; logs and one-line errors go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import CaptionerError, StillImageError
from captioner.media_types import IMAGE_SUFFIXES, VIDEO_SUFFIXES, is_video_path

if TYPE_CHECKING:
    from captioner.inference import CaptionResult

EXIT_INPUT_FAILED = 1  # at least one input could not be captioned
EXIT_USAGE = 2  # bad arguments, or the model could not be loaded
TABLE_COLUMNS = ("path", "rank", "caption", "score", "in_domain", "tags", "seconds")


# The commands that run a model while other threads decode media beside it.
INFERENCE_COMMANDS = frozenset({"caption", "batch", "serve"})


def passive_openmp_waits(command: str) -> bool:
    """Let PyTorch's OpenMP threads sleep, not spin, between parallel regions; True if set.

    Inference alternates PyTorch (the decoder), ONNX Runtime (the CNN) and the media-decoding
    threads on the same cores, and OpenMP's default busy-wait after each region burns the
    cores the next stage needs: on a 2-core machine the model ran batches of 8 at 46 images/s
    with the default and 64 with PASSIVE, and at 1 image/s instead of 9 at batch 1 while
    another process was busy. It must be set before torch is imported (OpenMP reads it once);
    an operator's own OMP_WAIT_POLICY wins. Training keeps OpenMP's default.
    """
    if command not in INFERENCE_COMMANDS or "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    passive_openmp_waits(args.command)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except CaptionerError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


DESCRIPTION = "Caption images and videos, serve captions over HTTP, train and evaluate models."


def build_parser() -> argparse.ArgumentParser:
    from captioner import __version__

    parser = argparse.ArgumentParser(prog="captioner", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser(
        "caption",
        help="caption images, videos and folders of them",
        description="Caption images, videos and folders of them. Decoding options default to "
        "the model's own (see GET /v1/models); ranges are checked.",
    )
    caption.add_argument("paths", nargs="+", type=Path, help="image/video files or folders")
    _add_model_options(caption)
    caption.add_argument(
        "--format",
        choices=("jsonl", "table"),
        default="jsonl",
        help="jsonl: one JSON object per input (default); table: tab-separated, with a header "
        "line and one row per caption of the n-best",
    )
    caption.add_argument(
        "--batch-size", type=int, default=16, help="images per model call (default 16)"
    )
    caption.set_defaults(handler=_cmd_caption)

    _add_batch_command(commands)

    serve = commands.add_parser("serve", help="run the HTTP captioning service (uvicorn)")
    serve.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    serve.add_argument("--host", default=None, help="default 0.0.0.0, or CAPTIONER_HOST")
    serve.add_argument("--port", type=int, default=None, help="default 8000, or CAPTIONER_PORT")
    serve.set_defaults(handler=_cmd_serve)

    from captioner import cli_train  # the training-side commands live apart from serving

    cli_train.add_commands(commands)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model, device and decoding options that `caption` and `batch` share."""
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    parser.add_argument(
        "--beam-size", type=int, default=None, help=f"beams searched, {_range('beam_size')}"
    )
    parser.add_argument(
        "--num-captions",
        type=int,
        default=None,
        help=f"captions per input, best first; at most --beam-size; {_range('num_captions')}",
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help=f"most words, {_range('max_length')}"
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help=f"ranking: log_prob / length**penalty, {_range('length_penalty')}",
    )
    parser.add_argument(
        "--num-frames", type=int, default=None, help="frames sampled per video (the model's: 8)"
    )
    parser.add_argument(
        "--tags", type=int, default=None, metavar="K", help=f"top K ImageNet tags, {_range('tags')}"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."
    )


def _range(option: str) -> str:
    from captioner.config import DecodingOptions

    low, high = DecodingOptions.LIMITS[option]
    return f"{low:g} to {high:g} (default {getattr(DecodingOptions(), option)}, from the model)"


def iter_media(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given; folders expanded (recursively, sorted) to their image and video files."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    yield child
        else:
            yield path


def _cmd_caption(args: argparse.Namespace) -> int:
    from captioner.inference import Captioner

    captioner = Captioner.load(args.model, device=args.device)
    options = captioner.options(**_decoding_overrides(args))
    if args.num_frames is not None and args.num_frames < 1:
        raise CaptionerError("--num-frames must be at least 1")
    failures = 0
    if args.format == "table":
        print("\t".join(TABLE_COLUMNS), flush=True)
    pending: list[tuple[Path, object, float]] = []  # prepared images awaiting one batched call

    def flush() -> None:
        if not pending:
            return
        started = time.perf_counter()
        results = captioner.caption_tensors([tensor for _, tensor, _ in pending], options)
        share = (time.perf_counter() - started) / len(pending)
        for (path, _, prep_seconds), result in zip(pending, results, strict=True):
            _emit(args.format, path, result, prep_seconds + share)
        pending.clear()

    for path in iter_media(args.paths):
        started = time.perf_counter()
        try:
            result = None
            if is_video_path(path):
                flush()
                # A one-frame GIF is captioned as the image it is.
                with contextlib.suppress(StillImageError):
                    result = captioner.caption_video(path, args.num_frames, options)
            if result is not None:
                _emit(args.format, path, result, time.perf_counter() - started)
            else:
                tensor, _ = captioner.prepare_image(path)
                pending.append((path, tensor, time.perf_counter() - started))
                if len(pending) >= args.batch_size:
                    flush()
        except CaptionerError as exc:
            failures += 1
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            print(f"captioner: error: {message}", file=sys.stderr)
    flush()
    return EXIT_INPUT_FAILED if failures else 0


def _add_batch_command(commands: Any) -> None:
    batch = commands.add_parser(
        "batch",
        help="caption a whole library or dataset into Parquet (resumable; Ray optional)",
        description="Caption every input under folders, globs, lists of paths (.jsonl with a "
        '"path" key, .csv/.parquet with a "path" column, .txt) or WebDataset .tar shards, '
        "local or fsspec URLs, into Parquet shards under --output. A failed input is a row "
        "with its error; the summary line goes to stdout. Run the same command again to "
        "resume a stopped run (single-machine engine).",
    )
    batch.add_argument("inputs", nargs="+", help="folders, globs, files, lists, .tar shards, URLs")
    batch.add_argument("-o", "--output", required=True, help="output folder (local or URL)")
    _add_model_options(batch)
    batch.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (default); ray: Ray Data (pip install 'captioner[ray]')",
    )
    batch.add_argument(
        "--batch-size", type=int, default=16, help="inputs per model call (default 16)"
    )
    batch.add_argument(
        "--shard-size", type=int, default=1000, help="inputs per output file (local; 1000)"
    )
    batch.add_argument(
        "--workers", type=int, default=None, help="decoding threads (local; default: the CPUs)"
    )
    batch.add_argument(
        "--overwrite", action="store_true", help="delete what --output holds and start over"
    )
    batch.add_argument(
        "--no-count",
        dest="count",
        action="store_false",
        help="do not count the inputs for the progress bar's ETA (local; for streamed lists)",
    )
    ray = batch.add_argument_group("ray engine")
    ray.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)"
    )
    ray.add_argument(
        "--actors",
        type=int,
        default=None,
        help="model replicas (default: one per GPU, else a quarter of the CPUs)",
    )
    ray.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per model replica (default: 1 when the cluster has GPUs, else 0)",
    )
    batch.set_defaults(handler=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    if args.num_frames is not None and args.num_frames < 1:
        raise CaptionerError("--num-frames must be at least 1")
    if args.engine == "ray":
        from captioner.batch.ray_engine import require_ray, run_ray
        from captioner.checkpoint import load_configs
        from captioner.inference import DEFAULT_MODEL_DIR

        require_ray()
        # Checked here, before any cluster work; the actors check tags against their model.
        _, defaults = load_configs(args.model or DEFAULT_MODEL_DIR)
        overrides = {k: v for k, v in _decoding_overrides(args).items() if v is not None}
        options = replace(defaults, **overrides).validate()
        summary = run_ray(
            args.inputs,
            args.output,
            model=args.model,
            options=options,
            num_frames=args.num_frames,
            batch_size=args.batch_size,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            device=args.device,
            address=args.address,
            overwrite=args.overwrite,
        )
    else:
        from captioner.batch.local import run_local
        from captioner.inference import Captioner

        captioner = Captioner.load(args.model, device=args.device)
        summary = run_local(
            captioner,
            args.inputs,
            args.output,
            options=captioner.options(**_decoding_overrides(args)),
            num_frames=args.num_frames,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            workers=args.workers,
            overwrite=args.overwrite,
            count_first=args.count,
        )
    print(f"captioner batch: {summary.line()}", flush=True)
    return 0


def _decoding_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "beam_size": args.beam_size,
        "num_captions": args.num_captions,
        "max_length": args.max_length,
        "length_penalty": args.length_penalty,
        "tags": args.tags,
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    # The web layer is imported only here: the library itself never imports FastAPI.
    from app.serve import run

    return run(model=args.model, host=args.host, port=args.port)


def _emit(fmt: str, path: Path, result: CaptionResult, seconds: float) -> None:
    """Print one result to stdout; its warnings (out of domain) go to stderr as well."""
    for warning in result.warnings:
        print(f"captioner: warning: {path}: {warning}", file=sys.stderr)
    if fmt == "jsonl":
        record = {
            "path": str(path),
            "caption": result.caption,
            "captions": [asdict(c) for c in result.captions],
            "in_domain": result.in_domain,
            "domain_score": result.domain_score,
            "warnings": result.warnings,
            "seconds": round(seconds, 4),
        }
        if result.tags:
            record["tags"] = [asdict(tag) for tag in result.tags]
        print(json.dumps(record), flush=True)
    else:
        domain = {None: "", True: "yes", False: "no"}[result.in_domain]
        tags = "; ".join(f"{t.name} ({t.probability:.2f})" for t in result.tags)
        for rank, caption in enumerate(result.captions, start=1):
            row = (path, rank, caption.text, f"{caption.score:.4f}", domain, tags, f"{seconds:.3f}")
            print("\t".join(map(str, row)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
