"""The out-of-domain summary: calibration, the clip rule, the checkpoint round trip, results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from captioner.config import preset
from captioner.domain import DomainSummary, attach_domain
from captioner.encoder import frame_embeddings
from captioner.inference import Captioner
from captioner.media import Preprocessor
from captioner.model import CaptionModel
from captioner.vocab import Vocab

from .conftest import frame_image, make_tiny_model, png_bytes

DIM = 80  # the tiny encoder's embedding: 16 + 64 stage channels


def gaussian(rows: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A few strong directions and weak noise, as real features have.
    basis = np.random.default_rng(0).normal(size=(6, DIM))
    return shift + scale * (
        rng.normal(size=(rows, 6)) @ basis + 0.05 * rng.normal(size=(rows, DIM))
    )


def fitted(rank: int = 6, quantile: float = 0.99) -> DomainSummary:
    model = tiny_model()
    held_out = [row[None] for row in gaussian(400, seed=2)]
    return attach_domain(model, gaussian(2000, seed=1), held_out, rank, quantile)


def tiny_model() -> CaptionModel:
    return make_tiny_model(Vocab.build(["a red circle"]))


def test_the_threshold_keeps_the_calibrated_share_of_held_out_items_in_domain() -> None:
    summary = fitted(quantile=0.99)
    held_out = summary.distance(torch.from_numpy(gaussian(400, seed=2)).float())
    assert (held_out <= 1).float().mean().item() == pytest.approx(0.99, abs=0.003)
    fresh = summary.distance(torch.from_numpy(gaussian(4000, seed=3)).float())
    assert (fresh <= 1).float().mean().item() > 0.97  # new draws of the same distribution
    far = summary.distance(torch.from_numpy(gaussian(100, seed=4, shift=1.5)).float())
    assert (far > 1).all()  # off the training data's mean
    wide = summary.distance(torch.from_numpy(gaussian(100, seed=5, scale=4.0)).float())
    assert (wide > 1).float().mean().item() > 0.95  # far along the training directions


def test_a_clip_is_as_far_as_its_farthest_frame_and_padding_is_ignored() -> None:
    summary = fitted()
    near = torch.from_numpy(gaussian(3, seed=6)).float()
    away = torch.from_numpy(gaussian(1, seed=7, shift=2.0)).float()
    clips = torch.stack([torch.cat([near, away]), torch.cat([near, away])])  # (2, 4, E)
    scores = summary.score(clips, torch.tensor([4, 3]))  # the second clip's 4th step is padding
    assert scores[0] == summary.distance(away)[0]
    assert scores[1] == summary.distance(near).max()


def test_the_rank_is_capped_by_the_data_and_recorded_in_the_config() -> None:
    model = tiny_model()
    attach_domain(model, gaussian(10, seed=1), [gaussian(1, seed=2)], 32, 0.99)
    assert model.config.domain_rank == 8 and model.domain.directions.shape == (8, DIM)


def test_the_summary_travels_in_the_checkpoint_and_flags_results(tmp_path, tiny_vocab) -> None:
    model = make_tiny_model(tiny_vocab)
    _, preprocess = preset("test-tiny")
    frames = [
        model.encoder(Preprocessor(preprocess)(frame_image(i)).unsqueeze(0)) for i in range(12)
    ]
    embedded = [frame_embeddings(f.unsqueeze(0), model.config.encoder)[0].detach() for f in frames]
    train = torch.cat(embedded[:8]).numpy()
    attach_domain(model, train, [e.numpy() for e in embedded[8:]], 4, 1.0)
    metadata = {"name": "tiny", "domain": "frames of one colour"}
    save_checkpoint(Checkpoint(model, tiny_vocab, preprocess, metadata=metadata), tmp_path)
    loaded = load_checkpoint(tmp_path).model
    torch.testing.assert_close(loaded.domain.state_dict(), model.domain.state_dict())

    captioner = Captioner.load(tmp_path, device="cpu")
    assert captioner.describe()["domain"] == "frames of one colour"
    like = captioner.caption_images([png_bytes(frame_image(9))])[0]
    assert like.in_domain is True and like.domain_score <= 1 and like.warnings == []
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    unlike = captioner.caption_images([noise])[0]
    assert unlike.in_domain is False and unlike.domain_score > 1
    assert "unlike the data the model was trained on (frames of one colour)" in unlike.warnings[0]
    assert "MODEL_CARD.md" in unlike.warnings[0]
    clip = captioner.caption_frames([png_bytes(frame_image(9)), noise])
    assert clip.in_domain is False  # a clip is in domain only when all its frames are


def test_a_checkpoint_without_a_summary_reports_unknown(tiny_checkpoint) -> None:
    result = Captioner.load(tiny_checkpoint, device="cpu").caption_images(
        [png_bytes(frame_image(1))]
    )[0]
    assert result.in_domain is None and result.domain_score is None and result.warnings == []
