"""Where a model runs and in which number format: one answer for training and for serving."""

from __future__ import annotations

import torch

from captioner.errors import ConfigError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to run on: "auto" picks CUDA when present, else the CPU.

    An unknown device name, or CUDA asked for where there is none, is a ConfigError.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but CUDA is not available here")
    return resolved


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """fp32 on the CPU; bf16 (or fp16 on older GPUs) autocast on CUDA.

    A precision other than auto, fp32, bf16 or fp16 is a ConfigError.
    """
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]
