"""The benchmarks' own machinery: the load generator counts what it should, and the
performance page is written from results files (the measurements themselves are not tests)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from benchmarks import performance
from benchmarks.loadgen import LoadResult, load, multipart
from benchmarks.servers import free_port


async def _app(scope, receive, send) -> None:  # a plain ASGI app: 200, or 503 for "fail"
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await asyncio.sleep(0.01)  # a request takes a little while, as a model call would
    status = 503 if b"fail" in body else 200
    headers = []  # no length: uvicorn sends the body in chunks
    if b"length" in body:
        headers = [(b"content-length", b"2")]
    elif b"close" in body:
        headers = [(b"content-length", b"2"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(5)


def test_multipart_bodies_carry_the_file_and_its_boundary() -> None:
    request = multipart("image", "a.jpg", b"\xff\xd8data", "image/jpeg")
    boundary = request.headers["content-type"].split("boundary=")[1]
    assert request.content.startswith(f"--{boundary}\r\n".encode())
    assert b'name="image"; filename="a.jpg"' in request.content
    assert b"\xff\xd8data\r\n" in request.content
    assert request.content.endswith(f"--{boundary}--\r\n".encode())


def test_the_load_generator_counts_answers_failures_and_latencies(url: str) -> None:
    good = multipart("image", "a.jpg", b"ok", "image/jpeg")
    bad = multipart("image", "b.jpg", b"fail", "image/jpeg")
    result = load(url, [good, bad], concurrency=2, warm_up_s=0.1, seconds=0.5)
    assert result.seconds >= 0.5
    # Client 0 sends good, bad, good, ...; client 1 starts at bad: half of all answers fail.
    assert result.completed >= 4 and result.failed.get("http 503", 0) >= 4
    assert abs(result.completed - result.failed["http 503"]) <= 2
    assert len(result.latencies_ms) == result.completed
    assert all(latency >= 10 for latency in result.latencies_ms)  # the app sleeps 10 ms
    summary = result.summary()
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert summary["per_second"] == pytest.approx(result.completed / result.seconds, abs=0.01)


def test_the_window_lasts_until_every_client_is_measured(url: str) -> None:
    request = multipart("image", "a.jpg", b"ok", "image/jpeg")
    result = load(url, [request], concurrency=8, warm_up_s=0.0, seconds=0.0)
    assert result.completed >= 8  # at least one answer per client, however short the window


def test_the_load_generator_reads_every_kind_of_response_framing(url: str) -> None:
    # chunked, a content-length with keep-alive, and a content-length then a closed connection
    requests = [
        multipart("image", "a.jpg", body, "image/jpeg") for body in (b"ok", b"length", b"close")
    ]
    result = load(url, requests, concurrency=3, warm_up_s=0.1, seconds=0.5)
    assert result.failed == {} and result.completed >= 30


def test_a_server_that_is_not_there_is_counted_as_failures() -> None:
    request = multipart("image", "a.jpg", b"ok", "image/jpeg")
    result = load(f"http://127.0.0.1:{free_port()}/", [request], 2, warm_up_s=0, seconds=0.2)
    assert result.completed == 0 and result.failed.get("ConnectionRefusedError", 0) >= 2


def test_percentiles_are_nearest_rank() -> None:
    result = LoadResult(1, 1.0, 100, {}, [float(i) for i in range(1, 101)])
    assert (result.percentile(50), result.percentile(95), result.percentile(99)) == (50, 95, 99)
    assert LoadResult(1, 1.0, 0, {}, []).percentile(50) is None


def test_the_performance_page_is_written_from_results(tmp_path: Path, monkeypatch) -> None:
    cell = {"per_second": 10.0, "p50_ms": 100.0, "p95_ms": 150.0, "p99_ms": 190.0}
    base = {"per_second": 2.0, "p50_ms": 400.0, "p95_ms": 500.0, "p99_ms": 600.0}
    http = {
        "machine": "test machine, 2 CPUs",
        "seconds_per_cell": 10,
        "warm_up_s": 3,
        "corpus": {"640x480": {"images": 8, "mean_kb": 67}},
        "results": {
            "640x480": {
                "rows": [
                    {
                        "concurrency": c,
                        "captioner": cell,
                        "baseline_torch": base,
                        "ratio_vs_torch": 5.0,
                    }
                    for c in (1, 16)
                ]
            }
        },
        "captioner_server": {"ready_s": 4.2, "peak_rss_mb": 990.0},
    }
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    (results / "http_cpu.json").write_text(json.dumps(http))
    monkeypatch.setattr(performance, "RESULTS", results)
    monkeypatch.setattr(performance, "DOCS", docs)
    page = performance.render().read_text()
    assert "test machine, 2 CPUs" in page
    assert "| 16 | 10.0 | 100 / 150 / 190 | 2.0 | 400 / 500 / 600 | **5.0×** |" in page
    assert "**4.2 s**" in page and "**990.0 MB**" in page
    assert (docs / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
