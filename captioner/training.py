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
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from captioner import __version__
from captioner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from captioner.config import (
    DecodingOptions,
    ModelConfig,
    PreprocessConfig,
    from_dict,
    preset,
    to_dict,
)
from captioner.data.features import FeatureCache, MediaDataset, extract_features
from captioner.data.items import CaptionItem
from captioner.data.readers import DEFAULT_MAX_SKIPPED_SHARE, check_skipped, load_dataset
from captioner.decoding import generate
from captioner.device import resolve_device, resolve_precision
from captioner.errors import ConfigError, DatasetError
from captioner.evaluation import coco_metrics, scene_accuracy
from captioner.model import CaptionModel, create_model
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """A scenes corpus to generate into the train manifest's folder when it does not exist."""

    images: int = 0
    videos: int = 0
    seed: int = 0


@dataclass
class DataConfig:
    """Where the captions and media come from (any format ``load_dataset`` reads)."""

    train: str = ""  # manifest.jsonl, Karpathy JSON, COCO captions JSON or MSR-VTT videodatainfo
    root: str | None = None  # image/video root for the JSON formats (default: the file's folder)
    val: str | None = None  # a separate validation file; default: the "val" split of ``train``
    generate: GenerateConfig | None = None
    on_error: str = "skip"  # "skip" bad items (counted and logged) or "fail" on the first one
    # Training stops when more than this share of a dataset file's entries are skipped: a
    # wrong root folder must not turn into a run on a fraction of the data.
    max_skipped_share: float = DEFAULT_MAX_SKIPPED_SHARE
    min_count: int = 2  # words seen fewer times become <unk>
    max_caption_length: int = 24  # training captions are cut to this many tokens
    max_val_items: int = 1000  # validation decodes at most this many items per epoch
    # Each video's captions are used this many times per epoch. Motion words are a small part
    # of a caption, so with few videos beside many images they learn slowly (measured).
    video_repeats: int = 1


@dataclass
class TrainConfig:
    """The whole training recipe; saved into the checkpoint's metadata."""

    out_dir: str = "runs/captioner"
    name: str = "captioner"  # model name reported by the service
    version: str = "1"
    preset: str = "default"  # starting model/preprocessing config (see config.preset)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of ModelConfig fields
    preprocess: dict[str, Any] = field(default_factory=dict)  # overrides of PreprocessConfig
    data: DataConfig = field(default_factory=DataConfig)
    features: str | None = None  # feature cache folder (default: <out_dir>/features)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 4  # stop after this many epochs without a better validation CIDEr-D
    finetune_epochs: int = 0  # then train the CNN too, on pixels, for this many epochs
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on the CPU
    num_workers: int = 1  # media decoding workers (feature extraction, fine-tuning)
    # CPU threads for the training loop; 0 keeps torch's default. The head's ops are small, and
    # on a busy 2-core machine two spinning OpenMP threads ran 10x slower than one (measured).
    cpu_threads: int = 0
    resume: bool = False  # continue from <out_dir>/last if it exists
    export: str | None = None  # also copy the best checkpoint here when training ends


# -- config files --------------------------------------------------------------------------


# Keys whose override values stay strings even when they look like JSON (version=2).
_STRING_KEYS = frozenset(
    {"name", "version", "out_dir", "export", "features", "train", "val", "root"}
)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML or YAML config and apply ``key.sub=value`` overrides (values parsed as JSON)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")
        except (OSError, ValueError) as exc:  # tomllib's errors are ValueErrors
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        except Exception as exc:  # yaml.YAMLError, without importing yaml for TOML users
            if type(exc).__module__.startswith("yaml"):
                raise ConfigError(f"{path}: cannot read config ({exc})") from exc
            raise
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} must look like key=value")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # a bare string
        target = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
        target[leaf] = raw if leaf in _STRING_KEYS else value
    return from_dict(TrainConfig, data, where="train config")


# -- datasets ------------------------------------------------------------------------------


def _encode_caption(vocab: Vocab, caption: str, max_length: int) -> list[int]:
    return vocab.encode(caption)[:max_length]


class CaptionPairs(Dataset):
    """(item, caption) pairs; each yields (item index, caption token ids)."""

    def __init__(
        self, items: Sequence[CaptionItem], vocab: Vocab, max_length: int, video_repeats: int = 1
    ) -> None:
        self.pairs = [
            (i, _encode_caption(vocab, caption, max_length))
            for i, item in enumerate(items)
            for caption in item.captions * (video_repeats if item.kind == "video" else 1)
        ]

    def __len__(self) -> int:
        return len(self.pairs)


class CachedFeaturePairs(CaptionPairs):
    """Pairs whose visual input is a row range of the feature cache."""

    def __init__(
        self,
        items: Sequence[CaptionItem],
        vocab: Vocab,
        max_length: int,
        cache: FeatureCache,
        video_repeats: int = 1,
    ) -> None:
        position = cache.position()
        kept = [item for item in items if item.id not in cache.failed]
        super().__init__(kept, vocab, max_length, video_repeats)
        self.rows = [position[item.id] for item in kept]
        self.cache = cache

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]]:
        item_index, tokens = self.pairs[i]
        features = self.cache.features(self.rows[item_index])
        return torch.from_numpy(np.asarray(features, dtype=np.float32)), tokens


class PixelPairs(CaptionPairs):
    """Pairs whose visual input is decoded pixels (for fine-tuning the CNN)."""

    def __init__(
        self,
        items: Sequence[CaptionItem],
        vocab: Vocab,
        max_length: int,
        preprocess: PreprocessConfig,
        video_repeats: int = 1,
    ) -> None:
        super().__init__(items, vocab, max_length, video_repeats)
        self.media = MediaDataset(items, preprocess)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, list[int]]:
        item_index, tokens = self.pairs[i]
        _, pixels, _ = self.media[item_index]
        return pixels, tokens


@dataclass
class Batch:
    visual: torch.Tensor  # (B, T, D) features or (B, T, 3, S, S) pixels, zero-padded in T
    lengths: torch.Tensor  # (B,) frames per item
    inputs: torch.Tensor  # (B, L) <bos> w1 .. wn <pad>..
    targets: torch.Tensor  # (B, L) w1 .. wn <eos> <pad>..

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def make_collate(vocab: Vocab) -> Callable[[list], Batch]:
    """Collate (visual, tokens) pairs into a padded Batch; unreadable media (None) is dropped."""

    def collate(samples: list[tuple[torch.Tensor | None, list[int]]]) -> Batch:
        samples = [s for s in samples if s[0] is not None]
        if not samples:
            raise DatasetError("a whole batch of media failed to load")
        visual = torch.nn.utils.rnn.pad_sequence([s[0] for s in samples], batch_first=True)
        lengths = torch.tensor([len(s[0]) for s in samples])
        width = max(len(s[1]) for s in samples) + 1
        inputs = torch.full((len(samples), width), vocab.pad_id, dtype=torch.long)
        targets = torch.full((len(samples), width), vocab.pad_id, dtype=torch.long)
        for row, (_, tokens) in enumerate(samples):
            inputs[row, : len(tokens) + 1] = torch.tensor([vocab.bos_id, *tokens])
            targets[row, : len(tokens) + 1] = torch.tensor([*tokens, vocab.eos_id])
        return Batch(visual, lengths, inputs, targets)

    return collate


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


# -- distributed ---------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())


def setup_runtime(device: str) -> Runtime:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return Runtime(resolved, rank, world)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- the recipe ----------------------------------------------------------------------------


def read_splits(data: DataConfig) -> tuple[list[CaptionItem], list[CaptionItem]]:
    """Train items (with captions) and validation items, per the data config."""
    root = Path(data.root) if data.root else None
    hint = f"data.max_skipped_share (now {data.max_skipped_share})"

    def read(source: str, split: str) -> list[CaptionItem]:
        result = load_dataset(source, root=root, split=split, on_error=data.on_error)
        return check_skipped(result, data.max_skipped_share, allow_hint=hint).items

    train = [item for item in read(data.train, "train") if item.captions]
    val_source = data.val or data.train
    val = [item for item in read(val_source, "val") if item.captions][: data.max_val_items]
    if not train:
        raise DatasetError(f"{data.train}: no training items with captions")
    if not val:
        raise DatasetError(f"{val_source}: no validation items (split 'val') with captions")
    return train, val


def build_configs(config: TrainConfig, vocab: Vocab) -> tuple[ModelConfig, PreprocessConfig]:
    model_config, preprocess = preset(config.preset)
    model_config = from_dict(ModelConfig, {**to_dict(model_config), **config.model}, where="model")
    preprocess = from_dict(
        PreprocessConfig, {**to_dict(preprocess), **config.preprocess}, where="preprocess"
    )
    model_config.vocab_size = len(vocab)
    return model_config, preprocess


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

    resume_dir = out / "last"
    resuming = config.resume and (resume_dir / "config.json").exists()
    if resuming:
        checkpoint = load_checkpoint(resume_dir)
        vocab, model, preprocess = checkpoint.vocab, checkpoint.model, checkpoint.preprocess
        try:
            state = json.loads((resume_dir / "train_state.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{resume_dir}: cannot resume ({exc}); start without --resume"
            ) from exc
        log.info("resuming from %s (epoch %d)", resume_dir, state["epoch"])
    else:
        vocab = Vocab.build(
            (c for item in train_items for c in item.captions), min_count=config.data.min_count
        )
        model_config, preprocess = build_configs(config, vocab)
        model = create_model(model_config)
        state = {"epoch": 0, "step": 0, "best": -1.0, "stale": 0, "stopped": False, "history": []}
        if runtime.is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log
    model.to(runtime.device)

    # Phase 1: frozen CNN, decoder trained on cached features.
    if model.config.encoder.frozen and state["epoch"] < config.epochs and not state["stopped"]:
        cache_dir = Path(config.features or out / "features")
        if runtime.is_main:
            extract_features(
                train_items + val_items,
                model.encoder,
                preprocess,
                cache_dir,
                num_workers=config.num_workers,
                device=runtime.device,
            )
        runtime.barrier()
        cache = FeatureCache.open(cache_dir)
        dataset: Dataset = CachedFeaturePairs(
            train_items, vocab, config.data.max_caption_length, cache, config.data.video_repeats
        )
        state = _run_phase(
            config, runtime, model, vocab, preprocess, dataset, val_items, ("features", cache),
            epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, state=state,
        )  # fmt: skip

    # Phase 2 (optional): fine-tune the CNN end to end, starting from the best frozen epoch.
    if config.finetune_epochs > 0:
        if model.config.encoder.frozen:
            model = load_checkpoint(out / "best").model.to(runtime.device)
            model.encoder.set_frozen(False)
            state.update(
                stale=0, stopped=False, finetune_until=state["epoch"] + config.finetune_epochs
            )
        dataset = PixelPairs(
            train_items,
            vocab,
            config.data.max_caption_length,
            preprocess,
            config.data.video_repeats,
        )
        state = _run_phase(
            config, runtime, model, vocab, preprocess, dataset, val_items, ("pixels", None),
            epochs=state["finetune_until"], lr=config.finetune_lr,
            batch_size=config.finetune_batch_size, state=state,
        )  # fmt: skip

    if runtime.is_main:
        history = state["history"]
        _plot_curves(history, out / "curves.png")
        summary = {
            "best_val_cider_d": state["best"],
            "epochs_run": state["epoch"],
            "train_seconds": round(time.perf_counter() - started, 1),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if config.export:
            copy_checkpoint(out / "best", Path(config.export))
            log.info("exported the best checkpoint to %s", config.export)
        log.info("done: %s", summary)
    runtime.barrier()
    return out / "best"


def _run_phase(
    config: TrainConfig,
    runtime: Runtime,
    model: CaptionModel,
    vocab: Vocab,
    preprocess: PreprocessConfig,
    dataset: Dataset,
    val_items: list[CaptionItem],
    val_input: tuple[str, FeatureCache | None],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    state: dict[str, Any],
) -> dict[str, Any]:
    out = Path(config.out_dir)
    sampler = (
        DistributedSampler(dataset, runtime.world, runtime.rank, shuffle=True, seed=config.seed)
        if runtime.world > 1
        else None
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        collate_fn=make_collate(vocab),
        num_workers=config.num_workers if val_input[0] == "pixels" else 0,
        drop_last=len(dataset) > batch_size * runtime.world,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)
    first_epoch = state["epoch"]
    phase = "finetune" if val_input[0] == "pixels" else "frozen"
    # The schedule spans the whole phase, so a resumed run follows the same LR curve.
    phase_start = state.setdefault(f"{phase}_start_epoch", first_epoch)
    total_steps = max(1, (epochs - phase_start) * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(config.warmup_steps, total_steps // 4), total_steps)
    )
    saved = out / "last" / "optimizer.safetensors"
    if config.resume and saved.exists() and state.get("optimizer_phase") == phase:
        _load_optimizer(out / "last", optimizer, scheduler, state)
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

    for epoch in range(first_epoch, epochs):
        # Shuffle order and dropout depend on the epoch only, so a resumed run continues exactly.
        torch.manual_seed(config.seed * 1000 + epoch + runtime.rank)
        generator.manual_seed(config.seed * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        losses = []
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not runtime.is_main, leave=False
        )
        for batch in bar:
            batch = batch.to(runtime.device)
            visual = {"features" if val_input[0] == "features" else "frames": batch.visual}
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext()
            with autocast:
                logits = wrapped(batch.inputs, batch.lengths, **visual)
                loss = caption_loss(logits, batch.targets, vocab.pad_id, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state["step"] += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        state["epoch"] = epoch + 1
        stop = False
        if runtime.is_main:
            metrics = validate(model, vocab, val_items, val_input, preprocess, runtime.device)
            record = {
                "epoch": epoch + 1,
                "step": state["step"],
                "phase": phase,
                "train_loss": round(float(np.mean(losses)), 4) if losses else None,
                "lr": scheduler.get_last_lr()[0],
                **metrics,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            state["history"].append(record)
            with (out / "metrics.jsonl").open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", epoch + 1, {k: record[k] for k in record if k != "time"})
            score = metrics.get("CIDEr-D", 0.0)
            if score > state["best"]:
                state["best"], state["stale"] = score, 0
                _save_model(out / "best", model, vocab, preprocess, config, record)
            else:
                state["stale"] += 1
            stop = state["stopped"] = state["stale"] >= config.patience
            optim = (optimizer, scheduler)
            _save_state(out / "last", model, vocab, preprocess, config, state, optim, runtime)
            if stop:
                log.info("early stopping: no better CIDEr-D for %d epochs", config.patience)
        if runtime.broadcast_flag(stop):
            break
    return state


@torch.inference_mode()
def validate(
    model: CaptionModel,
    vocab: Vocab,
    items: list[CaptionItem],
    val_input: tuple[str, FeatureCache | None],
    preprocess: PreprocessConfig,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Greedy captions for the validation items, scored with CIDEr-D (and scene accuracy)."""
    model.eval()
    predictions: dict[str, str] = {}
    kind, cache = val_input
    options = DecodingOptions(beam_size=1)
    for chunk in _chunks(items, batch_size):
        if kind == "features":
            assert cache is not None
            position = cache.position()
            chunk = [item for item in chunk if item.id not in cache.failed]
            tensors = [
                torch.from_numpy(np.asarray(cache.features(position[i.id]), dtype=np.float32))
                for i in chunk
            ]
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
        visual = model.encode(lengths, **{"features" if kind == "features" else "frames": padded})
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
    folder: Path,
    model: CaptionModel,
    vocab: Vocab,
    preprocess: PreprocessConfig,
    config: TrainConfig,
    record: dict[str, Any] | None,
) -> None:
    metadata = {
        "name": config.name,
        "version": config.version,
        "captioner_version": __version__,
        "data": {"train": config.data.train, "val": config.data.val or config.data.train},
        "validation": record,
        "train_config": to_dict(config),
    }
    save_checkpoint(Checkpoint(model, vocab, preprocess, DecodingOptions(), metadata), folder)


def _save_state(
    folder: Path,
    model: CaptionModel,
    vocab: Vocab,
    preprocess: PreprocessConfig,
    config: TrainConfig,
    state: dict[str, Any],
    optim: tuple[torch.optim.Optimizer, Any],
    runtime: Runtime,
) -> None:
    """The resumable state: model checkpoint + optimizer tensors (safetensors) + counters (JSON)."""
    if not runtime.is_main:
        return
    _save_model(folder, model, vocab, preprocess, config, None)
    optimizer, scheduler = optim
    tensors, layout = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors.tmp"))
    state = {**state, "optimizer_layout": layout, "scheduler": scheduler.state_dict()}
    state["optimizer_phase"] = "finetune" if not model.config.encoder.frozen else "frozen"
    (folder / "train_state.json.tmp").write_text(json.dumps(state, default=str))
    # Renames last, the state file after the tensors: a kill mid-save leaves the previous state.
    os.replace(folder / "optimizer.safetensors.tmp", folder / "optimizer.safetensors")
    os.replace(folder / "train_state.json.tmp", folder / "train_state.json")


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, values in state_dict["state"].items():
        layout["state"][str(index)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
                layout["state"][str(index)][name] = "tensor"
            else:
                layout["state"][str(index)][name] = value
    return tensors, layout


def _load_optimizer(
    folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]
) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    layout = state.pop("optimizer_layout")
    restored = {"param_groups": layout["param_groups"], "state": {}}
    for index, values in layout["state"].items():
        restored["state"][int(index)] = {
            name: tensors[f"{index}.{name}"] if value == "tensor" else value
            for name, value in values.items()
        }
    optimizer.load_state_dict(restored)
    scheduler.load_state_dict(state.pop("scheduler"))


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


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy only the files a checkpoint consists of (not the training state)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(source / name, target / name)
