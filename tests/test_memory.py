"""Tests for the caption memory of a retrieval-augmented model (captioner.memory)."""

from __future__ import annotations

import pytest
import torch

from captioner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from captioner.config import preset
from captioner.memory import CaptionMemory, attach_memory
from captioner.model import create_model
from captioner.vocab import Vocab

CAPTIONS = ["a red circle", "a blue square", "flag of egypt"]


def tiny_retrieval_model(vocab: Vocab, k: int = 2):
    torch.manual_seed(0)
    config, preprocess = preset("test-tiny")
    config.vocab_size, config.retrieval_k = len(vocab), k
    return create_model(config).eval(), preprocess


def test_bag_of_words_weights_the_neighbours_words_by_similarity() -> None:
    vocab = Vocab.build(CAPTIONS)
    model, _ = tiny_retrieval_model(vocab)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).repeat(1, 40)  # E = 16 + 64
    attach_memory(model, keys, [[vocab.encode(c)] for c in CAPTIONS])
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
    attach_memory(model, torch.randn(3, 80), [[vocab.encode(c)] for c in CAPTIONS])
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
    attach_memory(model, torch.randn(3, 80), [[vocab.encode(c)] for c in CAPTIONS])
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
    attach_memory(model, torch.randn(3, 80), [[vocab.encode(c)] for c in CAPTIONS])
    with pytest.raises(ValueError, match="holds 3 rows, got 2 keys"):
        model.retrieval.fill(torch.randn(2, 80), [[[4]], [[5]]])
