"""The one place that reads weight files and matches state dicts against a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from captioner.errors import ModelLoadError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ModelLoadError(f"{path}: cannot read weights ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state dict of tensors")
    return state


def mismatch(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    ignore: frozenset[str] = frozenset(),
) -> str | None:
    """None when ``state`` fits ``expected`` key for key and shape for shape; else a summary."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - ignore)
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        return None
    return (
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
        f"(e.g. {unexpected[:3]}), {len(wrong)} with the wrong shape (e.g. {wrong[:3]})"
    )
