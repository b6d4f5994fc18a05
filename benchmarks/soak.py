"""A bounded soak: mixed good and hostile traffic against a real ``captioner serve`` process.

Good traffic (images as raw bytes, multipart and base64 JSON, image batches, video files,
frame lists, the model and probe routes) and hostile traffic (corrupt and mutated media,
truncated and slow-to-decode videos, a still image sent as a video, oversized bodies, wrong
content types, bad options, bad JSON and base64, too many images, unknown paths and methods,
uploads abandoned halfway), drawn at random (seeded) by a few client threads for ``--seconds``.

Every kind of request has the statuses it may get; any other is *unexpected*. An *error* is a
5xx or a failed connection. The server's resident memory (RSS) is sampled every 2 s; growth is
counted from the end of the warm-up (the first 10% of the run, at least 10 s). Prints a JSON
summary and writes it to ``--out``; exits 1 on any unexpected status or error.

    python -m benchmarks.soak                     # 10 minutes, the shipped model
    python -m benchmarks.soak --seconds 30 --model DIR --out /tmp/soak.json   # as CI runs it
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
from PIL import Image

from benchmarks.servers import Server, captioner_command, rss_mb, running

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "captioner" / "assets" / "samples"
MiB = 1024 * 1024
IMAGE_LIMIT = 2 * MiB  # the soak server's CAPTIONER_MAX_IMAGE_BYTES: oversized bodies stay cheap
DECODE_BUDGET_S = 2.0


# -- the server --------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(
    model: Path | None, log: Path, env: dict[str, str], ready_within_s: float = 300.0
) -> Iterator[Server]:
    """``captioner serve`` from this checkout, once /health/ready says 200; SIGTERM after."""
    command, base_env = captioner_command(model)
    with running(command, log, base_env | env, ready_within_s=ready_within_s) as server:
        yield server


# -- the traffic -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to send it, how often, and the statuses it may get."""

    name: str
    weight: float
    expected: frozenset[int]
    send: Callable[[httpx.Client, random.Random], int | None]  # None: no answer, by design


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _slow_video(frames: int) -> bytes:
    """One flat 4K keyframe muxed ``frames`` times: small, slow to decode. Only the first
    packet is flagged as a keyframe, as an attacker would do, so that a reader that seeks to
    keyframes cannot skip the rest (tests/conftest.py's make_slow_video does the same)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "slow.mkv"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=1000, options={"keyint": "1"})
            stream.width, stream.height, stream.pix_fmt = 4096, 2160, "yuv420p"
            flat = av.VideoFrame.from_ndarray(np.full((2160, 4096, 3), 90, np.uint8), "rgb24")
            encoded = [*stream.encode(flat), *stream.encode()]
            for index in range(frames):
                packet = av.Packet(bytes(encoded[0]))
                packet.stream, packet.time_base = stream, encoded[0].time_base
                packet.pts = packet.dts = index
                packet.is_keyframe = index == 0
                container.mux(packet)
        return path.read_bytes()


def _mutated(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(buffer))
        choice = rng.random()
        if choice < 0.3:
            buffer = buffer[: max(at, 1)]
        elif choice < 0.7:
            buffer[at] ^= 1 << rng.randrange(8)
        else:
            buffer[at : at + 64] = rng.randbytes(64)
    return bytes(buffer)


def traffic(port: int) -> list[Kind]:
    """The request mix. Media are made once, here."""
    scene = Image.open(SAMPLES / "scene.png").convert("RGB")
    png = (SAMPLES / "scene.png").read_bytes()
    jpeg = _encoded(scene, "JPEG")
    small = _encoded(scene.resize((48, 48)), "PNG")
    clip = (SAMPLES / "motion.mp4").read_bytes()
    frames = [path.read_bytes() for path in sorted((SAMPLES / "frames").glob("*.png"))]
    slow = _slow_video(300)
    png_type = {"Content-Type": "image/png"}

    def post(client: httpx.Client, path: str, **kwargs) -> int:
        return client.post(path, **kwargs).status_code

    def abandoned(client: httpx.Client, rng: random.Random) -> None:
        """Half an upload, then the connection is dropped."""
        head = (
            b"POST /v1/captions/image HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % len(png)
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + png[: rng.randrange(len(png))])

    def ok(*statuses: int) -> frozenset[int]:
        return frozenset(statuses)

    return [
        # -- good -----------------------------------------------------------------------------
        Kind(
            "image_raw",
            6,
            ok(200),
            lambda c, r: post(c, "/v1/captions/image", content=png, headers=png_type),
        ),
        Kind(
            "image_multipart",
            3,
            ok(200),
            lambda c, r: post(
                c,
                "/v1/captions/image",
                files={"image": ("a.jpg", jpeg, "image/jpeg")},
                data={"beam_size": "3", "num_captions": "2"},
            ),
        ),
        Kind(
            "image_base64",
            2,
            ok(200),
            lambda c, r: post(
                c, "/v1/captions/image", json={"image_base64": base64.b64encode(small).decode()}
            ),
        ),
        Kind(
            "images_batch",
            2,
            ok(200),
            lambda c, r: post(
                c,
                "/v1/captions/images",
                files=[
                    ("images", (f"{i}.png", data, "image/png"))
                    for i, data in enumerate([small, jpeg, b"not an image", frames[0]])
                ],
            ),
        ),
        Kind(
            "video_raw",
            3,
            ok(200),
            lambda c, r: post(
                c,
                "/v1/captions/video?num_frames=8",
                content=clip,
                headers={"Content-Type": "video/mp4"},
            ),
        ),
        Kind(
            "video_multipart",
            1,
            ok(200),
            lambda c, r: post(
                c,
                "/v1/captions/video",
                files={"video": ("m.mp4", clip, "video/mp4")},
                data={"num_frames": "4"},
            ),
        ),
        Kind(
            "frame_list",
            2,
            ok(200),
            lambda c, r: post(
                c,
                "/v1/captions/video",
                files=[("frames", (f"{i}.png", f, "image/png")) for i, f in enumerate(frames)],
            ),
        ),
        Kind("models", 1, ok(200), lambda c, r: c.get("/v1/models").status_code),
        Kind(
            "probes",
            1,
            ok(200),
            lambda c, r: c.get(r.choice(["/health/live", "/health/ready", "/metrics"])).status_code,
        ),
        # -- hostile --------------------------------------------------------------------------
        Kind(
            "corrupt_image",
            2,
            ok(400),
            lambda c, r: post(
                c, "/v1/captions/image", content=r.randbytes(r.randint(1, 5000)), headers=png_type
            ),
        ),
        Kind(
            "mutated_image",
            3,
            ok(200, 400, 413),
            lambda c, r: post(
                c,
                "/v1/captions/image",
                content=_mutated(r.choice([png, jpeg, small]), r),
                headers=png_type,
            ),
        ),
        Kind(
            "mutated_video",
            2,
            ok(200, 400, 413),
            lambda c, r: post(
                c,
                "/v1/captions/video",
                content=_mutated(clip, r),
                headers={"Content-Type": "video/mp4"},
            ),
        ),
        Kind(
            "truncated_video",
            1,
            ok(400),
            lambda c, r: post(
                c,
                "/v1/captions/video",
                content=clip[: len(clip) // 3],
                headers={"Content-Type": "video/mp4"},
            ),
        ),
        Kind(
            "slow_to_decode_video",
            0.3,
            ok(413),
            lambda c, r: post(
                c, "/v1/captions/video", content=slow, headers={"Content-Type": "video/x-matroska"}
            ),
        ),
        Kind(
            "still_as_video",
            1,
            ok(400),
            lambda c, r: post(
                c, "/v1/captions/video", content=png, headers={"Content-Type": "image/gif"}
            ),
        ),
        Kind(
            "oversized",
            0.5,
            ok(413),
            lambda c, r: post(
                c, "/v1/captions/image", content=b"\0" * (IMAGE_LIMIT + 1), headers=png_type
            ),
        ),
        Kind(
            "wrong_type",
            1,
            ok(415),
            lambda c, r: post(
                c, "/v1/captions/image", content=b"hello", headers={"Content-Type": "text/plain"}
            ),
        ),
        Kind(
            "bad_option",
            1,
            ok(422),
            lambda c, r: post(
                c,
                f"/v1/captions/image?beam_size={r.choice(['0', '99', 'x', '-1'])}",
                content=png,
                headers=png_type,
            ),
        ),
        Kind(
            "bad_json",
            1,
            ok(400, 422),
            lambda c, r: post(
                c,
                "/v1/captions/image",
                content=r.choice([b"{", b"[]", b'{"image_base64": 3}']),
                headers={"Content-Type": "application/json"},
            ),
        ),
        Kind(
            "bad_base64",
            1,
            ok(400),
            lambda c, r: post(c, "/v1/captions/image", json={"image_base64": "***not base64***"}),
        ),
        Kind(
            "too_many_images",
            0.5,
            ok(413),
            lambda c, r: post(
                c,
                "/v1/captions/images",
                files=[("images", (f"{i}.png", small, "image/png")) for i in range(17)],
            ),
        ),
        Kind("unknown_path", 1, ok(404), lambda c, r: c.get("/v1/nothing/here").status_code),
        Kind("wrong_method", 1, ok(405), lambda c, r: c.get("/v1/captions/image").status_code),
        Kind("abandoned_upload", 1, frozenset(), abandoned),
    ]


# -- the soak ----------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: Counter
    statuses: Counter
    unexpected: Counter
    errors: Counter
    lock: threading.Lock


def _client_loop(url: str, kinds: list[Kind], seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    weights = [kind.weight for kind in kinds]
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            try:
                status = kind.send(client, rng)
            except (httpx.TransportError, OSError) as exc:
                with tally.lock:
                    tally.requests[kind.name] += 1
                    tally.errors[f"{kind.name}: {type(exc).__name__}"] += 1
                continue
            with tally.lock:
                tally.requests[kind.name] += 1
                if status is None:
                    continue
                tally.statuses[status] += 1
                if status >= 500:
                    tally.errors[f"{kind.name}: {status}"] += 1
                if status not in kind.expected:
                    tally.unexpected[f"{kind.name}: {status}"] += 1


def soak(
    seconds: float, model: Path | None, clients: int, seed: int, log: Path
) -> dict[str, object]:
    env = {
        "CAPTIONER_MAX_IMAGE_BYTES": str(IMAGE_LIMIT),
        "CAPTIONER_MAX_DECODE_S": str(DECODE_BUDGET_S),
        "CAPTIONER_ACCESS_LOG": "false",
        "CAPTIONER_LOG_LEVEL": "warning",
    }
    with running_server(model, log, env) as server:
        kinds = traffic(server.port)
        tally = Tally(Counter(), Counter(), Counter(), Counter(), threading.Lock())
        started = time.monotonic()
        until = started + seconds
        threads = [
            threading.Thread(target=_client_loop, args=(server.url, kinds, seed + i, until, tally))
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        samples: list[tuple[float, float]] = []  # (seconds since start, RSS MB)
        while any(thread.is_alive() for thread in threads):
            samples.append((time.monotonic() - started, rss_mb(server.process.pid)))
            time.sleep(2.0)
        for thread in threads:
            thread.join()
        samples.append((time.monotonic() - started, rss_mb(server.process.pid)))
        alive = server.process.poll() is None
    warm_up = max(10.0, 0.1 * seconds)
    after = [(t, mb) for t, mb in samples if t >= warm_up] or samples[-1:]
    slope = (
        statistics.linear_regression([t for t, _ in after], [mb for _, mb in after]).slope
        if len(after) >= 2
        else 0.0
    )
    total = sum(tally.requests.values())
    return {
        "seconds": round(seconds, 1),
        "clients": clients,
        "model": str(model) if model else "shipped",
        "requests": total,
        "requests_per_s": round(total / seconds, 2),
        "by_kind": dict(sorted(tally.requests.items())),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "unexpected": sum(tally.unexpected.values()),
        "unexpected_kinds": dict(tally.unexpected),
        "server_alive_at_end": alive,
        "rss_mb": {
            "warm_up_s": warm_up,
            "at_warm_up": round(after[0][1], 1),
            "end": round(samples[-1][1], 1),
            "max": round(max(mb for _, mb in samples), 1),
            "growth_after_warm_up": round(samples[-1][1] - after[0][1], 1),
            "trend_mb_per_min": round(slope * 60, 2),
            "samples": [[round(t, 1), round(mb, 1)] for t, mb in samples],
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": list(os.getloadavg()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long (default 10 min)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped)")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak_cpu.json")
    parser.add_argument("--log", type=Path, default=None, help="server log (default: a temp file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        log = args.log or Path(folder) / "server.log"
        result = soak(args.seconds, args.model, args.clients, args.seed, log)
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    healthy = result["server_alive_at_end"] and not result["errors"]
    return 0 if healthy and not result["unexpected"] else 1


if __name__ == "__main__":
    sys.exit(main())
