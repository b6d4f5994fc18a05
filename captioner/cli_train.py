"""Training-side subcommands: data generate, data emoji, features extract, domain fit, train,
evaluate."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from captioner.data.emoji import SCHEMES as EMOJI_SCHEMES
from captioner.data.emoji import prepare_emoji  # stdlib only: cheap to import
from captioner.data.readers import DEFAULT_MAX_SKIPPED_SHARE

log = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the training-side subcommands on the main parser."""
    data = commands.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True
    )
    generate = data.add_parser("generate", help="write the synthetic scenes corpus")
    generate.add_argument("--out", type=Path, required=True, help="folder to write into")
    generate.add_argument("--images", type=int, default=1000)
    generate.add_argument("--videos", type=int, default=300)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--image-size", type=int, default=224)
    generate.set_defaults(handler=_cmd_generate)
    emoji = data.add_parser(
        "emoji", help="download the emoji development set (npm) and write its manifests"
    )
    emoji.add_argument(
        "--split",
        choices=(*EMOJI_SCHEMES, "all"),
        required=True,
        help="split scheme whose manifest to write, or all of them",
    )
    emoji.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="images and manifests (default: $XDG_CACHE_HOME/captioner/emoji or ~/.cache/...)",
    )
    emoji.set_defaults(handler=_cmd_emoji)

    features = commands.add_parser("features", help="feature cache").add_subparsers(
        dest="features_command", required=True
    )
    extract = features.add_parser("extract", help="run the frozen encoder once per frame")
    _add_data_arguments(extract)
    extract.add_argument("--out", type=Path, required=True, help="cache folder (resumable)")
    extract.add_argument("--encoder", default=None, help="timm backbone (default: the model's)")
    extract.add_argument(
        "--weights", default=None, help="pretrained weights: the package name or a local file"
    )
    extract.add_argument("--grid-size", type=int, default=None)
    extract.add_argument("--num-frames", type=int, default=None, help="frames sampled per video")
    extract.add_argument("--batch-frames", type=int, default=32)
    extract.add_argument("--workers", type=int, default=1)
    extract.add_argument("--device", default="auto")
    extract.set_defaults(handler=_cmd_extract)

    domain = commands.add_parser("domain", help="the summary that flags out-of-domain inputs")
    fit = domain.add_subparsers(dest="domain_command", required=True).add_parser(
        "fit",
        help="give a checkpoint a summary of its training data (fitted on train, "
        "calibrated on val)",
    )
    fit.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    fit.add_argument("--data", required=True, help="the data the model was trained on")
    fit.add_argument("--root", type=Path, default=None, help="image/video root for JSON formats")
    fit.add_argument("--out", type=Path, required=True, help="write the checkpoint here")
    fit.add_argument(
        "--describe", required=True, help="one sentence: what the model was trained to describe"
    )
    fit.add_argument("--features", type=Path, default=None, help="feature cache folder")
    fit.add_argument("--max-items", type=int, default=20_000, help="training items sampled")
    fit.add_argument("--rank", type=int, default=32, help="main directions kept")
    fit.add_argument(
        "--quantile", type=float, default=0.995, help="share of val items called in domain"
    )
    fit.set_defaults(handler=_cmd_domain_fit)

    train = commands.add_parser("train", help="train a model from a TOML/YAML config")
    train.add_argument("--config", type=Path, default=None, help="TOML or YAML training config")
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. epochs=5 data.min_count=1"
    )
    train.add_argument("--resume", action="store_true", help="continue from <out_dir>/last")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="COCO metrics (+ scene accuracy) of a model")
    evaluate.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    _add_data_arguments(evaluate, default_split="test")
    evaluate.add_argument("--out", type=Path, default=None, help="write predictions + metrics here")
    evaluate.add_argument("--beam-size", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--workers", type=int, default=1)
    evaluate.add_argument(
        "--no-java", action="store_true", help="skip METEOR and the PTB tokenizer"
    )
    evaluate.add_argument(
        "--baselines",
        action="store_true",
        help="also score retrieval baselines (nearest neighbour, consensus re-ranking) that "
        "retrieve from the train split of --data",
    )
    evaluate.add_argument(
        "--features", type=Path, default=None, help="a feature cache of this model's encoder"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_data_arguments(parser: argparse.ArgumentParser, default_split: str | None = None) -> None:
    parser.add_argument("--data", required=True, help="manifest.jsonl, Karpathy/COCO/MSR-VTT JSON")
    parser.add_argument("--root", type=Path, default=None, help="image/video root for JSON formats")
    parser.add_argument("--split", default=default_split, help="train, val or test (default: all)")
    parser.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="bad items: skip (counted) or fail",
    )
    parser.add_argument(
        "--max-skipped-share",
        type=float,
        default=DEFAULT_MAX_SKIPPED_SHARE,
        help="stop when more than this share of the entries is skipped "
        f"(default {DEFAULT_MAX_SKIPPED_SHARE})",
    )


def _read(args: argparse.Namespace) -> list:
    from captioner.data.readers import check_skipped, load_dataset

    result = load_dataset(args.data, root=args.root, split=args.split, on_error=args.on_error)
    hint = f"--max-skipped-share (now {args.max_skipped_share})"
    return check_skipped(result, args.max_skipped_share, allow_hint=hint).items


def _cmd_domain_fit(args: argparse.Namespace) -> int:
    from captioner.config import DataConfig
    from captioner.inference import DEFAULT_MODEL_DIR
    from captioner.training import fit_domain

    root = str(args.root) if args.root else None
    threshold = fit_domain(
        args.model or DEFAULT_MODEL_DIR,
        DataConfig(train=args.data, root=root),
        args.out,
        description=args.describe,
        rank=args.rank,
        quantile=args.quantile,
        features=args.features,
        max_items=args.max_items,
    )
    print(json.dumps({"model": str(args.out), "threshold": round(threshold, 4)}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from captioner.data.scenes import generate_corpus

    manifest = generate_corpus(
        args.out, args.images, args.videos, args.seed, image_size=args.image_size, progress=True
    )
    print(manifest)
    return 0


def _cmd_emoji(args: argparse.Namespace) -> int:
    schemes = list(EMOJI_SCHEMES) if args.split == "all" else [args.split]
    for manifest in prepare_emoji(schemes, args.cache):
        print(manifest)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    """Defaults come from the default model's config, so the cache matches what `train` needs.

    `train` extracts its own cache for the train and val items; this command is for other
    item sets (a whole dataset, a test split) and for extracting ahead on another machine.
    """
    from dataclasses import replace

    from captioner.config import preset
    from captioner.data.features import extract_features
    from captioner.device import resolve_device
    from captioner.encoder import ImageEncoder, encoder_config_for, load_pretrained_weights

    model_config, preprocess = preset("default")
    base = model_config.encoder
    name = args.encoder or base.name
    default_backbone = name == base.name  # then its weights and stages are the defaults too
    weights = args.weights or (base.pretrained if default_backbone else None)
    config = encoder_config_for(
        name,
        pretrained=weights,
        grid_size=args.grid_size or base.grid_size,
        stages=base.stages if default_backbone else None,
    )
    encoder = ImageEncoder(config)
    if weights:
        load_pretrained_weights(encoder, weights)
    if args.num_frames:
        preprocess = replace(preprocess, num_frames=args.num_frames)
    items = _read(args)
    cache = extract_features(
        items,
        encoder,
        preprocess,
        args.out,
        batch_frames=args.batch_frames,
        num_workers=args.workers,
        device=resolve_device(args.device),
    )
    print(
        json.dumps({"cache": str(args.out), "items": len(cache.ids), "failed": len(cache.failed)})
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from captioner.config import load_train_config
    from captioner.training import train

    config = load_train_config(
        args.config, [*args.overrides, *(["resume=true"] if args.resume else [])]
    )
    best = train(config)
    print(best)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.data.features import FeatureCache
    from captioner.evaluation import evaluate, write_predictions
    from captioner.inference import Captioner

    captioner = Captioner.load(args.model, device=args.device)
    items = _read(args)
    options = captioner.options(beam_size=args.beam_size)
    pool = None
    if args.baselines:
        pool = _read(argparse.Namespace(**{**vars(args), "split": "train"}))
    features = FeatureCache.open(args.features) if args.features else None
    report, predictions = evaluate(
        captioner,
        items,
        options,
        pool_items=pool,
        features=features,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_java=False if args.no_java else None,
        progress=True,
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_predictions(args.out / "predictions.json", predictions)
        (args.out / "metrics.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0
