"""What every benchmark report says about where it ran, and where it is written."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(device: str = "cpu") -> str:
    """The machine a figure was measured on: the GPU's name (when ``device`` is one), the
    architecture and the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    where = f"{platform.machine()}, {cpus} CPUs"
    if device == "cpu":
        return f"{where}, CPU only"
    import torch

    return f"{torch.cuda.get_device_name(0)}, {where}"


def write_report(text: str, name: str, device: str, out: Path | None) -> Path:
    """Write a report to ``out``, or to benchmarks/results/<name>_<cpu|gpu>.json."""
    path = out or Path(f"benchmarks/results/{name}_{'cpu' if device == 'cpu' else 'gpu'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path
