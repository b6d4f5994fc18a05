"""Where a model runs and in which number format: one answer for training and for serving.

Under ``torchrun``, training also joins the process group here (``setup_runtime``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


@dataclass
class Runtime:
    """Where this process trains: its device, and its rank among ``world`` processes."""

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
