"""Shared fixtures: a tiny seeded model, its checkpoint, and media files made on the fly."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import Checkpoint, save_checkpoint
from captioner.config import preset
from captioner.model import CaptionModel, create_model
from captioner.onnx_encoder import CACHE_ENV
from captioner.vocab import Vocab

TINY_CAPTIONS = [
    "a red circle",
    "a blue square to the left of a red circle",
    "a green star moves to the right",
    "a yellow triangle grows",
]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported encoders go to this session's folder (servers started by tests inherit it)."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vocab() -> Vocab:
    return Vocab.build(TINY_CAPTIONS)


def make_tiny_model(vocab: Vocab, seed: int = 0, frozen: bool = True) -> CaptionModel:
    torch.manual_seed(seed)
    config, _ = preset("test-tiny")
    config.vocab_size = len(vocab)
    config.encoder.frozen = frozen
    return create_model(config).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_vocab: Vocab) -> Path:
    _, preprocess = preset("test-tiny")
    model = make_tiny_model(tiny_vocab)
    directory = tmp_path_factory.mktemp("tiny-model")
    save_checkpoint(Checkpoint(model, tiny_vocab, preprocess, metadata={"name": "tiny"}), directory)
    return directory


def frame_image(index: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A frame whose brightness encodes its index, so sampled frames can be identified."""
    return Image.new("RGB", size, (index * 8 % 256, 60, 255 - index * 8 % 256))


def make_video(
    path: Path, codec: str, num_frames: int = 20, fps: int = 10, size: tuple[int, int] = (64, 48)
) -> Path:
    """Write a short clip with PyAV; frame i has red level 8*i."""
    if codec == "gif":
        frames = [frame_image(i, size) for i in range(num_frames)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
        return path
    pix_fmt = {"mjpeg": "yuvj420p"}.get(codec, "yuv420p")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(frame_image(i, size)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_slow_video(
    path: Path, num_frames: int, size: tuple[int, int] = (4096, 2160), fps: int = 1000
) -> Path:
    """A clip crafted to decode slowly: one flat H.264 keyframe muxed ``num_frames`` times.

    Each copy is a few KB but decodes as a full frame (at 4096x2160, tens of ms), so 1,000 of
    them make a 2.5 MB file, within every byte, pixel and duration limit, that takes a minute
    or more to decode. Writing it costs one encode. Only the first packet is flagged as a
    keyframe, as an attacker would do: a reader that seeks to keyframes cannot skip the rest.
    """
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"keyint": "1"})
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        flat = np.full((size[1], size[0], 3), 90, np.uint8)
        encoded = [*stream.encode(av.VideoFrame.from_ndarray(flat, format="rgb24"))]
        encoded += stream.encode()
        keyframe, time_base = bytes(encoded[0]), encoded[0].time_base
        for index in range(num_frames):
            packet = av.Packet(keyframe)
            packet.stream = stream
            packet.pts = packet.dts = index
            packet.time_base = time_base
            packet.is_keyframe = index == 0
            container.mux(packet)
    return path
