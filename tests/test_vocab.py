from __future__ import annotations

import pytest

from captioner.errors import ConfigError
from captioner.vocab import Vocab, detokenize, tokenize


def test_tokenize_is_lowercase_ptb_like() -> None:
    assert tokenize("A Dog's ball, don't! T-shirt.") == [
        "a",
        "dog",
        "'s",
        "ball",
        "do",
        "n't",
        "t-shirt",
    ]
    assert detokenize(["a", "dog", "'s", "ball", "do", "n't"]) == "a dog's ball don't"


def test_build_orders_by_frequency_and_applies_min_count() -> None:
    vocab = Vocab.build(["a red circle", "a blue circle", "a rare zebra"], min_count=2)
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "circle"]
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.encode("A zebra circle") == [4, 3, 5]
    assert vocab.decode([1, 4, 5, 2, 4]) == "a circle"


def test_json_round_trip(tmp_path) -> None:
    vocab = Vocab.build(["a red circle moves left", "a green star"])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.itos == vocab.itos
    assert loaded.decode(vocab.encode("a red star")) == "a red star"


def test_invalid_vocab_files(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="starting with"):
        Vocab.from_dict({"format": "captioner-vocab", "tokens": ["a", "<pad>"]})
    with pytest.raises(ConfigError):
        Vocab(["a", "a"])
