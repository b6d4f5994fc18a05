"""The ``captioner`` command line. ``main(argv)`` returns the exit code, so tests call it
in-process.

Subcommands: caption, data generate, data emoji, features extract, train, evaluate, serve.
Results go to stdout; logs and one-line errors go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.errors import CaptionerError, StillImageError
from captioner.media_types import IMAGE_SUFFIXES, VIDEO_SUFFIXES, is_video_path

if TYPE_CHECKING:
    from captioner.inference import CaptionResult

EXIT_INPUT_FAILED = 1  # at least one input could not be captioned
EXIT_USAGE = 2  # bad arguments, or the model could not be loaded
TABLE_COLUMNS = ("path", "rank", "caption", "score", "in_domain", "tags", "seconds")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    caption.add_argument(
        "--model", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    caption.add_argument(
        "--beam-size", type=int, default=None, help=f"beams searched, {_range('beam_size')}"
    )
    caption.add_argument(
        "--num-captions",
        type=int,
        default=None,
        help=f"captions per input, best first; at most --beam-size; {_range('num_captions')}",
    )
    caption.add_argument(
        "--max-length", type=int, default=None, help=f"most words, {_range('max_length')}"
    )
    caption.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help=f"ranking: log_prob / length**penalty, {_range('length_penalty')}",
    )
    caption.add_argument(
        "--num-frames", type=int, default=None, help="frames sampled per video (the model's: 8)"
    )
    caption.add_argument(
        "--tags", type=int, default=None, metavar="K", help=f"top K ImageNet tags, {_range('tags')}"
    )
    caption.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."
    )
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

    serve = commands.add_parser("serve", help="run the HTTP captioning service (uvicorn)")
    serve.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    serve.add_argument("--host", default=None, help="default 0.0.0.0, or CAPTIONER_HOST")
    serve.add_argument("--port", type=int, default=None, help="default 8000, or CAPTIONER_PORT")
    serve.set_defaults(handler=_cmd_serve)

    from captioner import cli_train  # the training-side commands live apart from serving

    cli_train.add_commands(commands)
    return parser


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
    options = captioner.options(
        beam_size=args.beam_size,
        num_captions=args.num_captions,
        max_length=args.max_length,
        length_penalty=args.length_penalty,
        tags=args.tags,
    )
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
