"""Hypothesis properties: the tokenizer and vocabulary, decoding, and media decoding of any bytes.

Bounded for CI (``max_examples`` below; about 30 s in all on 2 busy cores) and derandomized,
so a failure reproduces on every run.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.config import DecodingOptions
from captioner.decoding import beam_search, generate, greedy_decode
from captioner.errors import InvalidMediaError
from captioner.media import VideoLimits, load_image, read_video
from captioner.vocab import SPECIALS, Vocab, detokenize, tokenize

SAMPLES = Path(__file__).resolve().parents[1] / "captioner" / "assets" / "samples"
PROPERTY = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

# -- tokenizer and vocabulary ----------------------------------------------------------------

# Words, clitics, hyphens, digits, punctuation, case and the odd Unicode apostrophe or letter.
captions = st.text(
    alphabet=st.sampled_from(list("abcdefgxyzABC019 -'.,!?\u2019\u00e9\t")), max_size=60
)


@PROPERTY
@given(st.lists(captions, min_size=1, max_size=8), st.integers(1, 3))
def test_encoding_a_known_caption_round_trips_through_decode(texts, min_count) -> None:
    vocab = Vocab.build(texts, min_count=min_count)
    for text in texts:
        ids = vocab.encode(text)
        assert all(0 <= i < len(vocab) for i in ids)
        assert vocab.pad_id not in ids and vocab.bos_id not in ids and vocab.eos_id not in ids
        # decode -> encode gives the same ids back: detokenizing loses nothing tokenize keeps.
        assert vocab.encode(vocab.decode(ids)) == ids
        assert tokenize(detokenize(tokenize(text))) == tokenize(text)
        if min_count == 1:  # every word was seen: nothing is <unk>
            assert vocab.unk_id not in ids
            assert vocab.decode(ids) == detokenize(tokenize(text))


@PROPERTY
@given(st.lists(captions, min_size=1, max_size=8))
def test_the_vocabulary_round_trips_through_json(texts) -> None:
    vocab = Vocab.build(texts)
    again = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and again.itos[: len(SPECIALS)] == list(SPECIALS)
    assert [again.encode(t) for t in texts] == [vocab.encode(t) for t in texts]


@PROPERTY
@given(st.lists(st.integers(-5, 40), max_size=30))
def test_decode_takes_any_ids_and_stops_at_eos(ids) -> None:
    vocab = Vocab(["a", "b", "c"])
    text = vocab.decode(ids)
    before_eos = ids[: ids.index(vocab.eos_id)] if vocab.eos_id in ids else ids
    words = [i for i in before_eos if i not in (vocab.pad_id, vocab.bos_id)]
    assert len(text.split()) == len(words)


# -- decoding ----------------------------------------------------------------------------------

VOCAB = Vocab(["a", "b", "c", "d"])  # ids: <pad>0 <bos>1 <eos>2 <unk>3 a..d 4..7


class RandomMarkovDecoder:
    """Next-token log-probabilities from a random table per item, keyed by the last token."""

    def __init__(self, tables: torch.Tensor) -> None:
        self.tables = tables  # (items, vocab, vocab), log-softmaxed over the last dimension

    def prepare(self, visual: torch.Tensor) -> torch.Tensor:
        return visual

    def init_state(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = visual.new_zeros(1, visual.shape[0], 1)
        return zeros, zeros.clone()

    def step(self, tokens, state, visual):
        return self.tables[visual[:, 0].long(), tokens], state


class RandomMarkovModel:
    def __init__(self, seed: int, items: int, temperature: float) -> None:
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(items, len(VOCAB), len(VOCAB), generator=generator) * temperature
        self.decoder = RandomMarkovDecoder(logits.log_softmax(-1))


@st.composite
def decoding_options(draw) -> DecodingOptions:
    beam_size = draw(st.integers(1, 5))
    max_length = draw(st.integers(1, 12))
    return DecodingOptions(
        beam_size=beam_size,
        num_captions=draw(st.integers(1, beam_size)),
        max_length=max_length,
        min_length=draw(st.integers(0, min(4, max_length))),
        length_penalty=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        no_repeat_ngram_size=draw(st.integers(0, 2)),
        suppress_unk=draw(st.booleans()),
    )


@PROPERTY
@given(st.integers(0, 2**31), st.integers(1, 4), st.floats(0.1, 5.0), decoding_options())
def test_n_best_lists_respect_their_bounds_and_are_ranked_by_score(
    seed, items, temperature, options
) -> None:
    model = RandomMarkovModel(seed, items, temperature)
    visual = torch.arange(items, dtype=torch.float32).unsqueeze(1)
    results = generate(model, visual, VOCAB, options)
    assert len(results) == items
    for nbest in results:
        assert 1 <= len(nbest) <= options.num_captions
        scores = [h.score for h in nbest]
        assert scores == sorted(scores, reverse=True)
        for h in nbest:
            assert len(h.tokens) <= options.max_length
            assert not set(h.tokens) & {VOCAB.pad_id, VOCAB.bos_id, VOCAB.eos_id}
            if options.suppress_unk:
                assert VOCAB.unk_id not in h.tokens
            if not h.finished:  # cut by max_length, never shorter
                assert len(h.tokens) == options.max_length
            elif options.no_repeat_ngram_size == 0:  # (else the rules may leave only <eos>)
                assert len(h.tokens) >= options.min_length
            length = max(len(h.tokens) + h.finished, 1)  # <eos> counts
            assert h.log_prob <= 1e-5
            assert math.isclose(
                h.score, h.log_prob / length**options.length_penalty, rel_tol=1e-5, abs_tol=1e-6
            )


@PROPERTY
@given(st.integers(0, 2**31), st.integers(1, 4), st.floats(0.1, 5.0), decoding_options())
def test_a_beam_of_one_is_exactly_greedy(seed, items, temperature, options) -> None:
    options = DecodingOptions(**{**vars(options), "beam_size": 1, "num_captions": 1})
    model = RandomMarkovModel(seed, items, temperature)
    visual = torch.arange(items, dtype=torch.float32).unsqueeze(1)
    greedy = greedy_decode(model, visual, VOCAB, options)
    assert beam_search(model, visual, VOCAB, options) == [[h] for h in greedy]


# -- media: any bytes are a result or an InvalidMediaError ----------------------------------


def _real_media() -> list[bytes]:
    scene = Image.open(SAMPLES / "scene.png").convert("RGB")
    encoded = [(SAMPLES / "scene.png").read_bytes(), (SAMPLES / "motion.mp4").read_bytes()]
    for fmt in ("JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        scene.resize((64, 64)).save(buffer, format=fmt)
        encoded.append(buffer.getvalue())
    return encoded


REAL = _real_media()


@st.composite
def hostile_bytes(draw) -> bytes:
    """Random bytes, or a real file cut, flipped, overwritten or padded (so parsers get deep)."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["cut", "flip", "overwrite", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "cut":
            data = data[:at]
        elif action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


# Pillow warns (UserWarning) about some corrupt files it still opens: a warning, not an error,
# outside this test suite, which turns warnings into errors.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")
@settings(PROPERTY, max_examples=200)
@given(hostile_bytes())
def test_any_bytes_are_an_image_or_an_invalid_media_error(data) -> None:
    try:
        image = load_image(data)
    except InvalidMediaError:
        return
    assert image.mode == "RGB" and min(image.size) >= 1


@settings(PROPERTY, max_examples=150)
@given(hostile_bytes(), st.integers(1, 8))
def test_any_bytes_are_a_video_or_an_invalid_media_error(data, num_frames) -> None:
    try:
        frames, info = read_video(data, num_frames, VideoLimits(max_decode_s=10))
    except InvalidMediaError:
        return
    assert len(frames) == num_frames == info.frames_used
    assert all(frame.mode == "RGB" for frame in frames)
    assert np.asarray(frames[0]).shape[2] == 3
