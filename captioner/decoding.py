"""Caption generation: batched greedy decoding and beam search with n-best output.

Both work on the whole batch at once (B images x K beams as one tensor batch); there is no
per-image Python loop. They are pure functions of (model, visual context, options); the context
is anything the decoder's ``prepare``, ``init_state`` and ``step`` read that has rows per item
(``len``, ``device``, row indexing and ``repeat_interleave``): a VisualContext, or a plain tensor
in tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from captioner.config import DecodingOptions
from captioner.model import CaptionModel, VisualContext
from captioner.vocab import Vocab

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Hypothesis:
    """One generated caption as token ids (without <bos>/<eos>) and its scores."""

    tokens: tuple[int, ...]
    log_prob: float  # total log-probability of the generated tokens, <eos> included
    score: float  # log_prob / length**length_penalty: what hypotheses are ranked by
    finished: bool  # False when max_length cut the caption before <eos>


@torch.inference_mode()
def generate(
    model: CaptionModel, visual: VisualContext, vocab: Vocab, options: DecodingOptions
) -> list[list[Hypothesis]]:
    """The n-best captions for each of the B items in ``visual``: greedy when beam_size is 1."""
    options.validate()
    if options.beam_size == 1:
        return [[h] for h in greedy_decode(model, visual, vocab, options)]
    return beam_search(model, visual, vocab, options)


def constrain(
    log_probs: torch.Tensor, history: torch.Tensor, vocab: Vocab, options: DecodingOptions
) -> torch.Tensor:
    """Apply the decoding rules to next-token log-probs (N, vocab) given generated ids (N, t)."""
    steps = history.shape[1]
    banned = [vocab.pad_id, vocab.bos_id]  # never generated, only used as inputs
    if options.suppress_unk:
        banned.append(vocab.unk_id)
    if steps < options.min_length:
        banned.append(vocab.eos_id)
    # One addition of a cached row of 0 and -inf: the same values as writing -inf into a copy,
    # in one operation instead of four (a beam-search step at batch 1 is mostly such overhead).
    constrained = log_probs + _ban_row(tuple(banned), log_probs.shape[1], log_probs.device)
    n = options.no_repeat_ngram_size
    if n > 0 and steps >= n:
        # Every earlier n-gram whose first n-1 tokens equal the last n-1 generated ones bans
        # its final token; all hypotheses at once.
        windows = history.unfold(1, n, 1)  # (N, steps-n+1, n)
        prefix = history[:, steps - (n - 1) :].unsqueeze(1)  # (N, 1, n-1)
        matches = (windows[:, :, : n - 1] == prefix).all(-1)  # (N, steps-n+1)
        counts = torch.zeros_like(constrained).scatter_add_(1, windows[:, :, -1], matches.float())
        constrained = constrained.masked_fill(counts > 0, NEG_INF)
    elif vocab.eos_id not in banned:
        # With <eos> allowed and no n-gram rule, a hypothesis left no token had <eos> at -inf
        # already, and the repair below would give it that same -inf: nothing to check.
        return constrained
    # When the rules leave a hypothesis no token at all, it may end: a caption, never a crash.
    stuck = torch.isinf(constrained).all(dim=1)
    if bool(stuck.any()):
        constrained[stuck, vocab.eos_id] = log_probs[stuck, vocab.eos_id]
    return constrained


@functools.lru_cache(maxsize=64)
def _ban_row(banned: tuple[int, ...], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(vocab,) float32: -inf at the ``banned`` ids, 0 elsewhere."""
    row = torch.zeros(vocab_size, device=device)
    row[list(banned)] = NEG_INF
    return row


def _finished_row(vocab_size: int, pad_id: int, like: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs for a finished hypothesis: <pad> at no cost, nothing else."""
    row = like.new_full((vocab_size,), NEG_INF)
    row[pad_id] = 0.0
    return row


@torch.inference_mode()
def greedy_decode(
    model: CaptionModel, visual: VisualContext, vocab: Vocab, options: DecodingOptions
) -> list[Hypothesis]:
    """The single most likely next token at every step, for the whole batch at once."""
    batch = len(visual)
    visual = model.decoder.prepare(visual)
    state = model.decoder.init_state(visual)
    last = torch.full((batch,), vocab.bos_id, dtype=torch.long, device=visual.device)
    history = last.new_empty((batch, 0))
    totals = torch.zeros(batch, dtype=torch.float32, device=visual.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=visual.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=visual.device)
    finished_row = _finished_row(len(vocab), vocab.pad_id, totals)
    for _ in range(options.max_length):
        log_probs, state = model.decoder.step(last, state, visual)  # (B, vocab)
        log_probs = constrain(log_probs, history, vocab, options)
        log_probs = torch.where(finished.unsqueeze(1), finished_row, log_probs)
        # The same arithmetic as a beam of one (running total + step), so ties break alike.
        totals, last = (totals.unsqueeze(1) + log_probs).topk(1, dim=1)
        totals, last = totals.squeeze(1), last.squeeze(1)
        history = torch.cat([history, last.unsqueeze(1)], dim=1)
        lengths += (~finished).long()
        finished |= last == vocab.eos_id
        if bool(finished.all()):
            break
    return [group[0] for group in _hypotheses(history, totals, lengths, finished, vocab, options)]


@torch.inference_mode()
def beam_search(
    model: CaptionModel, visual: VisualContext, vocab: Vocab, options: DecodingOptions
) -> list[list[Hypothesis]]:
    """Beam search over the whole batch; returns the top ``num_captions`` per item, best first.

    Finished hypotheses stay in the beam with their score frozen (they can only add free
    <pad>s), so a beam that never emits <eos> simply ends at ``max_length``.
    """
    batch, beams, vocab_size = len(visual), options.beam_size, len(vocab)
    device = visual.device
    visual = model.decoder.prepare(visual).repeat_interleave(beams, dim=0)  # B*K rows
    h, c = model.decoder.init_state(visual)
    scores = torch.full((batch, beams), NEG_INF, device=device)
    scores[:, 0] = 0.0  # one live beam per item at the start, so the first step gives K distinct
    last = torch.full((batch * beams,), vocab.bos_id, dtype=torch.long, device=device)
    history = last.new_empty((batch * beams, 0))
    finished = torch.zeros(batch * beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * beams, dtype=torch.long, device=device)
    offsets = (torch.arange(batch, device=device) * beams).unsqueeze(1)  # (B, 1)
    finished_row = _finished_row(vocab_size, vocab.pad_id, scores)
    for _ in range(options.max_length):
        log_probs, (h, c) = model.decoder.step(last, (h, c), visual)  # (B*K, vocab)
        log_probs = constrain(log_probs, history, vocab, options)
        log_probs = torch.where(finished.unsqueeze(1), finished_row, log_probs)
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beams * vocab_size)
        scores, flat_index = candidates.topk(beams, dim=1)  # (B, K), best first
        origin = (flat_index // vocab_size + offsets).view(-1)  # (B*K,) beam each one extends
        last = (flat_index % vocab_size).view(-1)
        history = torch.cat([history[origin], last.unsqueeze(1)], dim=1)
        was_finished = finished[origin]
        lengths = lengths[origin] + (~was_finished).long()
        finished = was_finished | (last == vocab.eos_id)
        h, c = h[:, origin], c[:, origin]
        if bool(finished.all()):
            break
    return _hypotheses(history, scores.view(-1), lengths, finished, vocab, options, beams)


def _hypotheses(
    history: torch.Tensor,
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    finished: torch.Tensor,
    vocab: Vocab,
    options: DecodingOptions,
    beams: int = 1,
) -> list[list[Hypothesis]]:
    """Group flat (B*K) results per item, rank by length-penalised score, keep the n-best."""
    rows, totals = history.tolist(), log_probs.tolist()
    lengths_list, finished_list = lengths.tolist(), finished.tolist()
    results: list[list[Hypothesis]] = []
    for start in range(0, len(rows), beams):
        group = []
        slots = range(start, start + beams)
        # Skip slots that never held a live hypothesis, but always return at least one caption.
        live = [i for i in slots if totals[i] != NEG_INF] or [start]
        for i in live:
            words = tuple(t for t in rows[i][: lengths_list[i]] if t != vocab.eos_id)
            length = max(lengths_list[i], 1)
            score = totals[i] / length**options.length_penalty
            group.append(Hypothesis(words, totals[i], score, finished_list[i]))
        group.sort(key=lambda hyp: -hyp.score)  # stable: equal scores keep beam order
        results.append(group[: options.num_captions])
    return results
