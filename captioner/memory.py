"""The caption memory of a retrieval-augmented model: training items' embeddings and words.

Each row is one training item: its pooled encoder embedding (the key) and the distinct words
of its captions, each with the share of its captions that use it. A query's k most similar
rows, softmax-weighted by similarity, give a bag of words over the vocabulary (B, V): what
captions of pictures like this one say. The memory is part of the model's state (buffers), so
it travels inside the checkpoint's safetensors like any weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig


class CaptionMemory(nn.Module):
    """Keys (P, E) and padded word lists (P, W) of the training items; see the module doc."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.k = config.retrieval_k
        self.temperature = config.retrieval_temperature
        self.vocab_size = config.vocab_size
        items, words = config.retrieval_items, config.retrieval_words
        embedding_dim = sum(config.encoder.stage_channels)  # encoder.pooled_embedding's size
        self.register_buffer("keys", torch.zeros(items, embedding_dim, dtype=torch.float16))
        self.register_buffer("words", torch.zeros(items, words, dtype=torch.int32))
        self.register_buffer("shares", torch.zeros(items, words, dtype=torch.float16))

    @torch.no_grad()
    def fill(self, keys: torch.Tensor, token_lists: Sequence[Sequence[Sequence[int]]]) -> None:
        """Store unit-length keys (P, E) and each item's captions as token ids (unk dropped)."""
        if len(keys) != len(token_lists) or len(keys) != len(self.keys):
            raise ValueError(f"the memory holds {len(self.keys)} rows, got {len(keys)} keys")
        self.keys.copy_(F.normalize(keys.float(), dim=-1).to(self.keys.dtype))
        self.words.zero_()
        self.shares.zero_()
        for row, captions in enumerate(token_lists):
            counts: dict[int, int] = {}
            for caption in captions:
                for token in set(caption):
                    counts[token] = counts.get(token, 0) + 1
            ranked = sorted(counts, key=lambda t: (-counts[t], t))[: self.words.shape[1]]
            for column, token in enumerate(ranked):
                self.words[row, column] = token
                self.shares[row, column] = counts[token] / max(1, len(captions))

    @torch.no_grad()
    def bag_of_words(
        self, embeddings: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings (B, E) -> neighbour word weights (B, V), each row summing over neighbours.

        ``exclude`` (B,) names one memory row per query that must not be retrieved (the item
        itself, during training: a model that always finds its own caption learns to copy).
        """
        similarity = F.normalize(embeddings.float(), dim=-1) @ self.keys.float().T  # (B, P)
        if exclude is not None:
            similarity[torch.arange(len(similarity)), exclude] = float("-inf")
        k = min(self.k, similarity.shape[1] - (1 if exclude is not None else 0))
        top, rows = similarity.topk(max(k, 1), dim=-1)  # (B, k)
        weights = torch.softmax(top / self.temperature, dim=-1)  # (B, k)
        words = self.words[rows].long()  # (B, k, W)
        shares = self.shares[rows].float() * weights.unsqueeze(-1)  # (B, k, W)
        bag = torch.zeros(len(embeddings), self.vocab_size, device=embeddings.device)
        bag.scatter_add_(1, words.flatten(1), shares.flatten(1))
        bag[:, 0] = 0.0  # column 0 is <pad>, where the padded slots of each row were added
        return bag


def attach_memory(
    model: nn.Module, keys: torch.Tensor, token_lists: Sequence[Sequence[Sequence[int]]]
) -> None:
    """Give a retrieval-augmented model its caption memory: one row per training item.

    Sizes the memory for these items (the config records them, so a checkpoint rebuilds it)
    and fills it with their unit-length keys (P, E) and their captions' token ids.
    """
    config = model.config
    config.retrieval_items = len(token_lists)
    config.retrieval_words = max(
        (len({t for caption in captions for t in caption}) for captions in token_lists),
        default=1,
    )
    memory = CaptionMemory(config).to(keys.device)
    memory.fill(keys, token_lists)
    model.retrieval = memory
