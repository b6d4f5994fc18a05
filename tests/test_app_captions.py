from __future__ import annotations

import base64
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from app.main import create_app
from captioner.inference import Captioner
from tests.app_support import (
    KiB,
    assert_error,
    image_files,
    png,
    ready_client,
    tiny_settings,
)
from tests.conftest import make_video, png_bytes

RESPONSE_KEYS = {"id", "model", "caption", "captions", "input", "timings_ms"} | {
    "tags",
    "in_domain",
    "domain_score",
    "warnings",
}
TIMING_KEYS = {"queue", "preprocess", "inference", "total"}


@pytest.fixture(scope="module")
def settings(tiny_checkpoint):
    return tiny_settings(tiny_checkpoint, max_pixels=100_000, max_video_duration_s=3.0)


@pytest.fixture(scope="module")
def client(settings):
    with ready_client(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint) -> Captioner:
    """The same model used directly: what the service must answer, exactly."""
    return Captioner.load(tiny_checkpoint, device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4", "libx264", num_frames=20)


def expected(captioner: Captioner, data: bytes, **options) -> list[dict]:
    (result,) = captioner.caption_images([data], captioner.options(**options))
    return [{"text": c.text, "log_prob": c.log_prob, "score": c.score} for c in result.captions]


# -- POST /v1/captions/image -------------------------------------------------------------------


def test_image_as_multipart_with_form_options(client, captioner) -> None:
    response = client.post(
        "/v1/captions/image",
        files={"image": ("a.png", png(3), "image/png")},
        data={"beam_size": "3", "num_captions": "2", "max_length": "6", "length_penalty": "0.5"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RESPONSE_KEYS and set(body["timings_ms"]) == TIMING_KEYS
    assert body["id"] == response.headers["x-request-id"]
    assert body["model"] == {"name": "tiny", "version": "0"}
    assert body["input"] == {"width": 64, "height": 48, "format": "png"}
    assert body["captions"] == expected(
        captioner, png(3), beam_size=3, num_captions=2, max_length=6, length_penalty=0.5
    )
    assert body["caption"] == body["captions"][0]["text"]
    timings = body["timings_ms"]
    assert timings["total"] >= timings["inference"] > 0 and timings["preprocess"] > 0


def test_image_as_raw_body_with_query_options(client, captioner) -> None:
    jpeg = Image.new("RGB", (90, 70), (10, 200, 40))
    buffer = io.BytesIO()
    jpeg.save(buffer, format="JPEG")
    response = client.post(
        "/v1/captions/image?beam_size=1&max_length=4",
        content=buffer.getvalue(),
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"] == {"width": 90, "height": 70, "format": "jpeg"}
    assert body["captions"] == expected(captioner, buffer.getvalue(), beam_size=1, max_length=4)


def test_image_as_base64_json_and_as_data_url(client, captioner) -> None:
    encoded = base64.b64encode(png(5)).decode()
    for value in (encoded, f"data:image/png;base64,{encoded}"):
        response = client.post("/v1/captions/image", json={"image_base64": value, "beam_size": 2})
        assert response.status_code == 200, response.text
        assert response.json()["captions"] == expected(captioner, png(5), beam_size=2)


def test_body_options_override_query_options(client, captioner) -> None:
    response = client.post(
        "/v1/captions/image?max_length=2&beam_size=2",
        files={"image": ("a.png", png(1), "image/png")},
        data={"max_length": "5"},
    )
    assert response.json()["captions"] == expected(captioner, png(1), max_length=5, beam_size=2)


def test_n_best_captions(client) -> None:
    body = client.post(
        "/v1/captions/image?beam_size=4&num_captions=4",
        content=png(2),
        headers={"Content-Type": "image/png"},
    ).json()
    assert len(body["captions"]) == 4 and all(c["log_prob"] <= 0 for c in body["captions"])


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("beam_size=0", "beam_size"),
        ("beam_size=11", "beam_size"),
        ("beam_size=two", "beam_size"),
        ("num_captions=0", "num_captions"),
        ("num_captions=11", "num_captions"),
        ("max_length=0", "max_length"),
        ("max_length=65", "max_length"),
        ("length_penalty=-0.1", "length_penalty"),
        ("length_penalty=5.5", "length_penalty"),
        ("beam_size=2&num_captions=3", "num_captions"),
        ("beam=3", "beam"),
    ],
)
def test_out_of_range_options_are_invalid_parameter(client, query, param) -> None:
    response = client.post(
        f"/v1/captions/image?{query}", content=png(), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "invalid_parameter", param)


def test_bad_form_option_is_invalid_parameter(client) -> None:
    response = client.post(
        "/v1/captions/image",
        files={"image": ("a.png", png(), "image/png")},
        data={"max_length": "100"},
    )
    assert_error(response, 422, "invalid_parameter", "max_length")


def test_undecodable_image_is_invalid_image(client) -> None:
    response = client.post(
        "/v1/captions/image", content=b"not an image", headers={"Content-Type": "image/png"}
    )
    assert_error(response, 400, "invalid_image", "image")


def test_decompression_bomb_is_refused_by_pixel_count(client) -> None:
    big = png_bytes(Image.new("RGB", (400, 300)))  # 120k pixels, a few hundred bytes
    response = client.post("/v1/captions/image", content=big, headers={"Content-Type": "image/png"})
    error = assert_error(response, 413, "payload_too_large", "image")
    assert "100000" in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "video/mp4", None])
def test_wrong_content_type_is_unsupported_media_type(client, content_type) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/captions/image", content=png(), headers=headers)
    assert_error(response, 415, "unsupported_media_type")


def test_multipart_needs_exactly_one_image_file(client) -> None:
    missing = client.post("/v1/captions/image", files={"other": ("a.png", png(), "image/png")})
    assert_error(missing, 422, "invalid_parameter", "image")
    two = client.post("/v1/captions/image", files=image_files(2, field="image"))
    assert_error(two, 422, "invalid_parameter", "image")
    text = client.post(
        "/v1/captions/image",
        data={"image": "not a file"},
        files={"x": ("x.txt", b"", "text/plain")},
    )
    assert_error(text, 422, "invalid_parameter", "image")


def test_malformed_bodies(client) -> None:
    bad_json = client.post(
        "/v1/captions/image", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert_error(bad_json, 400, "invalid_request")
    no_field = client.post("/v1/captions/image", json={"image": "x"})
    assert_error(no_field, 422, "invalid_parameter", "image_base64")
    bad_base64 = client.post("/v1/captions/image", json={"image_base64": "***"})
    assert_error(bad_base64, 400, "invalid_image", "image_base64")
    extra = client.post(
        "/v1/captions/image",
        json={"image_base64": base64.b64encode(png()).decode(), "colour": "red"},
    )
    assert_error(extra, 422, "invalid_parameter", "colour")
    bad_multipart = client.post(
        "/v1/captions/image",
        content=b"garbage",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert_error(bad_multipart, 400, "invalid_request")


# -- byte limits: Content-Length checked first, streamed bytes counted ---------------------------


def test_raw_image_over_the_byte_limit(client, settings) -> None:
    body = b"\0" * (settings.max_image_bytes + 1)
    response = client.post(
        "/v1/captions/image", content=body, headers={"Content-Type": "image/png"}
    )
    assert_error(response, 413, "payload_too_large", "image")


def test_streamed_body_without_content_length_is_cut_off(client, settings) -> None:
    def chunks():
        for _ in range(100):  # 100 x 8 KiB, sent chunked: far past the 64 KiB limit
            yield b"\0" * (8 * KiB)

    response = client.post(
        "/v1/captions/image", content=chunks(), headers={"Content-Type": "image/png"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large", "image")


def test_declared_content_length_over_the_limit_is_refused_before_reading(client) -> None:
    def never():
        raise AssertionError("the body must not be read")
        yield b""

    response = client.post(
        "/v1/captions/image",
        content=never(),
        headers={"Content-Type": "image/png", "Content-Length": str(10**10)},
    )
    assert_error(response, 413, "payload_too_large", "image")


def test_multipart_and_json_images_over_the_limit(client, settings) -> None:
    big = b"\0" * (settings.max_image_bytes + 10)
    multipart = client.post("/v1/captions/image", files={"image": ("a.png", big, "image/png")})
    assert_error(multipart, 413, "payload_too_large", "image")
    as_json = client.post(
        "/v1/captions/image", json={"image_base64": base64.b64encode(big).decode()}
    )
    assert_error(as_json, 413, "payload_too_large", "image_base64")


# -- POST /v1/captions/images ------------------------------------------------------------------


def test_images_in_input_order_with_one_bad_item(client, captioner, settings) -> None:
    files = image_files(4)
    files[1] = ("images", ("bad.png", b"garbage", "image/png"))
    files[3] = ("images", ("big.png", b"\0" * (settings.max_image_bytes + 1), "image/png"))
    response = client.post("/v1/captions/images?beam_size=2", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "model", "results"}
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    for index in (0, 2):
        assert results[index]["captions"] == expected(captioner, png(index), beam_size=2)
        assert results[index]["input"]["format"] == "png"
    assert results[1]["error"]["type"] == "invalid_image"
    assert results[1]["error"]["param"] == "images[1]"
    assert results[3]["error"]["type"] == "payload_too_large"
    assert results[3]["error"]["param"] == "images[3]"


def test_images_limits_and_shape_errors(client, settings) -> None:
    too_many = client.post("/v1/captions/images", files=image_files(settings.max_images + 1))
    assert_error(too_many, 413, "too_many_images", "images")
    none = client.post("/v1/captions/images", data={"beam_size": "2"}, files={"x": ("", b"")})
    assert_error(none, 422, "invalid_parameter")
    raw = client.post("/v1/captions/images", content=png(), headers={"Content-Type": "image/png"})
    assert_error(raw, 415, "unsupported_media_type")
    bad_option = client.post("/v1/captions/images", files=image_files(1), data={"beam_size": "0"})
    assert_error(bad_option, 422, "invalid_parameter", "beam_size")


# -- POST /v1/captions/video -------------------------------------------------------------------


def test_video_as_multipart_file(client, captioner, clip) -> None:
    response = client.post(
        "/v1/captions/video",
        files={"video": ("clip.mp4", clip.read_bytes(), "video/mp4")},
        data={"num_frames": "4", "beam_size": "2"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RESPONSE_KEYS
    assert body["input"] == {
        "frames_used": 4,
        "duration_s": 2.0,
        "fps": 10.0,
        "codec": "h264",
        "width": 64,
        "height": 48,
    }
    direct = captioner.caption_video(clip, 4, captioner.options(beam_size=2))
    assert body["captions"] == [
        {"text": c.text, "log_prob": c.log_prob, "score": c.score} for c in direct.captions
    ]


def test_video_as_raw_body_uses_the_models_frame_count(client, captioner, clip) -> None:
    response = client.post(
        "/v1/captions/video", content=clip.read_bytes(), headers={"Content-Type": "video/mp4"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["input"]["frames_used"] == captioner.num_frames


def test_gif_and_webm_videos(client, tmp_path) -> None:
    gif = make_video(tmp_path / "a.gif", "gif", num_frames=6)
    response = client.post(
        "/v1/captions/video?num_frames=3",
        content=gif.read_bytes(),
        headers={"Content-Type": "image/gif"},
    )
    assert response.status_code == 200 and response.json()["input"]["codec"] == "gif"
    webm = make_video(tmp_path / "a.webm", "libvpx-vp9", num_frames=6)
    response = client.post(
        "/v1/captions/video", files={"video": ("a.webm", webm.read_bytes(), "video/webm")}
    )
    assert response.status_code == 200 and response.json()["input"]["codec"] == "vp9"


def test_frame_list_in_order_and_thinned_by_num_frames(client, captioner) -> None:
    frames = [png(i) for i in range(10)]
    files = [("frames", (f"{i:03d}.png", f, "image/png")) for i, f in enumerate(frames)]
    response = client.post("/v1/captions/video", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"] == {
        "frames_used": 10,
        "duration_s": None,
        "fps": None,
        "codec": None,
        "width": 64,  # the first frame's size
        "height": 48,
    }
    direct = captioner.caption_frames(frames)
    assert body["captions"] == [
        {"text": c.text, "log_prob": c.log_prob, "score": c.score} for c in direct.captions
    ]
    thinned = client.post("/v1/captions/video?num_frames=5", files=files).json()
    assert thinned["input"]["frames_used"] == 5
    direct = captioner.caption_frames(frames[1::2])  # segment centres of 10 frames, 5 segments
    assert thinned["captions"][0]["text"] == direct.caption


def test_frame_and_num_frames_limits(client, clip, settings) -> None:
    over = settings.max_frames + 1
    asked = client.post(
        f"/v1/captions/video?num_frames={over}",
        content=clip.read_bytes(),
        headers={"Content-Type": "video/mp4"},
    )
    assert_error(asked, 413, "too_many_frames", "num_frames")
    sent = client.post("/v1/captions/video", files=image_files(over, field="frames"))
    assert_error(sent, 413, "too_many_frames", "frames")
    zero = client.post(
        "/v1/captions/video?num_frames=0",
        content=clip.read_bytes(),
        headers={"Content-Type": "video/mp4"},
    )
    assert_error(zero, 422, "invalid_parameter", "num_frames")


def test_video_errors(client, clip, settings, tmp_path) -> None:
    corrupt = client.post(
        "/v1/captions/video", content=b"\0" * 1000, headers={"Content-Type": "video/mp4"}
    )
    assert_error(corrupt, 400, "invalid_video", "video")
    bad_frame = client.post(
        "/v1/captions/video",
        files=[*image_files(2, field="frames"), ("frames", ("x.png", b"nope", "image/png"))],
    )
    assert_error(bad_frame, 400, "invalid_video", "frames")
    both = client.post(
        "/v1/captions/video",
        files=[("video", ("c.mp4", clip.read_bytes(), "video/mp4")), *image_files(1, "frames")],
    )
    assert_error(both, 422, "invalid_parameter", "video")
    neither = client.post("/v1/captions/video", data={"num_frames": "2"}, files={"x": ("", b"")})
    assert_error(neither, 422, "invalid_parameter", "video")
    too_big = client.post(
        "/v1/captions/video",
        content=b"\0" * (settings.max_video_bytes + 1),
        headers={"Content-Type": "video/mp4"},
    )
    assert_error(too_big, 413, "payload_too_large", "video")
    too_big_part = client.post(
        "/v1/captions/video",
        files={"video": ("c.mp4", b"\0" * (settings.max_video_bytes + 1), "video/mp4")},
    )
    assert_error(too_big_part, 413, "payload_too_large", "video")
    long = make_video(tmp_path / "long.mp4", "libx264", num_frames=40, fps=10)  # 4 s > 3 s
    too_long = client.post(
        "/v1/captions/video", content=long.read_bytes(), headers={"Content-Type": "video/mp4"}
    )
    assert_error(too_long, 413, "payload_too_large", "video")
    wrong_type = client.post(
        "/v1/captions/video", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_error(wrong_type, 415, "unsupported_media_type")


def test_uploaded_videos_leave_no_temporary_files(client, clip, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for content in (clip.read_bytes(), b"\0" * 100):
        client.post("/v1/captions/video", content=content, headers={"Content-Type": "video/mp4"})
    client.post("/v1/captions/video", files={"video": ("c.mp4", clip.read_bytes(), "video/mp4")})
    assert not list(tmp_path.glob("captioner-*"))


# -- batching through the HTTP layer -----------------------------------------------------------


def test_concurrent_requests_with_mixed_options_are_batched_and_each_right(
    tiny_checkpoint, captioner
) -> None:
    app = create_app(tiny_settings(tiny_checkpoint, max_batch_size=8, max_wait_ms=300))
    option_sets = [
        {"beam_size": 1},
        {"beam_size": 3, "num_captions": 2},
        {"max_length": 3},
        {"beam_size": 2, "length_penalty": 0.0},
    ] * 2
    with ready_client(app) as client:

        def post(i: int):
            return client.post(
                "/v1/captions/image",
                params=option_sets[i],
                content=png(i),
                headers={"Content-Type": "image/png"},
            )

        with ThreadPoolExecutor(len(option_sets)) as pool:
            responses = list(pool.map(post, range(len(option_sets))))
        for i, response in enumerate(responses):
            assert response.status_code == 200, response.text
            assert response.json()["captions"] == expected(captioner, png(i), **option_sets[i])
        registry = app.state.service.metrics.registry
        batches = registry.get_sample_value("captioner_batch_size_count")
        assert batches < len(option_sets)  # at least two requests shared one model call


# -- tags and the domain flag -----------------------------------------------------------------


def test_tags_from_a_model_without_a_classifier_are_a_clear_422(client, clip) -> None:
    image = client.post("/v1/captions/image?tags=3", files={"image": ("a.png", png(1))})
    body = assert_error(image, 422, "tags_unavailable", param="tags")
    assert "EfficientNet-Lite0 ImageNet classifier" in body["message"]
    batch = client.post("/v1/captions/images", data={"tags": "2"}, files=image_files(2))
    assert_error(batch, 422, "tags_unavailable", param="tags")
    with open(clip, "rb") as video:
        answer = client.post("/v1/captions/video?tags=1", files={"video": ("c.mp4", video)})
    assert_error(answer, 422, "tags_unavailable", param="tags")
    assert_error(
        client.post("/v1/captions/image?tags=21", files={"image": ("a.png", png(1))}),
        422,
        "invalid_parameter",
        param="tags",
    )


def test_without_a_domain_summary_the_flag_is_null(client) -> None:
    body = client.post("/v1/captions/image", files={"image": ("a.png", png(1))}).json()
    assert body["in_domain"] is None and body["domain_score"] is None
    assert body["tags"] == [] and body["warnings"] == []


def test_video_errors_name_the_upload_not_a_server_path(client) -> None:
    text = client.post(
        "/v1/captions/video", files={"video": ("notes.mp4", b"just some text, not a video")}
    )
    error = assert_error(text, 400, "invalid_video", param="video")
    assert error["message"].startswith("video: not a readable video (")
    assert tempfile.gettempdir() not in error["message"] and "Errno" not in error["message"]


def test_a_bad_frame_is_named_by_its_position(client) -> None:
    files = [("frames", ("a.png", png(1))), ("frames", ("b.png", b"not a picture at all"))]
    error = assert_error(client.post("/v1/captions/video", files=files), 400, "invalid_video")
    assert error["message"] == "frames[1]: not a readable image"


def test_an_exif_rotated_photo_reports_its_upright_size(client) -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated a quarter turn: a portrait phone photo
    Image.new("RGB", (64, 40), (200, 30, 30)).save(buffer, format="JPEG", exif=exif)
    body = client.post("/v1/captions/image", files={"image": ("p.jpg", buffer.getvalue())}).json()
    assert (body["input"]["width"], body["input"]["height"]) == (40, 64)


def test_a_still_image_sent_as_a_video_is_a_400_naming_the_image_endpoint(client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(buffer, format="JPEG")
    response = client.post("/v1/captions/video", files={"video": ("x.mp4", buffer.getvalue())})
    error = assert_error(response, 400, "invalid_video", param="video")
    assert "still image, not a video" in error["message"]
    assert "POST /v1/captions/image" in error["message"]
    raw = client.post(  # a PNG, as a raw body
        "/v1/captions/video", content=png(2), headers={"Content-Type": "video/mp4"}
    )
    assert "still image" in assert_error(raw, 400, "invalid_video")["message"]
