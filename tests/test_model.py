from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from captioner import model as model_module
from captioner.model import CaptionModel, VisualContext, frame_mask
from tests.conftest import make_tiny_model


def parts(visual: VisualContext) -> tuple[torch.Tensor, ...]:
    return visual.summary, visual.keys, visual.values


def test_shapes_and_finite_outputs_for_frames_and_features(tiny_vocab) -> None:
    model = make_tiny_model(tiny_vocab)
    frames = torch.randn(3, 4, 3, 64, 64)
    lengths = torch.tensor([1, 4, 2])
    tokens = torch.randint(0, len(tiny_vocab), (3, 7))
    logits = model(tokens, lengths, frames=frames)
    assert logits.shape == (3, 7, len(tiny_vocab))
    assert torch.isfinite(logits).all()
    features = model.frame_features(frames, lengths)
    assert features.shape == (3, 4, model.config.encoder.feature_dim)
    assert torch.equal(features[0, 1:], torch.zeros_like(features[0, 1:]))  # padded frames unrun
    torch.testing.assert_close(model(tokens, lengths, features=features), logits)


def test_every_trainable_parameter_gets_a_gradient(tiny_vocab) -> None:
    for frozen in (True, False):
        model = make_tiny_model(tiny_vocab, frozen=frozen).train()
        frames = torch.randn(2, 3, 3, 64, 64)
        logits = model(
            torch.randint(0, len(tiny_vocab), (2, 5)), torch.tensor([3, 1]), frames=frames
        )
        logits.logsumexp(-1).sum().backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert any(n.startswith("encoder.") for n in trainable) is not frozen
        missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []


def test_frozen_encoder_stays_in_eval_mode(tiny_vocab) -> None:
    model = make_tiny_model(tiny_vocab, frozen=True).train()
    assert not model.encoder.backbone.training
    assert model.decoder.training


def test_padding_does_not_change_a_sequence_result(tiny_vocab) -> None:
    model = make_tiny_model(tiny_vocab)
    short = torch.randn(1, 2, 3, 64, 64)
    alone = model.encode(torch.tensor([2]), frames=short)
    padded = torch.cat([short, torch.randn(1, 3, 3, 64, 64)], dim=1)  # garbage in the padding
    batch = torch.cat([padded, torch.randn(1, 5, 3, 64, 64)])
    together = model.encode(torch.tensor([2, 5]), frames=batch)
    torch.testing.assert_close(parts(together[0:1]), parts(alone), rtol=1e-5, atol=1e-6)


def test_frame_order_matters(tiny_vocab) -> None:
    model = make_tiny_model(tiny_vocab)
    frames = torch.randn(1, 4, 3, 64, 64)
    forward = model.encode(torch.tensor([4]), frames=frames)
    backward = model.encode(torch.tensor([4]), frames=frames.flip(1))
    assert not torch.allclose(forward.summary, backward.summary)
    # The cell memory holds each cell's change from first to last frame, which flips sign.
    assert not torch.allclose(forward.values, backward.values)


def test_decoding_steps_match_teacher_forcing(tiny_vocab) -> None:
    """decoder.step, one token at a time, gives the logits of the parallel training pass."""
    model = make_tiny_model(tiny_vocab).eval()
    visual = model.encode(torch.tensor([3, 1]), frames=torch.randn(2, 3, 3, 64, 64))
    tokens = torch.randint(0, len(tiny_vocab), (2, 6))
    with torch.no_grad():
        parallel = model.decoder(tokens, visual).log_softmax(-1)
        state = model.decoder.init_state(visual)
        for t in range(tokens.shape[1]):
            log_probs, state = model.decoder.step(tokens[:, t], state, visual)
            torch.testing.assert_close(log_probs, parallel[:, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference", "inference_untabulated"])
def test_decoding_steps_match_teacher_forcing_in_each_mode(tiny_vocab, mode, monkeypatch) -> None:
    """step's hand-written LSTM cell equals nn.LSTM's, with the word-gate table (inference)
    and without it (gradients on, or a vocabulary over the table's size limit)."""
    model = make_tiny_model(tiny_vocab).eval()
    tokens = torch.randint(0, len(tiny_vocab), (2, 5))
    with torch.no_grad():
        visual = model.encode(torch.tensor([2, 1]), frames=torch.randn(2, 2, 3, 64, 64))
        parallel = model.decoder(tokens, visual).log_softmax(-1)
    if mode == "inference_untabulated":
        monkeypatch.setattr(model_module, "MAX_GATE_TABLE", 0)
    contexts = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad}
    with contexts.get(mode, torch.inference_mode)():
        prepared = model.decoder.prepare(visual)
        state = model.decoder.init_state(prepared)
        for t in range(tokens.shape[1]):
            log_probs, state = model.decoder.step(tokens[:, t], state, prepared)
            torch.testing.assert_close(log_probs, parallel[:, t], rtol=1e-4, atol=1e-5)
    tabulated = model.decoder._gate_table is not None
    assert tabulated is (mode in ("no_grad", "inference"))


def test_the_word_gate_table_follows_changed_weights(tiny_vocab) -> None:
    """A weight changed in place (an optimiser step, load_state_dict) builds a new table."""
    model = make_tiny_model(tiny_vocab).eval()
    with torch.no_grad():
        visual = model.encode(torch.tensor([1]), frames=torch.randn(1, 1, 3, 64, 64))
    tokens = torch.tensor([3])

    def first_step() -> torch.Tensor:
        with torch.inference_mode():
            prepared = model.decoder.prepare(visual)
            return model.decoder.step(tokens, model.decoder.init_state(prepared), prepared)[0]

    before = first_step()
    with torch.no_grad():
        model.decoder.embed.weight[3] += 1.0
        expected = model.decoder(tokens[:, None], visual).log_softmax(-1)[:, 0]
    after = first_step()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_visual_context_rows_split_and_repeat(tiny_vocab) -> None:
    model = make_tiny_model(tiny_vocab).eval()
    visual = model.encode(torch.tensor([2, 1]), frames=torch.randn(2, 2, 3, 64, 64))
    assert len(visual) == 2 and len(visual[torch.tensor([1])]) == 1
    repeated = visual.repeat_interleave(3)
    assert len(repeated) == 6
    for part, whole in zip(parts(repeated[3:6]), parts(visual[1:2]), strict=True):
        assert torch.equal(part, whole.expand_as(part))


def test_beams_sharing_their_cells_step_like_beams_with_copies(tiny_vocab) -> None:
    """repeat_interleave shares each sequence's cells among its beams; every beam still
    attends over its own sequence's cells, with its own hidden state."""
    model = make_tiny_model(tiny_vocab).eval()
    with torch.inference_mode():
        visual = model.encode(torch.tensor([2, 1]), frames=torch.randn(2, 2, 3, 64, 64))
        shared = model.decoder.prepare(visual).repeat_interleave(3)
        copied = shared[torch.arange(6)]  # row indexing gives every row its own cells
        assert (shared.beams, shared.keys.shape[0]) == (3, 2)
        assert (copied.beams, copied.keys.shape[0]) == (1, 6)
        hidden = model.decoder.init_h.out_features
        state = (torch.randn(1, 6, hidden), torch.randn(1, 6, hidden))  # six different beams
        tokens = torch.randint(0, len(tiny_vocab), (6,))
        ours, (h, c) = model.decoder.step(tokens, state, shared)
        theirs, (h2, c2) = model.decoder.step(tokens, state, copied)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(h, h2) and torch.equal(c, c2)
    with torch.inference_mode(), pytest.raises(ValueError, match="one decoding step"):
        model.decoder(torch.zeros(6, 2, dtype=torch.long), shared)


def test_frame_mask() -> None:
    assert frame_mask(torch.tensor([1, 3]), 3).tolist() == [
        [True, False, False],
        [True, True, True],
    ]


def test_attention_heads_must_divide_the_cell_size(tiny_vocab) -> None:
    config = make_tiny_model(tiny_vocab).config
    for heads in (0, -2, 3):
        with pytest.raises(ValueError, match="positive divisor"):
            CaptionModel(dataclasses.replace(config, attention_heads=heads))
