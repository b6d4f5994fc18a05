"""Training: teacher forcing with cross-entropy on cached features, optional CNN fine-tuning.

One function, ``train(config)``, runs the whole recipe: (generate the scenes corpus if asked),
read the datasets, build the vocab, extract frozen-encoder features once, train the decoder
with AdamW + warmup/cosine LR + gradient clipping, pick the best epoch by validation CIDEr-D
with early stopping, optionally fine-tune the CNN end to end, and write a checkpoint, a JSONL
metrics log and a PNG of the curves. Under ``torchrun`` it trains with DDP (gloo on CPU, NCCL
on GPU). The loss lives here, not in the model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from captioner import __version__
from captioner.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    TrainState,
    copy_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from captioner.config import (
    RETRIEVAL_KEYS,
    DataConfig,
    DecodingOptions,
    PreprocessConfig,
    TrainConfig,
    to_dict,
)
from captioner.data.features import FeatureCache, MediaDataset, extract_features
from captioner.data.items import CaptionItem
from captioner.data.training_data import CachedFeaturePairs, PixelPairs, make_collate, read_splits
from captioner.decoding import generate
from captioner.device import Runtime, resolve_precision, setup_runtime
from captioner.domain import attach_domain
from captioner.encoder import frame_embeddings
from captioner.errors import ConfigError
from captioner.evaluation import coco_metrics, scene_accuracy
from captioner.memory import attach_memory
from captioner.model import CaptionModel, create_model
from captioner.progress import progress_bar
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


# -- the loss ------------------------------------------------------------------------------


def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean token cross-entropy over non-pad targets."""
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )


# -- the recipe ----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _maybe_generate(config: TrainConfig, runtime: Runtime) -> None:
    generate_cfg = config.data.generate
    manifest = Path(config.data.train)
    if generate_cfg is None or manifest.exists():
        return
    if runtime.is_main:
        from captioner.data.scenes import generate_corpus

        log.info("generating the scenes corpus into %s", manifest.parent)
        written = generate_corpus(
            manifest.parent, generate_cfg.images, generate_cfg.videos, generate_cfg.seed
        )
        if written != manifest:
            raise ConfigError(f"data.train should be {written} for a generated corpus")
    runtime.barrier()


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 5% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class Phase:
    """One stretch of training with its own data, optimizer and LR schedule."""

    dataset: Dataset
    features: FeatureCache | None  # the frozen CNN's cache the phase reads; None: pixels
    lr: float
    batch_size: int
    num_workers: int  # media decoding workers (the cache needs none)
    resume: bool  # continue from the optimizer state saved in <out_dir>/last


def _phase_end(config: TrainConfig, state: TrainState) -> int:
    """The epoch the current phase ends after: the frozen one after ``epochs`` in all, the
    fine-tuning one ``finetune_epochs`` after it began."""
    if state.phase == "frozen":
        return config.epochs
    return state.phase_start + config.finetune_epochs


def _unfinished(config: TrainConfig, state: TrainState) -> bool:
    return state.epoch < _phase_end(config, state) and not state.stopped


def train(config: TrainConfig) -> Path:
    """Run the recipe; returns the folder of the best checkpoint."""
    runtime = setup_runtime(config.device)
    seed_everything(config.seed + runtime.rank)
    if config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    out = Path(config.out_dir)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _maybe_generate(config, runtime)
    train_items, val_items = read_splits(config.data)
    log.info("%d training items, %d validation items", len(train_items), len(val_items))
    config = config.resolved(train_items)
    retrieval_k = config.model_configs(1)[0].retrieval_k  # also refuses a bad recipe early
    recipe = (config.epochs, config.patience, config.data.min_count, retrieval_k)
    log.info("recipe: %d epochs, patience %d, min_count %d, retrieval_k %d", *recipe)

    # The model, its vocab and preprocessing travel together, as a checkpoint does.
    resume = config.resume and (out / "last" / CONFIG_FILE).exists()
    if resume:
        checkpoint = load_checkpoint(out / "last")
        state = load_train_state(out / "last")
        log.info("resuming from %s (epoch %d, %s phase)", out / "last", state.epoch, state.phase)
    else:
        vocab = Vocab.build(
            (c for item in train_items for c in item.captions), min_count=config.data.min_count
        )
        model_config, preprocess = config.model_configs(len(vocab))
        checkpoint = Checkpoint(create_model(model_config), vocab, preprocess)
        state = TrainState()
        if runtime.is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log
    checkpoint.model.to(runtime.device)
    data = config.data

    # Phase 1: frozen CNN, decoder trained on cached features.
    if state.phase == "frozen" and _unfinished(config, state):
        cache_dir = Path(config.features or out / "features")
        if runtime.is_main:
            extract_features(
                train_items + val_items,
                checkpoint.model.encoder,
                checkpoint.preprocess,
                cache_dir,
                num_workers=config.num_workers,
                device=runtime.device,
            )
        runtime.barrier()
        cache = FeatureCache.open(cache_dir)
        pairs = CachedFeaturePairs(
            train_items, checkpoint.vocab, data.max_caption_length, cache, data.video_repeats
        )
        if checkpoint.model.config.retrieval_k and not resume:
            _attach_memory(checkpoint.model, pairs, cache, val_items, config)
        if config.domain_rank and not resume:
            _fit_domain(checkpoint.model, cache, train_items, val_items, config)
        phase = Phase(pairs, cache, config.lr, config.batch_size, num_workers=0, resume=resume)
        _run_phase(config, runtime, checkpoint, phase, state, val_items)

    # Phase 2 (optional): fine-tune the CNN end to end, starting from the best frozen epoch.
    if config.finetune_epochs > 0:
        if state.phase == "frozen":
            checkpoint = load_checkpoint(out / "best")
            checkpoint.model.to(runtime.device).encoder.set_frozen(False)
            if checkpoint.model.domain is not None:
                # The summary describes the frozen CNN's features, which fine-tuning changes.
                log.warning("fine-tuning the CNN: the model will not report in_domain")
                checkpoint.model.domain, checkpoint.model.config.domain_rank = None, 0
            state.begin("finetune")
            resume = False  # the optimizer saved in last/ is the frozen phase's
        if _unfinished(config, state):
            pairs = PixelPairs(
                train_items,
                checkpoint.vocab,
                data.max_caption_length,
                checkpoint.preprocess,
                data.video_repeats,
            )
            batch_size, workers = config.finetune_batch_size, config.num_workers
            phase = Phase(pairs, None, config.finetune_lr, batch_size, workers, resume)
            _run_phase(config, runtime, checkpoint, phase, state, val_items)

    if runtime.is_main:
        _plot_curves(state.history, out / "curves.png")
        summary = {
            "best_val_cider_d": state.best,
            "epochs_run": state.epoch,
            "train_seconds": round(time.perf_counter() - started, 1),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if config.export:
            copy_checkpoint(out / "best", config.export)
            log.info("exported the best checkpoint to %s", config.export)
        log.info("done: %s", summary)
    runtime.barrier()
    return out / "best"


def _run_phase(
    config: TrainConfig,
    runtime: Runtime,
    checkpoint: Checkpoint,
    phase: Phase,
    state: TrainState,
    val_items: list[CaptionItem],
) -> None:
    """Train from ``state.epoch`` to the phase's end; validate, save and update ``state`` after
    each epoch, and stop early when validation stops improving."""
    out, end = Path(config.out_dir), _phase_end(config, state)
    model, vocab = checkpoint.model, checkpoint.vocab
    sampler = (
        DistributedSampler(
            phase.dataset, runtime.world, runtime.rank, shuffle=True, seed=config.seed
        )
        if runtime.world > 1
        else None
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        phase.dataset,
        batch_size=phase.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        collate_fn=make_collate(vocab),
        num_workers=phase.num_workers,
        drop_last=len(phase.dataset) > phase.batch_size * runtime.world,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=phase.lr, weight_decay=config.weight_decay)
    # The schedule spans the whole phase, so a resumed run follows the same LR curve.
    total_steps = max(1, (end - state.phase_start) * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(config.warmup_steps, total_steps // 4), total_steps)
    )
    if phase.resume:
        load_optimizer_state(out / "last", optimizer, scheduler)
    wrapped: torch.nn.Module = (
        DistributedDataParallel(
            model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None
        )
        if runtime.world > 1
        else model
    )
    use_amp = config.amp and runtime.device.type == "cuda"
    amp_dtype = resolve_precision(runtime.device) if use_amp else torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    for epoch in range(state.epoch, end):
        # Shuffle order and dropout depend on the epoch only, so a resumed run continues exactly.
        torch.manual_seed(config.seed * 1000 + epoch + runtime.rank)
        generator.manual_seed(config.seed * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        losses = []
        bar = progress_bar(
            loader, desc=f"epoch {epoch + 1}/{end}", disable=not runtime.is_main, leave=False
        )
        for batch in bar:
            batch = batch.to(runtime.device)
            visual = {_visual_key(phase.features): batch.visual}
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext()
            with autocast:
                # A training item must not retrieve itself from the caption memory.
                exclude = batch.items if model.retrieval is not None else None
                logits = wrapped(batch.inputs, batch.lengths, **visual, exclude=exclude)
                loss = caption_loss(logits, batch.targets, vocab.pad_id, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        state.epoch = epoch + 1
        stop = False
        if runtime.is_main:
            metrics = validate(
                model, vocab, val_items, phase.features, checkpoint.preprocess, runtime.device
            )
            record = {
                "epoch": epoch + 1,
                "step": state.step,
                "phase": state.phase,
                "train_loss": round(float(np.mean(losses)), 4) if losses else None,
                "lr": scheduler.get_last_lr()[0],
                **metrics,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            state.history.append(record)
            with (out / "metrics.jsonl").open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", epoch + 1, {k: record[k] for k in record if k != "time"})
            score = metrics.get("CIDEr-D", 0.0)
            if score > state.best:
                state.best, state.stale = score, 0
                _save_model(out / "best", checkpoint, config, record)
            else:
                state.stale += 1
            stop = state.stopped = state.stale >= config.patience
            _save_model(out / "last", checkpoint, config, None)
            save_train_state(out / "last", state, optimizer, scheduler)
            if stop:
                log.info("early stopping: no better CIDEr-D for %d epochs", config.patience)
        if runtime.broadcast_flag(stop):
            state.stopped = True  # on every rank, not only where it was decided
            break


DOMAIN_FIT_ITEMS = 20_000  # items whose frames fit the domain summary (a seeded sample)


def domain_sentence(config: TrainConfig) -> str:
    """What the model was trained to describe, in the words its checkpoint will carry."""
    return config.domain or f"images and videos like those of {Path(config.data.train).name}"


def fit_domain(
    model_dir: str | Path,
    data: DataConfig,
    out: str | Path,
    *,
    description: str,
    rank: int = 32,
    quantile: float = 0.995,
    features: str | Path | None = None,
    max_items: int = DOMAIN_FIT_ITEMS,
    seed: int = 0,
) -> float:
    """Give an existing checkpoint a domain summary of ``data``; write it to ``out``.

    For checkpoints trained before summaries existed, or to describe a model's data anew. The
    frozen CNN runs over (a seeded sample of) the training items and the validation items,
    cached in ``features`` (default: ``out``/features). Returns the calibrated threshold.
    """
    checkpoint = load_checkpoint(model_dir)
    model = checkpoint.model.eval()
    if not model.config.encoder.frozen:
        raise ConfigError("this model's CNN was fine-tuned; a domain summary needs a frozen CNN")
    train_items, val_items = read_splits(data)
    rng = random.Random(seed)
    if len(train_items) > max_items:
        train_items = rng.sample(train_items, max_items)
    cache_dir = Path(features or Path(out) / "features")
    extract_features(
        train_items + val_items, model.encoder, checkpoint.preprocess, cache_dir, progress=True
    )
    cache = FeatureCache.open(cache_dir)
    settings = TrainConfig(domain_rank=rank, domain_quantile=quantile, seed=seed)
    _fit_domain(model, cache, train_items, val_items, settings)
    metadata = {**checkpoint.metadata, "domain": description}
    save_checkpoint(replace(checkpoint, metadata=metadata), out)
    return float(model.domain.threshold)  # type: ignore[union-attr]


def _attach_memory(
    model: CaptionModel,
    pairs: CachedFeaturePairs,
    cache: FeatureCache,
    val_items: Sequence[CaptionItem],
    config: TrainConfig,
) -> None:
    """Fill the model's caption memory from the training items; with ``retrieval_key = "auto"``,
    keyed by whichever key's nearest training caption scores the higher validation CIDEr-D.

    The nearest neighbour is what the memory's lookup rests on, so its score on held-out items
    says which key finds the right neighbours on this data: the cells' layout on icons and
    product shots, the pooled embedding where the same thing appears anywhere in the frame.
    """
    captions = pairs.item_captions()
    candidates = RETRIEVAL_KEYS if config.retrieval_key == "auto" else (model.config.retrieval_key,)
    position = cache.position()
    held_out = [item for item in val_items if item.id in position and item.id not in cache.failed]
    scores = {}
    for key in candidates:
        model.config.retrieval_key = key
        memory = attach_memory(model, captions, pairs.item_features)
        if len(candidates) == 1 or not held_out:
            break
        chunk = [cache.tensor(position[item.id]) for item in held_out]
        lengths = torch.tensor([len(c) for c in chunk])
        with torch.no_grad():
            queries = memory.key(torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), lengths)
        similarity = queries.float() @ memory.keys.float().T
        nearest = similarity.argmax(-1).tolist()
        predictions = {
            item.id: pairs.items[n].captions[0] for item, n in zip(held_out, nearest, strict=True)
        }
        references = {item.id: list(item.captions) for item in held_out}
        metrics = coco_metrics(references, predictions, metrics=("CIDEr-D",), use_java=False)
        scores[key] = float(metrics["CIDEr-D"])
    if scores:
        best = max(scores, key=lambda k: (scores[k], k == candidates[0]))
        log.info(
            "caption memory key: %s (validation CIDEr-D of the nearest training caption: %s)",
            best,
            ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
        )
        if best != model.config.retrieval_key:
            model.config.retrieval_key = best
            attach_memory(model, captions, pairs.item_features)


def _fit_domain(
    model: CaptionModel,
    cache: FeatureCache,
    train_items: Sequence[CaptionItem],
    held_out: Sequence[CaptionItem],
    config: TrainConfig,
) -> None:
    """Summarise the training inputs' features, calibrated on the validation items."""

    def frames(items: Sequence[CaptionItem]) -> list[np.ndarray]:
        position = cache.position()
        kept = [i for i in items if i.id in position and i.id not in cache.failed]
        if len(kept) > DOMAIN_FIT_ITEMS:
            kept = random.Random(config.seed).sample(kept, DOMAIN_FIT_ITEMS)
        encoder = model.config.encoder
        return [
            frame_embeddings(cache.tensor(position[i.id]).unsqueeze(0), encoder)[0].numpy()
            for i in kept
        ]

    train = np.concatenate(frames(train_items))
    summary = attach_domain(
        model, train, frames(held_out), config.domain_rank, config.domain_quantile
    )
    log.info(
        "domain summary: rank %d over %d training frames; in-domain threshold %.3f",
        model.config.domain_rank,
        len(train),
        float(summary.threshold),
    )


def _visual_key(features: FeatureCache | None) -> str:
    """The model's keyword for a phase's visual input: cached features, or pixel frames."""
    return "frames" if features is None else "features"


@torch.inference_mode()
def validate(
    model: CaptionModel,
    vocab: Vocab,
    items: list[CaptionItem],
    features: FeatureCache | None,
    preprocess: PreprocessConfig,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Greedy captions for the validation items, scored with CIDEr-D (and scene accuracy).

    The items' visual input is their rows of the ``features`` cache, or (None) decoded pixels.
    """
    model.eval()
    predictions: dict[str, str] = {}
    options = DecodingOptions(beam_size=1)
    for chunk in _chunks(items, batch_size):
        if features is not None:
            position = features.position()
            chunk = [item for item in chunk if item.id not in features.failed]
            tensors = [features.tensor(position[i.id]) for i in chunk]
        else:
            dataset = MediaDataset(chunk, preprocess)
            loaded = [dataset[i] for i in range(len(chunk))]
            chunk = [
                item
                for item, (_, pixels, _) in zip(chunk, loaded, strict=True)
                if pixels is not None
            ]
            tensors = [pixels for _, pixels, _ in loaded if pixels is not None]
        if not tensors:
            continue
        lengths = torch.tensor([len(t) for t in tensors], device=device)
        padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True).to(device)
        visual = model.encode(lengths, **{_visual_key(features): padded})
        for item, hyps in zip(chunk, generate(model, visual, vocab, options), strict=True):
            predictions[item.id] = vocab.decode(hyps[0].tokens)
    references = {item.id: list(item.captions) for item in items}
    metrics = coco_metrics(references, predictions, metrics=("CIDEr-D", "BLEU"), use_java=False)
    metrics.pop("notes", None)
    metrics.update(scene_accuracy(items, predictions))
    return {f"val_{k}" if k not in ("CIDEr-D",) else k: v for k, v in metrics.items()}


def _chunks(items: Sequence[CaptionItem], size: int) -> Iterator[list[CaptionItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# -- saving ----------------------------------------------------------------------------------


def _save_model(
    folder: Path, checkpoint: Checkpoint, config: TrainConfig, record: dict[str, Any] | None
) -> None:
    metadata = {
        "name": config.name,
        "version": config.version,
        "captioner_version": __version__,
        "data": {"train": config.data.train, "val": config.data.val or config.data.train},
        "validation": record,
        "domain": domain_sentence(config),
        "train_config": to_dict(config),
    }
    save_checkpoint(replace(checkpoint, decoding=DecodingOptions(), metadata=metadata), folder)


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation CIDEr-D (and accuracies) per epoch, as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in history], marker="o")
    left.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    right.plot(epochs, [r.get("CIDEr-D", 0) for r in history], marker="o", label="CIDEr-D")
    accuracy = [r.get("val_attribute_accuracy", {}).get("overall") for r in history]
    if any(a is not None for a in accuracy):
        right.plot(epochs, accuracy, marker="s", label="attribute accuracy")
    motion = [r.get("val_motion_accuracy") for r in history]
    if any(m is not None for m in motion):
        right.plot(epochs, motion, marker="^", label="motion accuracy")
    right.set(title="validation", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
