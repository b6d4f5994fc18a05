"""Tests for the caption memory of a retrieval-augmented model (captioner.memory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from captioner.config import preset
from captioner.encoder import pooled_embedding
from captioner.memory import CaptionMemory, attach_memory
from captioner.model import create_model
from captioner.vocab import Vocab

CAPTIONS = ["a red circle", "a blue square", "flag of egypt"]


def tiny_retrieval_model(vocab: Vocab, k: int = 2, key: str = "pooled"):
    torch.manual_seed(0)
    config, preprocess = preset("test-tiny")
    config.vocab_size, config.retrieval_k, config.retrieval_key = len(vocab), k, key
    return create_model(config).eval(), preprocess


def features_of(chunks: list[torch.Tensor]):
    """``attach_memory``'s ``sequences``: these (B, T, D) feature chunks, all frames real."""
    return lambda: [(chunk, torch.full((len(chunk),), chunk.shape[1])) for chunk in chunks]


def attach_with_keys(model, keys: torch.Tensor, captions: list[list[list[int]]]) -> None:
    """A memory with these exact keys: built from any features, then refilled."""
    dim = model.config.encoder.feature_dim
    attach_memory(model, captions, features_of([torch.rand(len(captions), 1, dim)]))
    model.retrieval.fill(keys, captions)


def test_bag_of_words_weights_the_neighbours_words_by_similarity() -> None:
    vocab = Vocab.build(CAPTIONS)
    model, _ = tiny_retrieval_model(vocab)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).repeat(1, 40)  # E = 16 + 64
    attach_with_keys(model, keys, [[vocab.encode(c)] for c in CAPTIONS])
    memory = model.retrieval
    assert isinstance(memory, CaptionMemory)
    assert model.config.retrieval_items == 3 and model.config.retrieval_words == 3
    bag = memory.bag_of_words(keys[:1])  # nearest: row 0 (cos 1), then row 1 (cos 0)
    weights = torch.softmax(torch.tensor([1.0, 0.0]) / memory.temperature, dim=0)
    expected = torch.zeros(len(vocab))
    for caption, weight in zip(CAPTIONS[:2], weights, strict=True):
        for token in set(vocab.encode(caption)):
            expected[token] += weight
    torch.testing.assert_close(bag[0], expected)
    # Excluding the item itself: its neighbours are rows 1 and 2 only.
    excluded = memory.bag_of_words(keys[:1], exclude=torch.tensor([0]))
    assert excluded[0, vocab.stoi["red"]] == 0 and excluded[0, vocab.stoi["square"]] > 0.99


def test_a_retrieval_model_round_trips_through_a_checkpoint(tmp_path) -> None:
    vocab = Vocab.build(CAPTIONS)
    model, preprocess = tiny_retrieval_model(vocab)
    attach_with_keys(model, torch.randn(3, 80), [[vocab.encode(c)] for c in CAPTIONS])
    save_checkpoint(Checkpoint(model, vocab, preprocess), tmp_path)
    loaded = load_checkpoint(tmp_path).model.eval()
    frames = torch.rand(2, 1, 3, 64, 64)
    lengths = torch.tensor([1, 1])
    before, after = model.encode(lengths, frames=frames), loaded.encode(lengths, frames=frames)
    torch.testing.assert_close(after.words, before.words)
    torch.testing.assert_close(after.summary, before.summary)
    assert before.words is not None and before.words.sum(-1).gt(0.99).all()


def test_the_copy_gate_lifts_retrieved_words_in_the_logits() -> None:
    vocab = Vocab.build(CAPTIONS)
    model, _ = tiny_retrieval_model(vocab)
    attach_with_keys(model, torch.randn(3, 80), [[vocab.encode(c)] for c in CAPTIONS])
    visual = model.encode(torch.tensor([1]), frames=torch.rand(1, 1, 3, 64, 64))
    tokens = torch.tensor([[vocab.bos_id]])
    with_words = model.decoder(tokens, visual)
    visual.words = torch.zeros_like(visual.words)
    without = model.decoder(tokens, visual)
    lifted = (with_words - without)[0, 0]
    assert (lifted >= 0).all() and lifted.max() > 0  # only retrieved words move, and upwards


def test_memory_needs_one_key_per_row() -> None:
    vocab = Vocab.build(CAPTIONS)
    model, _ = tiny_retrieval_model(vocab)
    attach_with_keys(model, torch.randn(3, 80), [[vocab.encode(c)] for c in CAPTIONS])
    with pytest.raises(ValueError, match="holds 3 rows, got 2 keys"):
        model.retrieval.fill(torch.randn(2, 80), [[[4]], [[5]]])


def swapped_layouts(generator: torch.Generator, items: int, cells: int, channels: int):
    """Pairs of frames made of the same cells in other places: the same pooled embedding."""
    frames = torch.rand(items, cells, channels, generator=generator) ** 4  # varied, positive
    return frames, frames.flip(1)


def test_the_cell_key_tells_apart_layouts_the_pooled_key_mixes_up() -> None:
    vocab = Vocab.build(CAPTIONS)
    model, _ = tiny_retrieval_model(vocab, key="cells")
    encoder = model.config.encoder
    generator = torch.Generator().manual_seed(0)
    frames, mirrored = swapped_layouts(generator, 40, encoder.cells, encoder.cell_channels)
    pool = torch.cat([frames, mirrored]).reshape(80, 1, -1)  # rows i and 40 + i: same cells
    captions = [[[4 + i % 3]] for i in range(80)]
    memory = attach_memory(model, captions, features_of([pool]))
    lengths = torch.ones(80, dtype=torch.long)
    pooled = pooled_embedding(pool, lengths, encoder)
    torch.testing.assert_close(pooled[:40], pooled[40:])  # the average cannot tell them apart
    keys = memory.key(pool, lengths)
    assert keys.shape == (80, memory.cell_key.key_dim)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(80))
    # A slightly noisy copy of each frame finds that frame, not its mirror image, whose pooled
    # embedding is the same.
    noisy = frames.reshape(40, 1, -1) + 0.01 * torch.rand(40, 1, encoder.feature_dim)
    similarity = memory.key(noisy, lengths[:40]) @ keys.T  # (40, 80)
    torch.testing.assert_close(similarity.argmax(-1), torch.arange(40))
    rows = torch.arange(40)
    assert (similarity[rows, rows] - similarity[rows, rows + 40] > 0.1).all()  # not a tie


def test_a_clips_cell_key_is_its_frames_mean_and_padding_is_ignored() -> None:
    vocab = Vocab.build(CAPTIONS)
    model, _ = tiny_retrieval_model(vocab, key="cells")
    dim = model.config.encoder.feature_dim
    generator = torch.Generator().manual_seed(1)
    memory = attach_memory(
        model, [[[4]]] * 30, features_of([torch.rand(30, 1, dim, generator=generator)])
    )
    clip = torch.rand(1, 3, dim, generator=generator)
    padded = torch.cat([clip, torch.zeros(1, 2, dim)], dim=1)
    key = memory.key(padded, torch.tensor([3]))
    frames = memory.key(clip.transpose(0, 1), torch.ones(3, dtype=torch.long))  # each alone
    torch.testing.assert_close(key[0], F.normalize(frames.sum(0), dim=0))


def test_a_cell_keyed_memory_round_trips_through_a_checkpoint(tmp_path) -> None:
    vocab = Vocab.build(CAPTIONS)
    model, preprocess = tiny_retrieval_model(vocab, key="cells")
    dim = model.config.encoder.feature_dim
    features = torch.rand(3, 1, dim, generator=torch.Generator().manual_seed(2))
    attach_memory(model, [[vocab.encode(c)] for c in CAPTIONS], features_of([features]))
    save_checkpoint(Checkpoint(model, vocab, preprocess), tmp_path)
    loaded = load_checkpoint(tmp_path).model.eval()
    assert loaded.config.retrieval_key == "cells"
    lengths = torch.ones(3, dtype=torch.long)
    torch.testing.assert_close(
        loaded.retrieval.key(features, lengths), model.retrieval.key(features, lengths)
    )
    # Fitted on 3 frames, the key spans at most 2 directions (centred): the others are dropped.
    assert (model.retrieval.cell_key.projection.abs().sum(0) > 0).sum() <= 2
