"""What training reads: the train and validation items, and caption pairs in padded batches.

``read_splits`` reads the items a data config names. A pair is one caption of an item with the
item's visual input: its rows of the frozen CNN's feature cache (``CachedFeaturePairs``) or its
decoded pixels (``PixelPairs``, for fine-tuning the CNN); ``make_collate`` pads pairs into a
``Batch`` for teacher forcing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from captioner.config import DataConfig, PreprocessConfig
from captioner.data.features import FeatureCache, MediaDataset
from captioner.data.items import CaptionItem
from captioner.data.readers import ReadResult, check_skipped, load_dataset
from captioner.errors import ConfigError, DatasetError
from captioner.vocab import Vocab


def read_splits(data: DataConfig) -> tuple[list[CaptionItem], list[CaptionItem]]:
    """Train items (with captions) and validation items, per the data config."""
    root = Path(data.root) if data.root else None
    hint = f"data.max_skipped_share (now {data.max_skipped_share})"

    def read(source: str, split: str) -> ReadResult:
        result = load_dataset(source, root=root, split=split, on_error=data.on_error)
        return check_skipped(result, data.max_skipped_share, allow_hint=hint)

    train_file = read(data.train, "train")
    if data.val is None and not train_file.has_splits:
        raise ConfigError(
            f"{data.train} has no splits (a COCO captions file holds one split), so its images "
            "cannot also validate the model: set data.val to the matching val file "
            "(captions_val2014.json), or train from a Karpathy split file (dataset_coco.json)"
        )
    train = [item for item in train_file.items if item.captions]
    val_source = data.val or data.train
    val = [item for item in read(val_source, "val").items if item.captions][: data.max_val_items]
    if not train:
        raise DatasetError(f"{data.train}: no training items with captions")
    if not val:
        raise DatasetError(f"{val_source}: no validation items (split 'val') with captions")
    return train, val


def _encode_caption(vocab: Vocab, caption: str, max_length: int) -> list[int]:
    return vocab.encode(caption)[:max_length]


class CaptionPairs(Dataset):
    """(item, caption) pairs; each yields (item index, caption token ids)."""

    def __init__(
        self, items: Sequence[CaptionItem], vocab: Vocab, max_length: int, video_repeats: int = 1
    ) -> None:
        self.pairs = [
            (i, _encode_caption(vocab, caption, max_length))
            for i, item in enumerate(items)
            for caption in item.captions * (video_repeats if item.kind == "video" else 1)
        ]

    def __len__(self) -> int:
        return len(self.pairs)


class CachedFeaturePairs(CaptionPairs):
    """Pairs whose visual input is a row range of the feature cache."""

    def __init__(
        self,
        items: Sequence[CaptionItem],
        vocab: Vocab,
        max_length: int,
        cache: FeatureCache,
        video_repeats: int = 1,
    ) -> None:
        position = cache.position()
        kept = [item for item in items if item.id not in cache.failed]
        super().__init__(kept, vocab, max_length, video_repeats)
        self.items = kept  # Batch.items indexes these
        self.rows = [position[item.id] for item in kept]
        self.cache = cache

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int], int]:
        item_index, tokens = self.pairs[i]
        return self.cache.tensor(self.rows[item_index]), tokens, item_index

    def item_captions(self) -> list[list[list[int]]]:
        """Each kept item's captions as token ids, in item order (``Batch.items`` indexes them)."""
        captions: list[list[list[int]]] = [[] for _ in self.rows]
        for item_index, tokens in self.pairs:
            captions[item_index].append(tokens)
        return captions

    def item_features(self, chunk_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The kept items' cached features in item order: zero-padded chunks (B, T, D) and
        their lengths (B,)."""
        for start in range(0, len(self.rows), chunk_size):
            chunk = [self.cache.tensor(row) for row in self.rows[start : start + chunk_size]]
            lengths = torch.tensor([len(c) for c in chunk])
            yield torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), lengths


class PixelPairs(CaptionPairs):
    """Pairs whose visual input is decoded pixels (for fine-tuning the CNN)."""

    def __init__(
        self,
        items: Sequence[CaptionItem],
        vocab: Vocab,
        max_length: int,
        preprocess: PreprocessConfig,
        video_repeats: int = 1,
    ) -> None:
        super().__init__(items, vocab, max_length, video_repeats)
        self.media = MediaDataset(items, preprocess)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, list[int], int]:
        item_index, tokens = self.pairs[i]
        _, pixels, _ = self.media[item_index]
        return pixels, tokens, item_index


@dataclass
class Batch:
    """Padded pairs for teacher forcing: the decoder reads ``inputs`` and predicts ``targets``."""

    visual: torch.Tensor  # (B, T, D) features or (B, T, 3, S, S) pixels, zero-padded in T
    lengths: torch.Tensor  # (B,) frames per item
    inputs: torch.Tensor  # (B, L) <bos> w1 .. wn <pad>..
    targets: torch.Tensor  # (B, L) w1 .. wn <eos> <pad>..
    items: torch.Tensor  # (B,) which item each pair is (its caption-memory row)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def make_collate(vocab: Vocab) -> Callable[[list], Batch]:
    """Collate (visual, tokens) pairs into a padded Batch; unreadable media (None) is dropped."""

    def collate(samples: list[tuple[torch.Tensor | None, list[int], int]]) -> Batch:
        samples = [s for s in samples if s[0] is not None]
        if not samples:
            raise DatasetError("a whole batch of media failed to load")
        visual = torch.nn.utils.rnn.pad_sequence([s[0] for s in samples], batch_first=True)
        lengths = torch.tensor([len(s[0]) for s in samples])
        width = max(len(s[1]) for s in samples) + 1
        inputs = torch.full((len(samples), width), vocab.pad_id, dtype=torch.long)
        targets = torch.full((len(samples), width), vocab.pad_id, dtype=torch.long)
        for row, (_, tokens, _) in enumerate(samples):
            inputs[row, : len(tokens) + 1] = torch.tensor([vocab.bos_id, *tokens])
            targets[row, : len(tokens) + 1] = torch.tensor([*tokens, vocab.eos_id])
        items = torch.tensor([s[2] for s in samples])
        return Batch(visual, lengths, inputs, targets, items)

    return collate
