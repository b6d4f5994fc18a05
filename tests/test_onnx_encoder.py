"""The CNN on ONNX Runtime: same outputs as PyTorch, exported once, and a clean fallback."""

from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np
import pytest
import torch

from captioner import onnx_encoder
from captioner.inference import Captioner
from captioner.onnx_encoder import OnnxEncoder, fast_encoder, fingerprint

from .conftest import frame_image, make_tiny_model, png_bytes

SIZE = 64  # the test-tiny preset's input size


@pytest.fixture
def encoder(tiny_vocab):
    return make_tiny_model(tiny_vocab).encoder


def test_onnx_runtime_gives_the_pytorch_features(encoder, tmp_path) -> None:
    fast = onnx_encoder.onnx_encoder(encoder, SIZE, folder=tmp_path)
    assert isinstance(fast, OnnxEncoder)
    pixels = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = encoder(pixels)
    torch.testing.assert_close(fast(pixels), expected, rtol=1e-4, atol=1e-4)
    assert fast(pixels[:1]).shape == expected[:1].shape  # the batch size is dynamic


@pytest.mark.parametrize("threads", [2, 3])
def test_a_batch_run_an_image_at_a_time_gives_the_rows_of_the_whole_batch_in_order(
    encoder, tmp_path, threads
) -> None:
    fast = onnx_encoder.onnx_encoder(encoder, SIZE, threads=threads, folder=tmp_path)
    assert isinstance(fast, OnnxEncoder) and fast.parts == threads
    pixels = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    (whole,) = fast.session.run(None, {"pixels": pixels.numpy()})  # one run, all 5 rows
    with torch.inference_mode():
        expected = encoder(pixels)
    for batch in (pixels, pixels[:2], pixels[:1]):  # 5 and 2 runs of one image; 1 whole
        torch.testing.assert_close(fast(batch), torch.from_numpy(whole[: len(batch)]))
        torch.testing.assert_close(fast(batch), expected[: len(batch)], rtol=1e-4, atol=1e-4)


class RecordingSession:
    """A stand-in for the one-thread session: which thread ran which image. Runs on the thread
    ``fail_in`` fail."""

    def __init__(self, fail_in: int | None = None) -> None:
        self.threads: dict[float, int] = {}
        self.fail_in = fail_in

    def run(self, _outputs: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (image,) = feeds["pixels"]  # one image per run
        marker = float(image.flat[0])
        time.sleep(0.01)  # long enough for every thread to take images
        if threading.get_ident() == self.fail_in:
            raise RuntimeError("this run failed")
        self.threads[marker] = threading.get_ident()
        return [np.full((1, 4), marker, dtype=np.float32)]


def test_the_threads_share_out_a_batch_and_its_rows_stay_in_order(encoder, tmp_path) -> None:
    fast = onnx_encoder.onnx_encoder(encoder, SIZE, threads=2, folder=tmp_path)
    fast.part_session = RecordingSession()
    pixels = torch.arange(8.0).reshape(8, 1, 1, 1).expand(8, 3, SIZE, SIZE)
    features = fast(pixels)
    assert features[:, 0].tolist() == list(range(8))
    assert len(set(fast.part_session.threads.values())) == 2  # both threads ran images


def test_a_failed_run_fails_the_call_after_every_other_run_ended(encoder, tmp_path) -> None:
    fast = onnx_encoder.onnx_encoder(encoder, SIZE, threads=2, folder=tmp_path)
    # The calling thread's first run fails while the pool's thread runs another image.
    fast.part_session = session = RecordingSession(fail_in=threading.get_ident())
    pixels = torch.arange(8.0).reshape(8, 1, 1, 1).expand(8, 3, SIZE, SIZE)
    with pytest.raises(RuntimeError, match="this run failed"):
        fast(pixels)
    ran = dict(session.threads)
    time.sleep(0.1)
    assert session.threads == ran  # nothing still running once the error was raised
    assert 1 <= len(ran) <= 3  # the other thread stopped taking images (without: all 7)


def test_one_thread_runs_every_batch_whole(encoder, tmp_path) -> None:
    fast = onnx_encoder.onnx_encoder(encoder, SIZE, threads=1, folder=tmp_path)
    assert isinstance(fast, OnnxEncoder) and fast.part_session is None


def test_the_export_is_cached_by_the_weights(encoder, tmp_path, monkeypatch) -> None:
    assert onnx_encoder.onnx_encoder(encoder, SIZE, folder=tmp_path) is not None
    assert [p.name for p in tmp_path.iterdir()] == [f"{fingerprint(encoder, SIZE)}.onnx"]

    def no_second_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_encoder, "export", no_second_export)
    assert onnx_encoder.onnx_encoder(encoder, SIZE, folder=tmp_path) is not None
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    assert fingerprint(encoder, SIZE) not in {p.stem for p in tmp_path.iterdir()}


def test_a_missing_runtime_falls_back_to_pytorch_with_one_line(
    encoder, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with caplog.at_level(logging.INFO, logger="captioner.onnx_encoder"):
        chosen = fast_encoder(encoder, SIZE, torch.device("cpu"))
    assert chosen is encoder
    assert [r.message for r in caplog.records] == [
        "onnxruntime is not installed: the CNN encoder runs in PyTorch"
    ]


def test_a_failed_export_falls_back_to_pytorch(encoder, tmp_path, monkeypatch, caplog) -> None:
    def broken(*args):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_encoder, "export", broken)
    assert onnx_encoder.onnx_encoder(encoder, SIZE, folder=tmp_path) is None
    assert "exporter exploded" in caplog.text and "runs in PyTorch" in caplog.text


def test_a_session_that_disagrees_with_pytorch_is_not_used(
    encoder, tmp_path, monkeypatch, caplog
) -> None:
    real_forward = OnnxEncoder.forward
    monkeypatch.setattr(OnnxEncoder, "forward", lambda self, x: real_forward(self, x) + 0.5)
    assert onnx_encoder.onnx_encoder(encoder, SIZE, folder=tmp_path) is None
    assert "differ from PyTorch" in caplog.text


def test_gpus_fine_tuning_and_the_torch_setting_keep_pytorch(tiny_vocab) -> None:
    frozen = make_tiny_model(tiny_vocab).encoder
    assert fast_encoder(frozen, SIZE, torch.device("cpu"), "torch") is frozen
    assert fast_encoder(frozen, SIZE, torch.device("cuda")) is frozen  # nothing runs on it
    trained = make_tiny_model(tiny_vocab, frozen=False).encoder
    assert fast_encoder(trained, SIZE, torch.device("cpu")) is trained
    with pytest.raises(ValueError, match="encoder runtime"):
        fast_encoder(frozen, SIZE, torch.device("cpu"), "tensorrt")


def test_captions_are_the_same_on_either_runtime(tiny_checkpoint) -> None:
    image_bytes = png_bytes(frame_image(7))
    fast = Captioner.load(tiny_checkpoint, device="cpu")
    eager = Captioner.load(tiny_checkpoint, device="cpu", encoder_runtime="torch")
    assert fast.describe()["encoder_runtime"] == "onnxruntime"
    assert eager.describe()["encoder_runtime"] == "torch"
    options = fast.options(beam_size=3, num_captions=3)
    got = fast.caption_images([image_bytes], options)[0].captions
    want = eager.caption_images([image_bytes], options)[0].captions
    assert [c.text for c in got] == [c.text for c in want]
    for a, b in zip(got, want, strict=True):
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-3)


@pytest.fixture
def torch_threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("threads", "decoder_threads"), [(1, 1), (2, 1), (4, 2)])
def test_loading_gives_the_cnn_every_thread_and_the_decoder_half(
    tiny_checkpoint, torch_threads_restored, threads, decoder_threads
) -> None:
    captioner = Captioner.load(tiny_checkpoint, device="cpu", num_threads=threads)
    assert isinstance(captioner.cnn, OnnxEncoder) and captioner.cnn.parts == threads
    assert torch.get_num_threads() == decoder_threads


def test_a_cnn_in_pytorch_keeps_every_thread(tiny_checkpoint, torch_threads_restored) -> None:
    Captioner.load(tiny_checkpoint, device="cpu", num_threads=2, encoder_runtime="torch")
    assert torch.get_num_threads() == 2
