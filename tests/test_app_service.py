from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.main import create_app
from app.service import CaptionService, available_cpus
from captioner.inference import Captioner
from tests.app_support import assert_error, png, ready_client, tiny_settings


def post_image(client, **params):
    return client.post(
        "/v1/captions/image", params=params, content=png(), headers={"Content-Type": "image/png"}
    )


def gate_model(service: CaptionService) -> tuple[threading.Event, threading.Event]:
    """Make the model wait for ``release``; ``entered`` is set when a batch starts."""
    release, entered = threading.Event(), threading.Event()
    run = service.batcher.run_batch

    def gated(*args):
        entered.set()
        release.wait(10)
        return run(*args)

    service.batcher.run_batch = gated
    return release, entered


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_warm_up_covers_single_full_and_video_batches(tiny_checkpoint, monkeypatch) -> None:
    shapes: list[tuple[int, int]] = []
    caption_tensors = Captioner.caption_tensors

    def spy(self, sequences, options=None):
        shapes.append((len(sequences), max(len(s) for s in sequences)))
        return caption_tensors(self, sequences, options)

    monkeypatch.setattr(Captioner, "caption_tensors", spy)
    with ready_client(create_app(tiny_settings(tiny_checkpoint, max_batch_size=5))):
        pass
    assert {(1, 1), (5, 1), (1, 8)} <= set(shapes)


def test_compile_setting_compiles_the_encoder(tiny_checkpoint, monkeypatch) -> None:
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    app = create_app(tiny_settings(tiny_checkpoint, compile=True, encoder_runtime="torch"))
    with ready_client(app) as client:
        assert post_image(client).status_code == 200
    assert len(compiled) == 1 and compiled[0] is app.state.service.captioner.model.encoder


def test_a_compile_that_fails_falls_back_to_eager(tiny_checkpoint, monkeypatch) -> None:
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    app = create_app(tiny_settings(tiny_checkpoint, compile=True, encoder_runtime="torch"))
    with ready_client(app) as client:
        assert post_image(client).status_code == 200
    assert not isinstance(app.state.service.captioner.cnn, Broken)


def test_per_request_timeout_is_504_and_leaks_nothing(tiny_checkpoint) -> None:
    app = create_app(tiny_settings(tiny_checkpoint, request_timeout_s=0.3, max_batch_size=1))
    with ready_client(app) as client:
        service = app.state.service
        release, _ = gate_model(service)
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.submit(post_image, client), pool.submit(post_image, client)
            assert_error(first.result(), 504, "timeout")
            assert_error(second.result(), 504, "timeout")
        assert service.batcher.depth == 0  # the queued one left when its caller gave up
        release.set()
        assert post_image(client).status_code == 200
        metrics = client.get("/metrics").text
        assert 'captioner_request_failures_total{reason="timeout"} 2.0' in metrics


def test_full_queue_is_429_with_retry_after(tiny_checkpoint) -> None:
    settings = tiny_settings(tiny_checkpoint, max_queue=1, max_batch_size=1, max_wait_ms=0)
    app = create_app(settings)
    with ready_client(app) as client:
        service = app.state.service
        release, entered = gate_model(service)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post_image, client)
            assert entered.wait(10)
            queued = pool.submit(post_image, client)
            wait_for(lambda: service.batcher.depth == 1)
            refused = post_image(client)
            assert_error(refused, 429, "overloaded")
            assert refused.headers["retry-after"] == str(settings.retry_after_s)
            release.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200


def test_a_flood_past_the_queue_gets_only_200_and_429(tiny_checkpoint) -> None:
    app = create_app(tiny_settings(tiny_checkpoint, max_queue=2, max_batch_size=2, max_wait_ms=0))
    with ready_client(app) as client:
        service = app.state.service
        run = service.batcher.run_batch

        def slow(*args):
            time.sleep(0.05)
            return run(*args)

        service.batcher.run_batch = slow
        with ThreadPoolExecutor(12) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: post_image(client), range(36))]
    assert set(statuses) == {200, 429}, statuses


def test_draining_refuses_new_requests_and_finishes_in_flight_ones(tiny_checkpoint) -> None:
    app = create_app(tiny_settings(tiny_checkpoint))
    with ready_client(app) as client:
        service = app.state.service
        release, entered = gate_model(service)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post_image, client)
            assert entered.wait(10)
            service.begin_drain()
            error = assert_error(post_image(client), 503, "not_ready")
            assert "shutting down" in error["message"]
            assert_error(client.get("/health/ready"), 503, "not_ready")
            release.set()
            assert in_flight.result().status_code == 200


@pytest.mark.parametrize("workers", [1, 3])
def test_preprocessing_pool_size_follows_the_setting(tiny_checkpoint, workers) -> None:
    service = create_app(tiny_settings(tiny_checkpoint, preprocess_workers=workers)).state.service
    assert service.workers == workers


def test_the_default_pool_size_is_the_usable_cpus(tiny_checkpoint) -> None:
    service = create_app(tiny_settings(tiny_checkpoint, preprocess_workers=None)).state.service
    assert service.workers == available_cpus() >= 1


def test_the_default_pool_size_where_there_is_no_cpu_affinity(tiny_checkpoint, monkeypatch) -> None:
    # macOS and Windows have no os.sched_getaffinity: serve must still start there.
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    service = create_app(tiny_settings(tiny_checkpoint, preprocess_workers=None)).state.service
    assert service.workers == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert available_cpus() == 1


def test_a_model_that_crashes_is_a_generic_500_and_the_server_goes_on(
    tiny_checkpoint, caplog
) -> None:
    app = create_app(tiny_settings(tiny_checkpoint))
    with ready_client(app) as client:
        service = app.state.service
        run = service.batcher.run_batch

        def crash(*args):
            raise RuntimeError("secret internal detail")

        service.batcher.run_batch = crash
        with caplog.at_level(logging.ERROR):
            error = assert_error(post_image(client), 500, "internal_error")
        assert "secret" not in error["message"] and "secret internal detail" in caplog.text
        service.batcher.run_batch = run
        assert post_image(client).status_code == 200
