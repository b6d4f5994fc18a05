"""Hostile traffic against a real server process: media crafted to decode slowly, and clients
that trickle their uploads or stop halfway. Each must cost the server only what its limits
allow, while normal requests carry on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.app_support import png
from tests.conftest import make_slow_video
from tests.server_support import Server, running_server

DECODE_BUDGET_S = 2.0


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    env = {
        "CAPTIONER_PREPROCESS_WORKERS": "2",
        "CAPTIONER_MAX_DECODE_S": str(DECODE_BUDGET_S),
        "CAPTIONER_REQUEST_TIMEOUT_S": "60",  # so that a 504 cannot stand in for the budget
        "CAPTIONER_ACCESS_LOG": "false",
    }
    with running_server(tiny_checkpoint, log, env) as server:
        yield server


@pytest.mark.slow
def test_a_video_crafted_to_decode_slowly_gets_a_413_at_the_budget_while_others_carry_on(
    server, tmp_path
) -> None:
    # 1,000 flat 4096x2160 keyframes: 2.5 MB, 1 s long, within every byte, pixel, duration and
    # frame-count limit; decoding it all takes over a minute on a 2-core box.
    video = make_slow_video(tmp_path / "slow.mkv", num_frames=1000).read_bytes()
    image = png(3)
    answer: dict[str, object] = {}

    def send_video() -> None:
        started = time.monotonic()
        response = httpx.post(
            f"{server.url}/v1/captions/video?num_frames=8",
            content=video,
            headers={"Content-Type": "video/x-matroska"},
            timeout=120,
        )
        answer.update(response=response, seconds=time.monotonic() - started)

    sender = threading.Thread(target=send_video)
    sender.start()
    time.sleep(0.2)
    during: list[tuple[int, float]] = []  # image requests sent and answered while it decoded
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while sender.is_alive():
            started = time.monotonic()
            response = client.post(
                "/v1/captions/image", content=image, headers={"Content-Type": "image/png"}
            )
            if sender.is_alive():
                during.append((response.status_code, time.monotonic() - started))
            time.sleep(0.1)
    sender.join()
    response, seconds = answer["response"], answer["seconds"]
    assert isinstance(response, httpx.Response) and isinstance(seconds, float)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "decode_timeout" and error["param"] == "video"
    assert "2 s" in error["message"]
    # The answer comes once the decoding thread has given up (the service awaits it), so the
    # worker is free by then: at the budget, plus the upload, the probe and a busy box's slack.
    assert DECODE_BUDGET_S <= seconds < DECODE_BUDGET_S + 8, seconds
    print(f"\npathological video: 413 decode_timeout after {seconds:.2f} s")
    assert len(during) >= 3, during
    assert all(status == 200 for status, _ in during), during
