from __future__ import annotations

import pytest

from captioner.config import (
    DecodingOptions,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_train_config,
    preset,
    to_dict,
)
from captioner.data.items import CaptionItem
from captioner.errors import ConfigError, InvalidOptionError


def test_config_round_trips_through_a_dict() -> None:
    config, _ = preset("default")
    assert from_dict(ModelConfig, to_dict(config)) == config


def test_unknown_and_mistyped_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"encoder: unknown key\(s\) \['grid'\]"):
        from_dict(ModelConfig, {"encoder": {"grid": 3}})
    with pytest.raises(ConfigError, match="frame_dim: expected int"):
        from_dict(ModelConfig, {"frame_dim": "big"})


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 11}, "beam_size"),
        ({"max_length": 0}, "max_length"),
        ({"beam_size": 2, "num_captions": 3}, "num_captions"),
        ({"min_length": 9, "max_length": 5}, "min_length"),
        ({"length_penalty": -1.0}, "length_penalty"),
        ({"no_repeat_ngram_size": True}, "no_repeat_ngram_size"),
    ],
)
def test_decoding_option_ranges(options, param) -> None:
    with pytest.raises(InvalidOptionError) as info:
        DecodingOptions(**options).validate()
    assert info.value.param == param


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("huge")


def test_config_files_and_overrides(tmp_path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 3\n[data]\ntrain = "m.jsonl"\n')
    assert load_train_config(toml, ["version=2"]).version == "2"
    config = load_train_config(toml, ["lr=0.01", "data.min_count=4", "model.frame_dim=64"])
    assert (config.epochs, config.lr, config.data.min_count) == (3, 0.01, 4)
    assert config.model == {"frame_dim": 64}
    yaml = tmp_path / "c.yaml"
    yaml.write_text("epochs: 7\ndata:\n  train: m.jsonl\n")
    assert load_train_config(yaml).epochs == 7
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(toml, ["epoch=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_train_config(toml, ["epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        load_train_config(toml, ["data=1", "data.train=x"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_train_config(broken)


def test_the_model_configs_of_a_recipe_are_its_preset_with_its_overrides() -> None:
    recipe = TrainConfig(preset="test-tiny", model={"frame_dim": 24}, preprocess={"num_frames": 4})
    model, preprocess = recipe.model_configs(vocab_size=11)
    assert (model.frame_dim, model.vocab_size, preprocess.num_frames) == (24, 11, 4)
    assert model.encoder == preset("test-tiny")[0].encoder


def test_a_recipe_whose_cnn_is_not_frozen_is_refused_with_the_fix() -> None:
    # The frozen phase trains on cached CNN features; a trainable CNN belongs to fine-tuning.
    recipe = TrainConfig(preset="test-tiny", model={"encoder": {"frozen": False}})
    with pytest.raises(ConfigError, match="set finetune_epochs"):
        recipe.model_configs(vocab_size=11)


@pytest.mark.parametrize(
    ("pairs", "captions", "epochs", "patience", "min_count"),
    [
        (600, 600, 30, 7, 1),  # a few hundred images: many passes, every word kept
        (7_041, 7_041, 8, 4, 1),  # a few thousand: the floor of 8 epochs
        (400, 400, 40, 10, 1),  # very small: capped at 40 epochs
        (590_000, 590_000, 8, 4, 5),  # COCO-sized: words seen fewer than 5 times dropped
        (50_000, 50_000, 8, 4, 3),
    ],
)
def test_the_automatic_recipe_follows_the_data_size(
    pairs, captions, epochs, patience, min_count
) -> None:
    per_item = captions // pairs if captions >= pairs else 1
    items = [_item(per_item)] * (pairs // per_item)
    resolved = TrainConfig().resolved(items)
    assert (resolved.epochs, resolved.patience, resolved.data.min_count) == (
        epochs,
        patience,
        min_count,
    )


def test_explicit_settings_win_over_the_automatic_recipe() -> None:
    config = load_train_config(None, ["epochs=3", "patience=2", "data.min_count=4"])
    resolved = config.resolved([_item(1)] * 600)
    assert (resolved.epochs, resolved.patience, resolved.data.min_count) == (3, 2, 4)


def test_retrieval_is_on_for_the_default_preset_and_can_be_turned_off() -> None:
    assert TrainConfig().model_configs(vocab_size=9)[0].retrieval_k == 5
    assert TrainConfig(retrieval_k=0).model_configs(vocab_size=9)[0].retrieval_k == 0
    assert TrainConfig(model={"retrieval_k": 2}).model_configs(vocab_size=9)[0].retrieval_k == 2
    # Presets other than "default" keep their own model (the tiny test preset has none).
    assert TrainConfig(preset="test-tiny").model_configs(vocab_size=9)[0].retrieval_k == 0
    with pytest.raises(ConfigError, match="set retrieval_k = 0 to fine-tune"):
        TrainConfig(finetune_epochs=1).model_configs(vocab_size=9)


def _item(captions: int, kind: str = "image") -> CaptionItem:
    return CaptionItem("x", (), kind, ("a caption",) * captions, "train")


def test_the_automatic_epochs_count_video_captions_as_often_as_they_are_read() -> None:
    config = load_train_config(None, ["data.video_repeats=3"])
    assert config.resolved([_item(1, "video")] * 200).epochs == 30  # 600 pairs a pass
