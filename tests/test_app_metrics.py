from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics
from tests.app_support import image_files, tiny_client

REQUIRED = {
    "captioner_requests": "counter",
    "captioner_request_duration_seconds": "histogram",
    "captioner_request_failures": "counter",
    "captioner_queue_duration_seconds": "histogram",
    "captioner_inference_duration_seconds": "histogram",
    "captioner_preprocess_duration_seconds": "histogram",
    "captioner_batch_size": "histogram",
    "captioner_queue_depth": "gauge",
    "captioner_ready": "gauge",
    "captioner_requests_in_progress": "gauge",
}


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels(endpoint="/x", status="200").inc()
    assert (
        first.registry.get_sample_value(
            "captioner_requests_total", {"endpoint": "/x", "status": "200"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "captioner_requests_total", {"endpoint": "/x", "status": "200"}
        )
        is None
    )


def test_metrics_endpoint_exposes_every_series(tiny_checkpoint) -> None:
    with tiny_client(tiny_checkpoint) as client:
        files = image_files(3)
        files[2] = ("images", ("bad.png", b"junk", "image/png"))
        assert client.post("/v1/captions/images", files=files).status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {name: families[name].type for name in REQUIRED} == REQUIRED
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    ok = ("captioner_requests_total", (("endpoint", "/v1/captions/images"), ("status", "200")))
    assert samples[ok] == 1
    assert samples[("captioner_request_failures_total", (("reason", "invalid_image"),))] == 1
    assert samples[("captioner_queue_depth", (("stage", "inference"),))] == 0
    assert samples[("captioner_batch_size_sum", ())] >= 2  # warm-up runs outside the batcher
