"""Prometheus metrics, one registry per app so tests can build as many apps as they like."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """The service's metrics; ``registry`` is what GET /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "captioner_requests",
            "HTTP requests answered, by route and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "captioner_request_duration_seconds",
            "Time from request received to response sent, by route.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "captioner_request_failures",
            "Failed requests and failed batch items, by error type.",
            ["reason"],
            registry=r,
        )
        self.in_progress = Gauge(
            "captioner_requests_in_progress", "HTTP requests being handled now.", registry=r
        )
        self.preprocess_duration = Histogram(
            "captioner_preprocess_duration_seconds",
            "Decoding and resizing one input in the worker pool, by kind of input.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "captioner_queue_duration_seconds",
            "Time an input waited for its batch to start.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "captioner_inference_duration_seconds",
            "One batched model call (encoder pass plus decoding).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "captioner_batch_size",
            "Inputs per batched model call.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth",
            "Inputs waiting, by stage: for a preprocessing worker, or for the model.",
            ["stage"],
            registry=r,
        )
        self.ready = Gauge(
            "captioner_ready", "1 once the model is loaded and warmed up, else 0.", registry=r
        )
        for stage in ("preprocess", "inference"):
            self.queue_depth.labels(stage=stage).set(0)
