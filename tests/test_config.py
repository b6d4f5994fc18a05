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
