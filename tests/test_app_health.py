from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from app.main import create_app
from app.service import State
from captioner.inference import Captioner
from tests.app_support import assert_error, png, tiny_settings, wait_ready


def test_live_at_once_ready_only_after_load_and_warm_up(tiny_checkpoint, monkeypatch) -> None:
    release = threading.Event()
    load = Captioner.load.__func__

    def slow_load(cls, *args, **kwargs):
        release.wait(10)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Captioner, "load", classmethod(slow_load))
    app = create_app(tiny_settings(tiny_checkpoint, retry_after_s=2))
    with TestClient(app) as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        for path in ("/health/ready", "/health"):
            error = assert_error(client.get(path), 503, "not_ready")
            assert "loading" in error["message"]
        caption = client.post(
            "/v1/captions/image", content=png(), headers={"Content-Type": "image/png"}
        )
        assert_error(caption, 503, "not_ready")
        assert caption.headers["retry-after"] == "2"
        assert_error(client.get("/v1/models"), 503, "not_ready")
        assert "captioner_ready 0.0" in client.get("/metrics").text
        release.set()
        wait_ready(client)
        assert client.get("/health/ready").json() == {"status": "ready"}
        assert client.get("/health").status_code == 200
        assert "captioner_ready 1.0" in client.get("/metrics").text


def test_a_model_that_fails_to_load_stays_unready_and_stops_the_server(tmp_path) -> None:
    app = create_app(tiny_settings(tmp_path / "no-such-model"))
    stopped = threading.Event()
    app.state.service.on_fatal = stopped.set
    with TestClient(app) as client:
        assert stopped.wait(10)
        error = assert_error(client.get("/health/ready"), 503, "not_ready")
        assert "failed to load" in error["message"]
        assert client.get("/health/live").status_code == 200
    assert app.state.service.state is State.FAILED  # still, after shutdown: exit code 1
