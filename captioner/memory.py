"""The caption memory of a retrieval-augmented model: training items' embeddings and words.

Each row is one training item: its pooled encoder embedding (the key) and the distinct words
of its captions, each with the share of its captions that use it. A query's k most similar
rows, softmax-weighted by similarity, give a bag of words over the vocabulary (B, V): what
captions of pictures like this one say. The memory is part of the model's state (buffers), so
it travels inside the checkpoint's safetensors like any weight.

The key is either the pooled embedding (each stage's channels averaged over the frame, what the
nearest-neighbour baseline compares) or ``CellKey``: the frame's cells kept in place, so that
layout counts. Both are averaged over a clip's frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig
from captioner.encoder import pooled_embedding

CELL_KEY_FIT_ITEMS = 20_000  # items whose frames CellKey's projections are fitted on, at most


class CellKey(nn.Module):
    """Encoder features (B, T, D) -> unit keys (B, K) that keep where things are in the frame.

    Each cell's stages are normalised on their own (as in the pooled embedding) and centred on
    the training mean of that cell; a projection shared by all cells keeps their main C'
    directions; the frame's M x C' numbers are projected to their main K directions, each
    scaled by its variance to the power -1/4 (half-whitening: measured on the emoji set, it
    matched cosine similarity over all M x C numbers, which plain PCA did not). The principal
    directions are fitted on training frames (``fit``); a clip's key is its frames' mean.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        encoder = config.encoder
        self.cells, self.stage_channels = encoder.cells, tuple(encoder.stage_channels)
        channels = encoder.cell_channels
        cell_dim = min(config.retrieval_cell_dim, channels)
        self.key_dim = min(config.retrieval_key_dim, self.cells * cell_dim)
        self.register_buffer("cell_mean", torch.zeros(self.cells, channels))
        self.register_buffer("cell_projection", torch.zeros(channels, cell_dim))
        self.register_buffer("projection", torch.zeros(self.cells * cell_dim, self.key_dim))

    def _cells(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames' features (n, D) -> normalised, centred cells (n, M, C)."""
        cells = frames.float().reshape(len(frames), self.cells, -1)
        parts = cells.split(list(self.stage_channels), dim=-1)
        return torch.cat([F.normalize(part, dim=-1) for part in parts], -1) - self.cell_mean

    @torch.no_grad()
    def fit(self, frames: torch.Tensor) -> None:
        """Fit the projections on training frames' features (n, D)."""
        self.cell_mean.zero_()
        cells = self._cells(frames)
        self.cell_mean.copy_(cells.mean(0))
        cells = cells - self.cell_mean
        flat = cells.reshape(-1, cells.shape[-1]).double()
        _, vectors = torch.linalg.eigh(flat.T @ flat)  # ascending eigenvalues
        cell_dim = self.cell_projection.shape[1]
        self.cell_projection.copy_(vectors.flip(1)[:, :cell_dim].float())
        reduced = (cells @ self.cell_projection).flatten(1).double()  # (n, M*C')
        values, vectors = torch.linalg.eigh(reduced.T @ reduced / max(1, len(reduced)))
        values, vectors = values.flip(0)[: self.key_dim], vectors.flip(1)[:, : self.key_dim]
        # Directions the training frames do not span (fewer frames than dimensions) are
        # dropped: half-whitening would scale their noise up.
        spanned = values > values[0].clamp_min(1e-30) * 1e-6
        scale = torch.where(spanned, values.clamp_min(1e-30) ** -0.25, torch.zeros_like(values))
        self.projection.copy_((vectors * scale).float())

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, steps = features.shape[:2]
        frames = features.reshape(batch * steps, -1)
        keys = (self._cells(frames) @ self.cell_projection).flatten(1) @ self.projection
        keys = F.normalize(keys, dim=-1).reshape(batch, steps, -1)
        real = torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        return F.normalize((keys * real.unsqueeze(-1).to(keys.dtype)).sum(1), dim=-1)


class CaptionMemory(nn.Module):
    """Keys (P, E) and padded word lists (P, W) of the training items; see the module doc."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.k = config.retrieval_k
        self.temperature = config.retrieval_temperature
        self.vocab_size = config.vocab_size
        self.encoder_config = config.encoder
        items, words = config.retrieval_items, config.retrieval_words
        if config.retrieval_key == "cells":
            self.cell_key: CellKey | None = CellKey(config)
            embedding_dim = self.cell_key.key_dim
        else:
            self.cell_key = None
            embedding_dim = sum(config.encoder.stage_channels)  # pooled_embedding's size
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

    def key(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, T, D) of zero-padded sequences -> unit keys (B, E)."""
        if self.cell_key is not None:
            return self.cell_key(features, lengths)
        return pooled_embedding(features, lengths, self.encoder_config)

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
    model: nn.Module,
    token_lists: Sequence[Sequence[Sequence[int]]],
    sequences: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
) -> CaptionMemory:
    """Give a retrieval-augmented model its caption memory: one row per training item.

    ``token_lists`` holds each item's captions as token ids; ``sequences()`` yields the items'
    encoder features in the same order, as zero-padded chunks (B, T, D) with their lengths.
    Sizes the memory for these items (the config records them, so a checkpoint rebuilds it),
    fits its key on the training frames when the key needs fitting, and fills its rows.
    """
    config = model.config
    config.retrieval_items = len(token_lists)
    config.retrieval_words = max(
        (len({t for caption in captions for t in caption}) for captions in token_lists),
        default=1,
    )
    memory = CaptionMemory(config)
    if memory.cell_key is not None:
        memory.cell_key.fit(_sample_frames(sequences(), len(token_lists), CELL_KEY_FIT_ITEMS))
    keys = torch.cat([memory.key(chunk, lengths) for chunk, lengths in sequences()])
    memory.fill(keys, token_lists)
    model.retrieval = memory.to(next(model.parameters()).device)
    return memory


def _sample_frames(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], items: int, limit: int
) -> torch.Tensor:
    """The real frames (n, D) of every k-th of ``items`` sequences, k chosen so that about
    ``limit`` sequences are kept (memory stays bounded on large sets)."""
    step, index, frames = max(1, -(-items // limit)), 0, []
    for chunk, lengths in chunks:
        for sequence, length in zip(chunk, lengths.tolist(), strict=True):
            if index % step == 0:
                frames.append(sequence[:length])
            index += 1
    return torch.cat(frames)
