"""Decoding on a hand-set Markov "model" whose next-token probabilities are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.config import DecodingOptions
from captioner.decoding import NEG_INF, beam_search, constrain, generate, greedy_decode
from captioner.vocab import Vocab

VOCAB = Vocab(["a", "b", "c"])  # ids: <pad>0 <bos>1 <eos>2 <unk>3 a4 b5 c6
PAD, BOS, EOS, UNK, A, B, C = range(7)


class MarkovDecoder:
    """Next-token probabilities depend only on the last token and on which table the item uses
    (visual[:, 0] selects the table), so every decoding result can be worked out by hand."""

    def __init__(self, tables: list[dict[int, dict[int, float]]]) -> None:
        self.tables = torch.full((len(tables), 7, 7), float("-inf"))
        for t, table in enumerate(tables):
            for last, row in table.items():
                for token, prob in row.items():
                    self.tables[t, last, token] = math.log(prob)

    def prepare(self, visual: torch.Tensor) -> torch.Tensor:
        return visual

    def init_state(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = visual.new_zeros(1, visual.shape[0], 1)
        return zeros, zeros.clone()

    def step(self, tokens, state, visual):
        return self.tables[visual[:, 0].long(), tokens], state


class MarkovModel:
    def __init__(self, *tables: dict[int, dict[int, float]]) -> None:
        self.decoder = MarkovDecoder(list(tables))


# Greedy takes "a" (0.55) then "c" (0.4) then <eos> (0.6): p = 0.132.
# Beam 2 finds "b <eos>": 0.45 * 0.9 = 0.405, which greedy misses.
TRAP = {
    BOS: {A: 0.55, B: 0.45},
    A: {C: 0.4, EOS: 0.35, B: 0.25},
    B: {EOS: 0.9, C: 0.1},
    C: {EOS: 0.6, A: 0.4},
}
# Never ends: "a" forever.
ENDLESS = {BOS: {A: 1.0}, A: {A: 0.7, B: 0.3}, B: {A: 1.0}, C: {A: 1.0}}
# Prefers <unk> and repetition.
UNKY = {
    BOS: {UNK: 0.6, A: 0.4},
    UNK: {UNK: 0.6, EOS: 0.4},
    A: {A: 0.6, B: 0.3, EOS: 0.1},
    B: {EOS: 1.0},
}


def visual_for(*tables: int) -> torch.Tensor:
    return torch.tensor([[float(t)] for t in tables])


def options(**kwargs) -> DecodingOptions:
    base = dict(beam_size=2, max_length=6, length_penalty=0.0)
    return DecodingOptions(**{**base, **kwargs})


def test_greedy_takes_the_locally_best_token() -> None:
    model = MarkovModel(TRAP)
    [hyp] = greedy_decode(model, visual_for(0), VOCAB, options(beam_size=1))
    assert hyp.tokens == (A, C)
    assert hyp.finished
    assert hyp.log_prob == pytest.approx(math.log(0.55 * 0.4 * 0.6), abs=1e-6)


def test_beam_search_finds_the_better_caption_and_ranks_n_best() -> None:
    model = MarkovModel(TRAP)
    [nbest] = beam_search(model, visual_for(0), VOCAB, options(num_captions=2))
    assert [h.tokens for h in nbest] == [(B,), (A, C)]
    assert nbest[0].log_prob == pytest.approx(math.log(0.405), abs=1e-6)
    assert nbest[1].log_prob == pytest.approx(math.log(0.132), abs=1e-6)


def test_length_penalty_changes_ranking_by_normalised_score() -> None:
    # With lp=1 scores are per-token averages: b<eos> = ln(.405)/2, a c <eos> = ln(.132)/3.
    [nbest] = beam_search(
        MarkovModel(TRAP), visual_for(0), VOCAB, options(num_captions=2, length_penalty=1.0)
    )
    assert [h.tokens for h in nbest] == [(B,), (A, C)]
    assert nbest[0].score == pytest.approx(math.log(0.405) / 2, abs=1e-6)
    assert nbest[1].score == pytest.approx(math.log(0.132) / 3, abs=1e-6)


def test_beam_of_one_is_exactly_greedy_on_a_batch() -> None:
    model = MarkovModel(TRAP, ENDLESS, UNKY)
    visual = visual_for(0, 1, 2, 0)
    opts = options(beam_size=1, max_length=5)
    greedy = greedy_decode(model, visual, VOCAB, opts)
    beam = beam_search(model, visual, VOCAB, opts)
    assert [[h] for h in greedy] == beam
    assert generate(model, visual, VOCAB, opts) == beam


def test_batch_items_are_decoded_independently() -> None:
    model = MarkovModel(TRAP, ENDLESS)
    together = beam_search(model, visual_for(0, 1, 0), VOCAB, options())
    alone = [beam_search(model, visual_for(t), VOCAB, options())[0] for t in (0, 1, 0)]
    assert together == alone


def test_a_beam_that_never_ends_is_cut_at_max_length() -> None:
    model = MarkovModel(ENDLESS)
    [nbest] = beam_search(model, visual_for(0), VOCAB, options(max_length=4, num_captions=2))
    assert nbest[0].tokens == (A, A, A, A)
    assert not nbest[0].finished
    assert nbest[0].log_prob == pytest.approx(3 * math.log(0.7), abs=1e-6)
    [hyp] = greedy_decode(model, visual_for(0), VOCAB, options(beam_size=1, max_length=3))
    assert hyp.tokens == (A, A, A) and not hyp.finished


def test_min_length_forbids_early_eos() -> None:
    model = MarkovModel(TRAP)
    [nbest] = beam_search(model, visual_for(0), VOCAB, options(min_length=2, num_captions=2))
    assert all(len(h.tokens) >= 2 for h in nbest)
    # b must now continue: b c <eos> = .45 * .1 * .6 = .027 < a c <eos> = .132
    assert [h.tokens for h in nbest] == [(A, C), (A, B)]


def test_unk_is_suppressed_and_no_repeat_ngram_is_enforced() -> None:
    model = MarkovModel(UNKY)
    [hyp] = greedy_decode(model, visual_for(0), VOCAB, options(beam_size=1))
    assert hyp.tokens == (A, A, A, A, A, A)  # unk suppressed, then "a" repeats
    opts = options(beam_size=1, no_repeat_ngram_size=1)
    [hyp] = greedy_decode(model, visual_for(0), VOCAB, opts)
    assert hyp.tokens == (A, B)  # a second "a" is banned, so b, then <eos>
    kept = options(beam_size=1, suppress_unk=False)
    assert greedy_decode(model, visual_for(0), VOCAB, kept)[0].tokens == (
        UNK,
        UNK,
        UNK,
        UNK,
        UNK,
        UNK,
    )


def test_when_the_rules_ban_every_token_the_caption_ends_instead_of_crashing() -> None:
    # min_length forbids <eos>, and no-repeat bans "a", the only other token on offer.
    model = MarkovModel({BOS: {A: 1.0}, A: {A: 0.99, EOS: 0.01}})
    opts = options(beam_size=1, no_repeat_ngram_size=1, min_length=3, max_length=5)
    [hyp] = greedy_decode(model, visual_for(0), VOCAB, opts)
    assert hyp.tokens == (A,) and hyp.finished  # nothing else is possible: it ends
    assert hyp.log_prob == pytest.approx(math.log(0.01), abs=1e-6)
    [nbest] = beam_search(model, visual_for(0), VOCAB, options(beam_size=2, no_repeat_ngram_size=1))
    assert nbest and nbest[0].tokens == (A,)


def reference_constrain(log_probs, history, vocab, opts):
    """The rules written out plainly: -inf written into a copy, then the stuck repair."""
    out = log_probs.clone()
    out[:, [vocab.pad_id, vocab.bos_id]] = NEG_INF
    if opts.suppress_unk:
        out[:, vocab.unk_id] = NEG_INF
    if history.shape[1] < opts.min_length:
        out[:, vocab.eos_id] = NEG_INF
    n, steps = opts.no_repeat_ngram_size, history.shape[1]
    for row in range(len(out)):
        tokens = history[row].tolist()
        for start in range(steps - n + 1 if n > 0 and steps >= n else 0):
            if tokens[start : start + n - 1] == tokens[steps - (n - 1) :]:
                out[row, tokens[start + n - 1]] = NEG_INF
        if torch.isinf(out[row]).all():
            out[row, vocab.eos_id] = log_probs[row, vocab.eos_id]
    return out


@pytest.mark.parametrize("min_length", [0, 3])
@pytest.mark.parametrize("suppress_unk", [True, False])
@pytest.mark.parametrize("ngram", [0, 1, 2])
def test_constrain_applies_every_rule_like_the_plain_reference(min_length, suppress_unk, ngram):
    generator = torch.Generator().manual_seed(min_length * 10 + ngram)
    opts = options(min_length=min_length, suppress_unk=suppress_unk, no_repeat_ngram_size=ngram)
    for steps in range(5):
        log_probs = torch.randn(6, len(VOCAB), generator=generator).log_softmax(-1)
        log_probs[0, [A, B, C]] = NEG_INF  # only specials and <eos> left on offer
        log_probs[1, [A, B, C, EOS]] = NEG_INF  # only specials: stuck once they are banned
        history = torch.randint(A, C + 1, (6, steps), generator=generator)
        history[2] = A  # repeats: the n-gram rule bans "a"
        expected = reference_constrain(log_probs, history, VOCAB, opts)
        assert torch.equal(constrain(log_probs, history, VOCAB, opts), expected)


def test_invalid_options_are_rejected() -> None:
    from captioner.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="num_captions"):
        generate(MarkovModel(TRAP), visual_for(0), VOCAB, options(beam_size=2, num_captions=3))
    with pytest.raises(InvalidOptionError, match="beam_size"):
        DecodingOptions(beam_size=0).validate()
