from __future__ import annotations

import io
import logging
import re
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.config import PreprocessConfig
from captioner.errors import ConfigError, InvalidMediaError, MediaTooLargeError
from captioner.media import (
    SNAP_AFTER_FRAMES,
    Preprocessor,
    VideoLimits,
    load_image,
    open_image,
    read_video,
    sample_indices,
    snapped_indices,
)
from tests.conftest import make_slow_video, make_video, png_bytes

SAMPLES = Path(__file__).resolve().parents[1] / "captioner" / "assets" / "samples"


def test_load_image_from_bytes_path_and_pil(tmp_path) -> None:
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    path = tmp_path / "x.png"
    image.save(path)
    for source in (png_bytes(image), path, str(path), image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (30, 20)
        assert loaded.getpixel((0, 0)) == (10, 200, 30)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (4, 4), 7)
    assert load_image(png_bytes(gray)).getpixel((0, 0)) == (7, 7, 7)


def test_bad_images_raise_invalid_media(tmp_path) -> None:
    with pytest.raises(InvalidMediaError, match="not a readable image"):
        load_image(b"definitely not an image")
    with pytest.raises(InvalidMediaError, match="no such file"):
        load_image(tmp_path / "missing.png")
    truncated = png_bytes(Image.new("RGB", (200, 200), (1, 2, 3)))[:-200]
    with pytest.raises(InvalidMediaError):
        load_image(truncated)


def test_pixel_limit_guards_against_decompression_bombs() -> None:
    big = png_bytes(Image.new("RGB", (300, 300)))
    with pytest.raises(MediaTooLargeError, match="90000 pixels"):
        load_image(big, max_pixels=50_000)


def test_preprocessor_resizes_crops_and_normalises() -> None:
    config = PreprocessConfig(
        image_size=32, resize_size=40, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    tensor = Preprocessor(config)(Image.new("RGB", (80, 60), (255, 0, 127)))
    assert tensor.shape == (3, 32, 32)
    assert torch.allclose(tensor[0], torch.ones(32, 32))
    assert torch.allclose(tensor[1], -torch.ones(32, 32))


def test_normalisation_gives_the_same_floats_as_the_arithmetic_on_every_pixel() -> None:
    """The preprocessor looks levels up in a table; the model was trained on the arithmetic."""
    config = PreprocessConfig(image_size=48, resize_size=48)
    levels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    levels[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]  # both ends of the range
    pixels = levels.astype(np.float32)
    mean, std = np.float32(config.mean), np.float32(config.std)
    expected = torch.from_numpy(((pixels / np.float32(255.0) - mean) / std).transpose(2, 0, 1))
    assert torch.equal(Preprocessor(config)(Image.fromarray(levels)), expected)


def test_sample_indices_are_uniform_segment_centres() -> None:
    assert sample_indices(20, 4) == [2, 7, 12, 17]
    assert sample_indices(3, 5) == [0, 0, 1, 2, 2]
    assert sample_indices(0, 4) == []


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [
        (".mp4", "libx264"),
        (".webm", "libvpx-vp9"),
        (".avi", "mjpeg"),
        (".mov", "mpeg4"),
        (".gif", "gif"),
    ],
)
def test_video_decoding_samples_uniformly_in_every_container(tmp_path, suffix, codec) -> None:
    path = make_video(tmp_path / f"clip{suffix}", codec, num_frames=20)
    frames, info = read_video(path, 4)
    assert len(frames) == 4 and info.frames_used == 4
    assert info.total_frames == 20
    assert frames[0].size == (64, 48)
    # Frame i was drawn with red = 8*i; the sampled ones are 2, 7, 12, 17 (lossy codecs: +-6).
    reds = [frame.getpixel((32, 24))[0] for frame in frames]
    assert [round(r / 8) for r in reds] == [2, 7, 12, 17], reds
    assert info.duration_s == pytest.approx(2.0, abs=0.15)
    frames_from_bytes, _ = read_video(path.read_bytes(), 4)
    assert [f.getpixel((32, 24)) for f in frames_from_bytes] == [
        f.getpixel((32, 24)) for f in frames
    ]


def test_more_frames_requested_than_the_video_has(tmp_path) -> None:
    path = make_video(tmp_path / "short.mp4", "libx264", num_frames=3)
    frames, info = read_video(path, 6)
    assert len(frames) == 6 and info.total_frames == 3


def test_corrupt_and_unsupported_videos(tmp_path) -> None:
    with pytest.raises(InvalidMediaError):
        read_video(b"\x00\x01 not a video at all" * 10, 4)
    with pytest.raises(InvalidMediaError, match="no such file"):
        read_video(tmp_path / "missing.mp4", 4)
    good = make_video(tmp_path / "clip.mp4", "libx264", num_frames=20).read_bytes()
    with pytest.raises(InvalidMediaError):
        read_video(good[: len(good) // 3], 4)
    audio_only = io.BytesIO()
    with av.open(audio_only, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(InvalidMediaError, match="no video stream"):
        read_video(audio_only.getvalue(), 4)


def test_a_video_stream_of_an_unknown_codec_is_invalid_media() -> None:
    # Found by the soak (benchmarks/soak.py): a mutated mp4 whose sample entry names no codec
    # FFmpeg has; PyAV then gives the stream no codec context, which was a 500.
    clip = (SAMPLES / "motion.mp4").read_bytes()
    with pytest.raises(InvalidMediaError, match="codec is unknown"):
        read_video(clip.replace(b"avc1", b"zzzz"), 4)


def test_video_limits(tmp_path) -> None:
    path = make_video(tmp_path / "clip.mp4", "libx264", num_frames=20)
    with pytest.raises(MediaTooLargeError, match="lasts"):
        read_video(path, 4, VideoLimits(max_duration_s=1.0))
    with pytest.raises(MediaTooLargeError, match="frames"):
        read_video(path, 4, VideoLimits(max_total_frames=10))
    with pytest.raises(MediaTooLargeError, match="pixels"):
        read_video(path, 4, VideoLimits(max_pixels=100))


def test_decompression_bombs_and_extreme_aspect_ratios_are_refused(monkeypatch) -> None:
    data = png_bytes(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own guard fires at 2x this
    with pytest.raises(MediaTooLargeError):
        load_image(data)
    monkeypatch.undo()
    with pytest.raises(MediaTooLargeError, match="50:1"):
        load_image(png_bytes(Image.new("RGB", (4000, 2))))


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert image.mode.startswith("I")
    assert load_image(png_bytes(image)).getpixel((0, 0)) == (127, 127, 127)


def test_bad_preprocess_config_is_a_config_error() -> None:
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match="interpolation"):
        Preprocessor(PreprocessConfig(interpolation="lanczos9"))
    with pytest.raises(ConfigError, match="mean and std"):
        Preprocessor(PreprocessConfig(mean=(0.5,)))


def _rotated_clip(path, rotation: int) -> None:
    """A landscape 64x32 clip, left half white, whose display matrix turns it ``rotation``
    degrees counter-clockwise, as phones store portrait video."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(rotation)
        stored = np.zeros((32, 64, 3), np.uint8)
        stored[:, :32] = 255
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
    reason="this PyAV cannot write a display matrix",
)
@pytest.mark.parametrize(
    ("rotation", "size", "white_at", "black_at"),
    [
        # -90: turn clockwise, as a phone held upright records; the stored left goes to the top.
        (-90, (32, 64), (16, 8), (16, 56)),
        (90, (32, 64), (16, 56), (16, 8)),  # counter-clockwise: the stored left goes down
        (180, (64, 32), (48, 16), (16, 16)),
        (0, (64, 32), (16, 16), (48, 16)),
    ],
)
def test_videos_are_turned_upright_by_their_display_matrix(
    tmp_path, rotation, size, white_at, black_at
) -> None:
    path = tmp_path / f"rotated{rotation}.mp4"
    _rotated_clip(path, rotation)
    frames, info = read_video(path, 2)
    assert (info.width, info.height) == size
    for frame in frames:
        assert frame.size == size
        assert min(frame.getpixel(white_at)) > 200 and max(frame.getpixel(black_at)) < 50


def test_large_jpegs_decode_in_draft_mode_to_nearly_the_same_pixels() -> None:
    from captioner.media import Preprocessor, open_image

    gradient = np.linspace(0, 255, 1600 * 1200 * 3).reshape(1200, 1600, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    drafted, info = open_image(data, draft=448)
    full, _ = open_image(data)
    assert (info.width, info.height) == (1600, 1200)  # what was sent, not what was decoded
    assert drafted.size == (800, 600) and full.size == (1600, 1200)  # DCT scaling 1/2
    prepare = Preprocessor(PreprocessConfig())
    difference = (prepare(drafted) - prepare(full)).abs().max().item()
    assert difference < 0.1  # normalised units: about 2 of 255 grey levels
    small, _ = open_image(data, draft=700)  # 1/2 would go under 2 x 700: decoded in full
    assert small.size == (1600, 1200)


def test_a_video_crafted_to_decode_slowly_is_stopped_at_the_decode_budget(tmp_path) -> None:
    from captioner.errors import DecodeTimeoutError

    two = make_slow_video(tmp_path / "two.mkv", num_frames=2)
    started = time.monotonic()
    frames, _ = read_video(two, 1)  # frame 1 of 2: two keyframes decoded
    one_frame = (time.monotonic() - started) / 2
    assert len(frames) == 1
    path = make_slow_video(tmp_path / "slow.mkv", num_frames=400)
    budget = 0.5
    started = time.monotonic()
    with pytest.raises(DecodeTimeoutError, match=r"longer than the limit of 0.5 s"):
        read_video(path, 8, VideoLimits(max_decode_s=budget))
    took = time.monotonic() - started
    # Stopped within the budget plus about one frame's decode (a loaded CI box: generous),
    # while the whole clip takes hundreds of frames' time.
    assert took < budget + 4 * one_frame + 1.0, (took, one_frame)
    with pytest.raises(DecodeTimeoutError):  # from bytes too
        read_video(path.read_bytes(), 8, VideoLimits(max_decode_s=budget))


def test_many_tiny_frames_are_stopped_at_the_decode_budget_while_counting(tmp_path) -> None:
    from captioner.errors import DecodeTimeoutError

    # 20,000 frames of 16x16 take seconds to count and decode (3 s on a busy 2-core box).
    path = make_slow_video(tmp_path / "tiny.mkv", num_frames=20_000, size=(16, 16))
    started = time.monotonic()
    # No frame count in the header: the packets are counted first, and the deadline runs there.
    with pytest.raises(DecodeTimeoutError):
        read_video(path, 8, VideoLimits(max_decode_s=0.05))
    assert time.monotonic() - started < 1.0


def test_a_decode_budget_leaves_normal_clips_alone(tmp_path) -> None:
    path = make_video(tmp_path / "clip.mp4", "libx264", num_frames=20)
    frames, info = read_video(path, 4, VideoLimits(max_decode_s=30))
    assert len(frames) == 4 and info.total_frames == 20


# -- seeking and keyframe sampling on long clips ----------------------------------------------


def make_numbered_video(
    path: Path, num_frames: int, keyint: int, container_format: str | None = None
) -> Path:
    """An H.264 clip whose frame i is a flat colour that encodes i (``frame_number`` reads it),
    with keyframes exactly every ``keyint`` frames (no scene-cut keyframes) and x264's B-frames."""
    assert num_frames <= 256
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(
            "libx264", rate=30, options={"x264-params": f"keyint={keyint}:scenecut=0"}
        )
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(num_frames):
            colour = ((i % 16) * 16 + 8, 128, (i // 16) * 16 + 8)
            pixels = np.full((48, 64, 3), colour, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_number(image: Image.Image) -> int:
    red, _, blue = image.getpixel((32, 24))
    return (blue // 16) * 16 + red // 16  # levels 16 apart: a lossy codec's +-7 is harmless


def decode_stats(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(frames decoded, decoding runs) from the last read's debug line."""
    found = re.findall(r"(\d+) decoded in (\d+) runs", caplog.text)
    assert found, caplog.text
    decoded, runs = found[-1]
    return int(decoded), int(runs)


def keyframe_indices(path: Path) -> list[int]:
    """Which frames, in presentation order, are keyframes: read here with PyAV directly."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.is_keyframe) for p in container.demux(stream) if p.size)
    return [index for index, (_, key) in enumerate(packets) if key]


def test_snapping_takes_a_keyframe_only_where_reaching_the_centre_is_costly() -> None:
    # 240 frames, keyframes every 80, 4 segments of 60 with centres 30, 90, 150, 210:
    # 30 would decode 31 frames from 0: the keyframe 0 in its segment instead; 90 is 11 frames
    # after the keyframe 80: kept; 150 would decode on from 91 (60 frames): the keyframe 160 is
    # in its segment; 210 costs 50 from 161, but its segment [180, 240) holds no keyframe.
    assert snapped_indices(240, 4, [0, 80, 160]) == [0, 90, 160, 210]
    assert sample_indices(240, 4) == [30, 90, 150, 210]
    assert snapped_indices(240, 4, []) == [30, 90, 150, 210]  # nothing to snap to
    # Every frame a keyframe (MJPEG, all-intra): every centre costs one frame.
    assert snapped_indices(240, 4, list(range(240))) == [30, 90, 150, 210]
    # One sample: of 40 frames, the centre (20) costs 21 frames, so the keyframe 0 instead; of
    # 28, the centre (14) costs SNAP_AFTER_FRAMES = 15 frames: kept.
    assert snapped_indices(40, 1, [0]) == [0]
    assert snapped_indices(2 * SNAP_AFTER_FRAMES - 2, 1, [0]) == [SNAP_AFTER_FRAMES - 1]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    total=st.integers(1, 3000),
    num_frames=st.integers(1, 32),
    keyframe_set=st.sets(st.integers(0, 2999), max_size=40),
)
def test_snapped_samples_come_one_from_each_segment_in_order(
    total: int, num_frames: int, keyframe_set: set[int]
) -> None:
    keyframes = sorted(k for k in keyframe_set if k < total)
    snapped = snapped_indices(total, num_frames, keyframes)
    centres = sample_indices(total, num_frames)
    assert len(snapped) == num_frames
    for segment, (index, centre) in enumerate(zip(snapped, centres, strict=True)):
        if index != centre:
            assert index in keyframes
            assert segment * total / num_frames <= index < (segment + 1) * total / num_frames
    if total >= num_frames:
        assert snapped == sorted(set(snapped))
    if total <= SNAP_AFTER_FRAMES * num_frames:  # no segment is long: reaching any centre is cheap
        assert snapped == centres


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [
        (".mp4", "libx264"),
        (".webm", "libvpx-vp9"),
        (".avi", "mjpeg"),
        (".mov", "mpeg4"),
        (".gif", "gif"),
    ],
)
def test_short_clips_get_the_same_frames_as_before_keyframe_snapping(
    tmp_path, suffix, codec
) -> None:
    # The helper's clips (20 frames, 3 in one test), at any number of frames asked for, and a
    # 120-frame clip at the default 8 (segments of 15 frames: SNAP_AFTER_FRAMES).
    for length, asked in [(20, range(1, 25)), (3, range(1, 6)), (120, [8])]:
        path = make_video(tmp_path / f"clip{length}{suffix}", codec, num_frames=length)
        keyframes = keyframe_indices(path)
        for num_frames in asked:
            assert snapped_indices(length, num_frames, keyframes) == sample_indices(
                length, num_frames
            ), (length, num_frames, keyframes)
    path = make_video(tmp_path / f"clip{suffix}", codec, num_frames=20)
    for num_frames in (4, 8):  # and the two policies read the same pixels
        fast, _ = read_video(path, num_frames)
        exact, _ = read_video(path, num_frames, VideoLimits(sampling="exact"))
        assert [f.tobytes() for f in fast] == [f.tobytes() for f in exact]


@pytest.mark.parametrize(
    ("suffix", "container_format"),
    [(".mp4", None), (".mkv", None), (".ts", "mpegts")],  # MPEG-TS seeks by decode timestamp
)
def test_a_long_gop_clip_is_read_by_seeking_to_keyframes(
    tmp_path, caplog, suffix, container_format
) -> None:
    path = make_numbered_video(tmp_path / f"long{suffix}", 240, 80, container_format)
    assert keyframe_indices(path) == [0, 80, 160]
    caplog.set_level(logging.DEBUG, logger="captioner.media")
    frames, info = read_video(path, 4)  # "fast", the default
    assert [frame_number(f) for f in frames] == [0, 90, 160, 210]
    assert info.total_frames == 240 and info.frames_used == 4
    decoded, runs = decode_stats(caplog)
    # Runs: 0 from the start; 90 after a seek to 80 (11 frames); 160 after a seek, then on to
    # 210 (51 frames). Sequential decoding would have given 211 frames.
    assert runs == 3 and decoded <= 70, (decoded, runs)
    frames, _ = read_video(path.read_bytes(), 4, VideoLimits(sampling="exact"))
    assert [frame_number(f) for f in frames] == [30, 90, 150, 210]
    decoded, runs = decode_stats(caplog)
    # 0-30 from the start; seek to 80, on to 150; seek to 160, on to 210.
    assert runs == 3 and decoded <= 160, (decoded, runs)
    # Many samples per run: B-frames come after later frames in decode order, and a run must
    # not stop before they are decoded.
    for num_frames in (7, 16, 50, 120):
        exact, _ = read_video(path, num_frames, VideoLimits(sampling="exact"))
        assert [frame_number(f) for f in exact] == sample_indices(240, num_frames)
        fast, _ = read_video(path, num_frames)
        assert [frame_number(f) for f in fast] == snapped_indices(240, num_frames, [0, 80, 160])


def test_a_short_keyframe_interval_gives_exact_centres_in_both_policies(tmp_path, caplog) -> None:
    path = make_numbered_video(tmp_path / "phone.mp4", 240, keyint=10)
    caplog.set_level(logging.DEBUG, logger="captioner.media")
    centres = sample_indices(240, 5)  # 24, 72, 120, 168, 216: at most 9 frames past a keyframe
    for sampling in ("fast", "exact"):
        frames, _ = read_video(path, 5, VideoLimits(sampling=sampling))
        assert [frame_number(f) for f in frames] == centres
        decoded, runs = decode_stats(caplog)
        assert runs == 5 and decoded <= 5 * 10, (decoded, runs)


@pytest.mark.parametrize(
    ("suffix", "container_format"),
    [
        (".h264", "h264"),  # a raw H.264 stream has no timestamps at all
        (".avi", "avi"),  # AVI makes them up in decode order, which B-frames reorder
    ],
)
def test_a_stream_without_usable_timestamps_is_decoded_from_the_start(
    tmp_path, caplog, suffix, container_format
) -> None:
    # Frames cannot be matched to packets after a seek: decoding goes from the start and counts
    # frames, as it always did.
    path = make_numbered_video(tmp_path / f"clip{suffix}", 240, 80, container_format)
    caplog.set_level(logging.DEBUG, logger="captioner.media")
    for sampling in ("fast", "exact"):
        frames, info = read_video(path, 4, VideoLimits(sampling=sampling))
        assert [frame_number(f) for f in frames] == [30, 90, 150, 210]
        assert info.total_frames == 240
        decoded, runs = decode_stats(caplog)
        assert runs == 1 and decoded == 211, (decoded, runs)


def test_an_unknown_sampling_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sampling"):
        VideoLimits(sampling="keyframes")  # type: ignore[arg-type]


def test_exif_orientation_turns_opened_photos_upright_and_leaves_callers_images_alone() -> None:
    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (220, 20, 20)  # stored: red left half, blue right half
    pixels[:, 32:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown a quarter turn clockwise, as phones store portraits
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    opened, info = open_image(buffer.getvalue())
    assert opened.size == (40, 64) and (info.width, info.height) == (40, 64)
    upright = np.asarray(opened)
    assert upright[5, 20, 0] > 200 and upright[-5, 20, 2] > 200  # red on top, blue below
    callers = Image.open(io.BytesIO(buffer.getvalue()))
    turned, _ = open_image(callers)
    assert turned.size == (40, 64) and callers.size == (64, 40)
    assert callers.getexif().get(0x0112) == 6
