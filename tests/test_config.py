from __future__ import annotations

import pytest

from captioner.config import DecodingOptions, ModelConfig, from_dict, preset, to_dict
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
