"""Tokenizer and vocabulary. The vocab owns the special-token ids; nothing else hard-codes them."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

# Close to the PTB tokenization that the COCO metrics apply: lowercase, punctuation dropped,
# clitics split off ("dog's" -> "dog 's", "don't" -> "do n't"), hyphenated words kept whole.
_CLITIC = re.compile(r"([a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens, PTB style, without punctuation."""
    lowered = text.lower().replace("\u2019", "'")
    return _TOKEN.findall(_CLITIC.sub(r"\1 \2", lowered))


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens into a readable caption, reattaching clitics."""
    text = " ".join(tokens)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)


class Vocab:
    """Word <-> id mapping with <pad>=0, <bos>=1, <eos>=2, <unk>=3."""

    FORMAT = "captioner-vocab"

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        duplicates = [w for w, n in Counter(words).items() if n > 1]
        if duplicates or any(w in SPECIALS for w in words):
            raise ConfigError(f"vocab words must be unique and not special tokens: {duplicates}")
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.min_count = min_count

    pad_id = property(lambda self: 0)
    bos_id = property(lambda self: 1)
    eos_id = property(lambda self: 2)
    unk_id = property(lambda self: 3)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocab:
        """A vocab of every token seen at least ``min_count`` times, most frequent first."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        kept = [w for w, n in counts.items() if n >= min_count and w not in SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))  # frequency, then alphabetical: deterministic
        return cls(kept, min_count=min_count)

    def encode(self, text: str) -> list[int]:
        """Token ids of a caption, without <bos>/<eos>; unknown words map to <unk>."""
        return [self.stoi.get(tok, self.unk_id) for tok in tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The caption for a list of ids: stops at <eos>, skips <pad>/<bos>."""
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return detokenize(words)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "min_count": self.min_count, "tokens": self.itos}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocab:
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ConfigError(f"not a captioner vocab (expected format {cls.FORMAT!r})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ConfigError(f"vocab tokens must be a list starting with {list(SPECIALS)}")
        return cls(tokens[len(SPECIALS) :], min_count=int(data.get("min_count", 1)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read vocab: {exc}") from exc
        return cls.from_dict(data)
