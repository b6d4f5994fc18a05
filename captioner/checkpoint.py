"""The only place that saves and loads models.

A checkpoint is a folder with ``model.safetensors`` (weights, no pickles) and ``config.json``
(format version, model config, preprocessing, vocab, decoding defaults, training metadata, and
the weights' SHA-256). Loading validates all of it and fails with one ``ModelLoadError`` that
names the file, the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from captioner.errors import CaptionerError, ModelLoadError
from captioner.model import CaptionModel
from captioner.vocab import Vocab
from captioner.weights import mismatch

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 2  # 2: grid-cell encoder config and attention decoder
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


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
