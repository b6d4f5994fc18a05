"""The only place that saves and loads models, and the training state that resumes a run.

A checkpoint is a folder with ``model.safetensors`` (weights, no pickles) and ``config.json``
(format version, model config, preprocessing, vocab, decoding defaults, training metadata, and
the weights' SHA-256). Loading validates all of it and fails with one ``ModelLoadError`` that
names the file, the problem and the fix.

Training's ``last`` checkpoint also holds what a resume needs besides the weights:
``train_state.json`` (a :class:`TrainState` and the optimizer's and LR schedule's settings) and
``optimizer.safetensors`` (the optimizer's tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.config import (
    DecodingOptions,
    ModelConfig,
    PreprocessConfig,
    from_dict,
    to_dict,
)
from captioner.errors import CaptionerError, ConfigError, ModelLoadError
from captioner.model import CaptionModel
from captioner.vocab import Vocab
from captioner.weights import mismatch

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 2  # 2: grid-cell encoder config and attention decoder
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "captioner-train-state"


@dataclass
class Checkpoint:
    """A model with everything that must travel with it."""

    model: CaptionModel
    vocab: Vocab
    preprocess: PreprocessConfig
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(checkpoint: Checkpoint, directory: str | Path) -> Path:
    """Write ``checkpoint`` into ``directory`` (created if needed); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in checkpoint.model.state_dict().items()}
    # Write to temporary names, then rename: a crash never leaves a half-written checkpoint.
    tmp_weights = weights_path.with_suffix(".tmp")
    save_file(state, str(tmp_weights), metadata={"format": FORMAT})
    tmp_weights.chmod(0o644)  # safetensors creates 0600 files; checkpoints are meant to be shared
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(checkpoint.model.config),
        "preprocess": to_dict(checkpoint.preprocess),
        "decoding": to_dict(checkpoint.decoding),
        "vocab": checkpoint.vocab.to_dict(),
        "metadata": {
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **checkpoint.metadata,
        },
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(tmp_weights)},
    }
    tmp_config = directory / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, directory / CONFIG_FILE)
    return directory


def load_checkpoint(
    directory: str | Path, *, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load and validate a checkpoint folder (or its config.json)."""
    directory, config_path, config = _read_config(directory)
    try:
        model_config = from_dict(ModelConfig, config["model"], where="model")
        preprocess = from_dict(PreprocessConfig, config["preprocess"], where="preprocess")
        decoding = from_dict(DecodingOptions, config.get("decoding", {}), where="decoding")
        decoding.validate()
        vocab = Vocab.from_dict(config["vocab"])
    except KeyError as exc:
        raise ModelLoadError(f"{config_path}: missing section {exc}") from exc
    except CaptionerError as exc:
        raise ModelLoadError(f"{config_path}: invalid config: {exc}") from exc
    if model_config.vocab_size != len(vocab):
        raise ModelLoadError(
            f"{config_path}: model vocab_size {model_config.vocab_size} does not match the "
            f"{len(vocab)} vocab tokens; the vocab does not belong to this model"
        )
    state = _read_weights(directory, config, config_path)
    # Every weight comes from the checkpoint, so the pretrained encoder weights are not loaded.
    model_config.encoder.pretrained = None
    try:
        model = CaptionModel(model_config)
    except (CaptionerError, RuntimeError, ValueError) as exc:  # e.g. a negative layer size
        raise ModelLoadError(f"{config_path}: cannot build the model: {exc}") from exc
    _check_state(model, state, directory / WEIGHTS_FILE)
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    return Checkpoint(model, vocab, preprocess, decoding, config.get("metadata", {}))


def load_configs(directory: str | Path) -> tuple[PreprocessConfig, DecodingOptions]:
    """A checkpoint's preprocessing and default decoding options, without building the model:
    what a batch job's driver and its decode workers need."""
    _, config_path, config = _read_config(directory)
    try:
        preprocess = from_dict(PreprocessConfig, config["preprocess"], where="preprocess")
        decoding = from_dict(DecodingOptions, config.get("decoding", {}), where="decoding")
        return preprocess, decoding.validate()
    except KeyError as exc:
        raise ModelLoadError(f"{config_path}: missing section {exc}") from exc
    except CaptionerError as exc:
        raise ModelLoadError(f"{config_path}: invalid config: {exc}") from exc


def _read_config(directory: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """The checkpoint folder, its config.json's path and contents, checked for format."""
    directory = Path(directory)
    if directory.name == CONFIG_FILE:
        directory = directory.parent
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such checkpoint folder")
    if not config_path.is_file():
        raise ModelLoadError(
            f"{directory}: not a captioner checkpoint ({CONFIG_FILE} is missing); "
            "pass the folder that `captioner train` wrote"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: not valid JSON ({exc}); the file is corrupt") from exc
    _check_format(config, config_path)
    return directory, config_path, config


def _check_format(config: Any, path: Path) -> None:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelLoadError(
            f"{path}: not a captioner checkpoint config (format is not {FORMAT!r})"
        )
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ModelLoadError(f"{path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: checkpoint format {version} is newer than this captioner supports "
            f"({FORMAT_VERSION}); upgrade captioner to load it"
        )
    if version < FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: checkpoint format {version} was written by a pre-release captioner whose "
            f"model this release cannot rebuild (format {FORMAT_VERSION}); retrain it with "
            "`captioner train`"
        )


def _read_weights(
    directory: Path, config: dict[str, Any], config_path: Path
) -> dict[str, torch.Tensor]:
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelLoadError(f"{weights_path}: weights file is missing")
    expected = config.get("weights", {}).get("sha256")
    if expected and _sha256(weights_path) != expected:
        raise ModelLoadError(
            f"{weights_path}: checksum does not match {config_path.name}; the file is corrupt, "
            "truncated or from another checkpoint"
        )
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{weights_path}: cannot read weights ({exc}); the file is corrupt"
        ) from exc


def _check_state(model: CaptionModel, state: dict[str, torch.Tensor], path: Path) -> None:
    problem = mismatch(model.state_dict(), state)
    if problem:
        raise ModelLoadError(
            f"{path}: weights do not match the model config: {problem}; "
            "the weights and config.json come from different models"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy the files a checkpoint consists of (not the training state beside them)."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(source / name, target / name)
    return target


# -- training state ------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a training run is: what a resume needs besides the weights and the optimizer."""

    # "frozen": the decoder trained on cached CNN features; "finetune": the CNN too, on pixels.
    phase: str = "frozen"
    phase_start: int = 0  # the epoch the phase began at: its LR schedule spans the whole phase
    epoch: int = 0  # epochs done, both phases together
    step: int = 0  # optimizer steps done
    best: float = -1.0  # the best validation CIDEr-D so far
    stale: int = 0  # epochs since the best one
    stopped: bool = False  # early stopping ended the phase
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch

    def begin(self, phase: str) -> None:
        """Start ``phase`` after the epochs done so far."""
        self.phase, self.phase_start, self.stale, self.stopped = phase, self.epoch, 0, False


def save_train_state(
    directory: str | Path,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Write ``state`` and the optimizer's and LR schedule's state beside a checkpoint."""
    directory = Path(directory)
    tensors, layout = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(directory / (OPTIMIZER_FILE + ".tmp")))
    saved = {
        "format": STATE_FORMAT,
        "state": to_dict(state),
        "optimizer": layout,
        "scheduler": scheduler.state_dict(),
    }
    (directory / (STATE_FILE + ".tmp")).write_text(json.dumps(saved, default=str))
    # Renames last, the state file after the tensors: a kill mid-save leaves the previous state.
    os.replace(directory / (OPTIMIZER_FILE + ".tmp"), directory / OPTIMIZER_FILE)
    os.replace(directory / (STATE_FILE + ".tmp"), directory / STATE_FILE)


def load_train_state(directory: str | Path) -> TrainState:
    """The state ``save_train_state`` wrote; a ConfigError when a run cannot resume from it."""
    return from_dict(TrainState, _read_state(Path(directory))["state"], where=STATE_FILE)


def load_optimizer_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore the optimizer and LR schedule ``save_train_state`` wrote."""
    directory = Path(directory)
    saved = _read_state(directory)
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    layout = saved["optimizer"]
    restored: dict[str, Any] = {"param_groups": layout["param_groups"], "state": {}}
    for index, values in layout["state"].items():
        restored["state"][int(index)] = {
            name: tensors[f"{index}.{name}"] if value == "tensor" else value
            for name, value in values.items()
        }
    optimizer.load_state_dict(restored)
    scheduler.load_state_dict(saved["scheduler"])


def _read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: cannot resume ({exc}); start without --resume") from exc
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise ConfigError(
            f"{path}: not a training state this release can resume (it was written by an "
            "older captioner); start without --resume"
        )
    return saved


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's tensors by name (for safetensors), and everything else (for JSON)."""
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
