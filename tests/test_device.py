from __future__ import annotations

import pytest
import torch

from captioner.device import resolve_device, resolve_precision
from captioner.errors import ConfigError


def test_auto_device_is_cuda_when_present_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_or_unavailable_devices_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_precision_is_fp32_on_the_cpu_unless_asked() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision(cpu) == torch.float32
    assert resolve_precision(cpu, "bf16") == torch.bfloat16
    assert resolve_precision(cpu, "fp16") == torch.float16


def test_an_unknown_precision_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; choose auto, fp32, bf16"):
        resolve_precision(torch.device("cpu"), "fp8")


def test_a_captioner_with_an_unknown_precision_fails_as_a_config_error(tiny_checkpoint) -> None:
    from captioner.inference import Captioner

    with pytest.raises(ConfigError, match="unknown precision"):
        Captioner.load(tiny_checkpoint, device="cpu", precision="int4")
