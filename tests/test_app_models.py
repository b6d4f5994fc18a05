from __future__ import annotations

from captioner.config import DecodingOptions
from tests.app_support import tiny_client


def test_models_describes_model_preprocessing_options_and_limits(tiny_checkpoint) -> None:
    with tiny_client(tiny_checkpoint, max_frames=12, max_images=4) as client:
        body = client.get("/v1/models").json()
    (model,) = body["models"]
    assert {k: model[k] for k in ("name", "version", "device", "dtype")} == {
        "name": "tiny",
        "version": "0",
        "device": "cpu",
        "dtype": "float32",
    }
    assert model["preprocessing"]["image_size"] == 64
    assert model["retrieval_items"] == 0  # the tiny model decodes from the picture alone
    assert model["preprocessing"]["num_frames"] == 8
    low, high = DecodingOptions.LIMITS["beam_size"]
    assert model["options"]["beam_size"] == {"min": low, "max": high, "default": 3}
    assert set(model["options"]) == {
        "beam_size",
        "num_captions",
        "max_length",
        "length_penalty",
        "num_frames",
        "tags",
    }
    # The tiny model's CNN is not EfficientNet-Lite0, and it was saved without a domain summary.
    assert model["tags"] is False and "EfficientNet-Lite0" in model["tags_unavailable"]
    assert model["domain"] is None
    assert model["options"]["num_frames"] == {"min": 1, "max": 12, "default": 8}
    assert model["limits"]["max_images"] == 4 and model["limits"]["max_image_bytes"] == 65536
