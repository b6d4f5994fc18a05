from __future__ import annotations

import pytest
from PIL import Image

from captioner.config import DecodingOptions
from captioner.errors import InvalidMediaError
from captioner.inference import Captioner
from tests.conftest import frame_image, make_video, png_bytes


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint) -> Captioner:
    return Captioner.load(tiny_checkpoint, device="cpu")


def test_images_batched_equal_images_alone(captioner) -> None:
    images = [Image.new("RGB", (50, 40), (i * 60, 255 - i * 60, 90)) for i in range(4)]
    options = captioner.options(beam_size=3, num_captions=2, max_length=6)
    together = captioner.caption_images(images, options)
    alone = [captioner.caption_images([image], options)[0] for image in images]
    assert [r.captions for r in together] == [r.captions for r in alone]
    assert all(len(r.captions) == 2 and r.caption == r.captions[0].text for r in together)


def test_mixed_options_in_one_batch_match_separate_calls(captioner) -> None:
    tensors = [captioner.prepare_image(png_bytes(frame_image(i)))[0] for i in range(3)]
    opts = [
        DecodingOptions(beam_size=1),
        DecodingOptions(beam_size=3, num_captions=3),
        DecodingOptions(max_length=2),
    ]
    mixed = captioner.caption_tensors(tensors, opts)
    separate = [captioner.caption_tensors([t], o)[0] for t, o in zip(tensors, opts, strict=True)]
    assert mixed == separate
    assert [len(r.captions) for r in mixed] == [1, 3, 1]


def test_frames_and_video_paths(captioner, tmp_path) -> None:
    frames = [png_bytes(frame_image(i)) for i in range(5)]
    result = captioner.caption_frames(frames)
    assert result.caption and result.video is None
    video = make_video(tmp_path / "v.webm", "libvpx-vp9", num_frames=16)
    described = captioner.caption_video(video, num_frames=4)
    assert described.video.frames_used == 4 and described.video.codec == "vp9"
    assert described.caption


def test_bad_inputs_raise_the_library_error(captioner) -> None:
    with pytest.raises(InvalidMediaError):
        captioner.caption_images([b"nope"])
    with pytest.raises(InvalidMediaError):
        captioner.caption_frames([])
    with pytest.raises(InvalidMediaError):
        captioner.caption_video(b"nope")


def test_empty_sequences_and_unknown_devices_are_clear_errors(captioner, tiny_checkpoint) -> None:
    import torch

    from captioner.errors import ConfigError

    with pytest.raises(InvalidMediaError, match="at least one frame"):
        captioner.caption_tensors([torch.zeros(0, 3, 64, 64)])
    with pytest.raises(ConfigError, match="unknown device"):
        Captioner.load(tiny_checkpoint, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Captioner.load(tiny_checkpoint, device="cuda")


def test_describe(captioner) -> None:
    info = captioner.describe()
    assert info["name"] == "tiny" and info["device"] == "cpu" and info["dtype"] == "float32"


def test_prepare_image_says_what_the_image_was(captioner) -> None:
    tensor, info = captioner.prepare_image(png_bytes(frame_image(0, size=(64, 48))))
    assert tuple(tensor.shape) == (1, 3, 64, 64)
    assert (info.width, info.height, info.format) == (64, 48, "png")
    _, made_in_memory = captioner.prepare_image(frame_image(0, size=(30, 20)))
    assert (made_in_memory.width, made_in_memory.height, made_in_memory.format) == (
        30,
        20,
        "unknown",
    )


def test_best_caption_is_the_first_or_empty() -> None:
    from captioner.inference import Caption, best_caption

    assert best_caption(
        [Caption("a red circle", -1.0, -0.25), Caption("a circle", -2.0, -0.67)]
    ) == ("a red circle")
    assert best_caption([]) == ""


def test_warm_up_runs_each_batch_size_a_clip_and_a_mixed_batch(
    tiny_checkpoint, monkeypatch
) -> None:
    captioner = Captioner.load(tiny_checkpoint, device="cpu")
    shapes = []
    real = captioner.caption_tensors

    def spy(sequences, options=None):
        shapes.append(tuple(len(s) for s in sequences))
        return real(sequences, options)

    monkeypatch.setattr(captioner, "caption_tensors", spy)
    captioner.warm_up(batch_sizes=(1, 3))
    assert shapes == [(1,), (1, 1, 1), (8,), (8, 1)]


def test_a_compiled_cnn_that_fails_in_warm_up_goes_back_to_eager(
    tiny_checkpoint, monkeypatch, caplog
) -> None:
    import torch

    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no compiler here")

    captioner = Captioner.load(tiny_checkpoint, device="cpu", encoder_runtime="torch")
    eager = captioner.cnn
    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    captioner.compile()
    assert isinstance(captioner.cnn, Broken)
    captioner.warm_up()
    assert captioner.cnn is eager
    assert "torch.compile failed" in caplog.text


def test_n_best_is_ranked_by_the_score_it_reports(captioner) -> None:
    image = captioner.prepare_image(png_bytes(frame_image(2)))[0]
    options = captioner.options(beam_size=5, num_captions=5, length_penalty=1.0)
    captions = captioner.caption_tensors([image], options)[0].captions
    scores = [c.score for c in captions]
    assert scores == sorted(scores, reverse=True)
    for caption in captions:  # score = log_prob / length ** 1, the length counting <eos>
        words = len(caption.text.split())  # (a caption cut at max_length has no <eos>)
        assert any(
            caption.score == pytest.approx(caption.log_prob / n, abs=1e-3)
            for n in (words, words + 1)
        )
