"""A bounded, closed-loop HTTP load generator: ``concurrency`` clients send back to back.

Each client sends its next request as soon as the previous one is answered, so at most
``concurrency`` requests are in flight and a slow server slows the clients down instead of
piling up an unbounded queue. Request bodies are built once, before the clock starts (the
client's own cost stays small and equal for every server). Requests answered during the
warm-up are not counted; throughput is the answers completed inside the measured window,
divided by its length, and latencies are theirs. Requests in flight when the window closes
finish uncounted before ``load`` returns, so the next measurement starts on an idle server.

Each client speaks HTTP/1.1 over its own keep-alive connection with asyncio streams: it
writes the prepared bytes and reads the status line, the headers and the body. An HTTP
library would cost more CPU than the server's own request handling (httpx: 4.6 core-ms per
request at 16 clients), taken from the cores the server under test is measured on.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    """One prepared request: a multipart body with a single file field."""

    content: bytes
    headers: dict[str, str]


def multipart(field: str, filename: str, data: bytes, content_type: str) -> Request:
    """A multipart/form-data body holding one file, as a browser or ``curl -F`` sends it."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return Request(body, {"content-type": f"multipart/form-data; boundary={boundary}"})


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    seconds: float  # the measured window
    completed: int  # 200s inside the window
    failed: dict[str, int]  # other statuses or transport errors inside the window, by kind
    latencies_ms: list[float]  # of the completed requests

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds

    def percentile(self, q: float) -> float | None:
        """The q-th percentile latency (nearest rank); None when nothing completed."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(1, round(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def summary(self) -> dict[str, object]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "completed": self.completed,
            "failed": self.failed,
            "per_second": round(self.per_second, 2),
            "p50_ms": rounded(self.percentile(50)),
            "p95_ms": rounded(self.percentile(95)),
            "p99_ms": rounded(self.percentile(99)),
            "mean_ms": rounded(statistics.fmean(self.latencies_ms)) if self.latencies_ms else None,
        }


@dataclass
class _Tally:
    """What the clients saw; the monitor opens and closes the measured window."""

    answered: list[int]  # answers per client, since the start
    latencies: list[float]
    failed: Counter[str]
    measuring: bool = False
    stopped: bool = False


def _wire(url: str, request: Request) -> bytes:
    """The bytes of ``request`` POSTed to ``url``, as they go on the wire."""
    parts = urlsplit(url)
    head = [f"POST {parts.path or '/'} HTTP/1.1", f"host: {parts.netloc}"]
    head += [f"{name}: {value}" for name, value in request.headers.items()]
    head += [f"content-length: {len(request.content)}", "", ""]
    return "\r\n".join(head).encode("latin-1") + request.content


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response whole; its status, and whether the connection stays open."""
    status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = dict(line.lower().split(":", 1) for line in lines if ":" in line)
    headers = {name: value.strip() for name, value in headers.items()}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)  # the chunk and its CRLF
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then a blank line
            pass
    else:  # the body runs to the end of the connection
        await reader.read()
        return status, False
    return status, headers.get("connection") != "close"


async def _client(
    url: str,
    requests: Sequence[bytes],
    number: int,
    first: int,
    tally: _Tally,
    timeout_s: float,
) -> None:
    """Client ``number``: send requests[first], requests[first+1], ... until told to stop."""
    parts = urlsplit(url)
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    index = first
    while not tally.stopped:
        request = requests[index % len(requests)]
        index += 1
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                if streams is None:
                    streams = await asyncio.open_connection(parts.hostname, parts.port or 80)
                reader, writer = streams
                writer.write(request)
                await writer.drain()
                status, keep_alive = await _read_answer(reader)
            outcome = "ok" if status == 200 else f"http {status}"
        except (OSError, TimeoutError, ValueError, EOFError, asyncio.LimitOverrunError) as exc:
            outcome, keep_alive = type(exc).__name__, False
        if not keep_alive and streams is not None:
            streams[1].close()
            streams = None
        tally.answered[number] += 1
        if tally.measuring and not tally.stopped:  # answered inside the measured window
            if outcome == "ok":
                tally.latencies.append((time.perf_counter() - sent) * 1000)
            else:
                tally.failed[outcome] += 1
    if streams is not None:
        streams[1].close()


async def _monitor(
    tally: _Tally,
    clients: list[asyncio.Task[None]],
    warm_up_s: float,
    seconds: float,
    at_least: int,
) -> float:
    """Open the window once the warm-up has passed and every client has had an answer (so a
    slow server is measured in its steady state); close it after ``seconds`` and at least
    ``at_least`` answers. Returns the window's length."""

    async def tick() -> None:
        for client in clients:  # a client that crashed would otherwise hang the run
            if client.done() and client.exception() is not None:
                tally.stopped = True
                raise client.exception()  # type: ignore[misc]
        await asyncio.sleep(0.01)

    started = time.perf_counter()
    while time.perf_counter() - started < warm_up_s or not all(tally.answered):
        await tick()
    tally.measuring = True
    opened = time.perf_counter()
    while (
        time.perf_counter() - opened < seconds
        or len(tally.latencies) + sum(tally.failed.values()) < at_least
    ):
        await tick()
    tally.stopped = True
    return time.perf_counter() - opened


async def _run(
    url: str,
    requests: Sequence[Request],
    concurrency: int,
    warm_up_s: float,
    seconds: float,
    timeout_s: float,
) -> LoadResult:
    tally = _Tally([0] * concurrency, [], Counter())
    wire = [_wire(url, request) for request in requests]
    # Clients start at different corpus items, so a batch mixes different images.
    spread = max(1, len(wire) // concurrency)
    clients = [
        asyncio.create_task(_client(url, wire, i, i * spread, tally, timeout_s))
        for i in range(concurrency)
    ]
    window = await _monitor(tally, clients, warm_up_s, seconds, at_least=concurrency)
    # Requests in flight finish (uncounted), so the server is idle for whatever runs next.
    await asyncio.gather(*clients)
    return LoadResult(
        concurrency, window, len(tally.latencies), dict(tally.failed), tally.latencies
    )


def load(
    url: str,
    requests: Sequence[Request],
    concurrency: int,
    *,
    warm_up_s: float = 2.0,
    seconds: float = 10.0,
    timeout_s: float = 300.0,
) -> LoadResult:
    """Drive ``url`` with ``concurrency`` closed-loop clients and measure a window of at least
    ``seconds`` and ``concurrency`` answers, after a warm-up of at least ``warm_up_s``."""
    return asyncio.run(_run(url, requests, concurrency, warm_up_s, seconds, timeout_s))
