"""The image built from ./Dockerfile and the compose files, run for real with podman.

deploy/container-test.sh builds the image and runs this module with CAPTIONER_CONTAINER_IMAGE
set (anywhere else it is skipped). The tests run in file order: the image's metadata, a
container with no network, a container on a published port (drained by ``podman stop`` last),
then compose.yaml, compose.scale.yaml with 2 replicas, and the GPU overlay rendered. Every
container and compose project is removed however a test ends. Measurements go to the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from captioner.data.scenes import score_caption

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "captioner" / "assets" / "samples"
TRUTH = json.loads((SAMPLES / "ground_truth.json").read_text())
IMAGE = os.environ.get("CAPTIONER_CONTAINER_IMAGE", "")
PODMAN_COMPOSE = os.environ.get("CAPTIONER_PODMAN_COMPOSE", "podman-compose")
PROJECT = "captioner"  # compose.yaml's name
CACHE_DIR = "/home/captioner/.cache/captioner"  # the Dockerfile's CAPTIONER_CACHE_DIR
STOP_TIMEOUT_S = 30  # podman stop's grace period before SIGKILL, as CAPTIONER_SHUTDOWN_TIMEOUT_S

log = logging.getLogger("container-test")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        not IMAGE, reason="deploy/container-test.sh builds the image and runs these tests"
    ),
]


# -- helpers -----------------------------------------------------------------------------------


def run(
    command: Sequence[str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(command), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}"
            f"\n{result.stderr[-3000:]}"
        )
    return result


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return run(["podman", *args], timeout=timeout, check=check)


def compose(files: Sequence[str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    flags = [part for name in files for part in ("-f", name)]
    return run([PODMAN_COMPOSE, *flags, *args], timeout=timeout)


def inspect(container: str) -> dict:
    (info,) = json.loads(podman("inspect", container).stdout)
    return info


def healthy(container: str) -> bool:
    """Runs the container's healthcheck (the image's HEALTHCHECK, or compose's) once. Podman
    runs it on a timer only under systemd; here the tests run it."""
    return podman("healthcheck", "run", container, timeout=30, check=False).returncode == 0


def wait_until(ready: Callable[[], bool], container: str, within_s: float) -> float:
    """Seconds until ready() is true, polling; fails if the container exits or time runs out."""
    started = time.monotonic()
    while not ready():
        state = inspect(container)["State"]
        assert state["Running"], f"{container} exited {state['ExitCode']}:\n{logs(container)}"
        elapsed = time.monotonic() - started
        assert elapsed < within_s, (
            f"{container} not ready after {elapsed:.0f} s:\n{logs(container)}"
        )
        time.sleep(0.25)
    return time.monotonic() - started


def answers_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return ready


def logs(container: str) -> str:
    result = podman("logs", container, check=False)
    return result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def caption(url: str, name: str, headers: dict | None = None) -> dict:
    """POSTs a sample to its endpoint; the answer's JSON, checked to be a 200."""
    field, endpoint = ("video", "video") if name.endswith(".mp4") else ("image", "image")
    response = httpx.post(
        f"{url}/v1/captions/{endpoint}",
        files={field: (name, (SAMPLES / name).read_bytes())},
        headers=headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_describes(name: str, answer: dict) -> None:
    """The caption names the sample's objects (and, for the video, its motion)."""
    scores = score_caption(answer["caption"], TRUTH[name]["meta"])
    assert all(scores.values()), (answer["caption"], scores)
    assert answer["in_domain"] is True, answer


def project_containers(service: str | None = None) -> list[str]:
    filters = ["--filter", f"label=io.podman.compose.project={PROJECT}"]
    if service is not None:
        filters += ["--filter", f"label=com.docker.compose.service={service}"]
    names = podman("ps", "-a", *filters, "--format", "{{.Names}}").stdout.split()
    return sorted(names)


def image_info() -> dict:
    (info,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    return info


def start_period_s() -> float:
    return image_info()["Healthcheck"]["StartPeriod"] / 1e9


# -- the image ---------------------------------------------------------------------------------


def test_the_built_image_keeps_its_user_healthcheck_and_stop_signal() -> None:
    info = image_info()
    config = info["Config"]
    assert config["User"] == "10001:10001"
    test = info["Healthcheck"]["Test"]  # absent when built in the OCI format
    assert test[:2] == ["CMD", "python"] and "/health/ready" in test[-1]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Cmd"] == ["captioner", "serve"]


def test_offline_it_becomes_healthy_with_the_model_inside_and_fetches_nothing() -> None:
    """No network at all: what the service needs must be in the image, already exported."""
    name = f"captioner-offline-{os.getpid()}"
    podman("run", "--detach", "--network", "none", "--name", name, IMAGE)
    try:
        took = wait_until(lambda: healthy(name), name, start_period_s())
        log.info("offline container healthy (its own HEALTHCHECK) after %.1f s", took)

        output = podman("exec", name, "id", "-u").stdout.strip()
        assert output == "10001"
        users = podman("top", name, "user").stdout.split()[1:]
        assert users and "root" not in users, users

        models = podman(
            "exec", name, "python", "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:8000/v1/models', timeout=5).read().decode())",
        )  # fmt: skip
        (model,) = json.loads(models.stdout)["models"]
        assert model["encoder_runtime"] == "onnxruntime", model

        here = hashlib.sha256(
            (ROOT / "captioner" / "assets" / "default-model" / "model.safetensors").read_bytes()
        ).hexdigest()
        inside = podman(
            "exec", name, "python", "-c",
            "import hashlib, captioner.inference as i; print(hashlib.sha256("
            "(i.DEFAULT_MODEL_DIR / 'model.safetensors').read_bytes()).hexdigest())",
        )  # fmt: skip
        assert inside.stdout.strip() == here

        text = logs(name)
        assert "the CNN encoder runs on ONNX Runtime" in text
        assert "exporting the CNN encoder" not in text  # exported at build time
        assert "Traceback" not in text and '"level": "warning"' not in text, text

        # Files the container added: none in the cache (no export, no download). ONNX
        # Runtime's own state file in ~/.cache/Microsoft is not a download.
        changes = [line.split(" ", 1) for line in podman("diff", name).stdout.splitlines()]
        added = [path for kind, path in changes if kind == "A"]
        assert not [p for p in added if p.startswith(CACHE_DIR)], added
        unexpected = [
            p for p in added if not p.startswith(("/tmp/", "/home/captioner/.cache/Microsoft/"))
        ]
        assert not unexpected, unexpected
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


# -- one container on a published port -----------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    ready_after_s: float


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    name = f"captioner-test-{os.getpid()}"
    url = f"http://127.0.0.1:{free_port()}"
    podman("run", "--detach", "--name", name, "--publish", f"{url[7:]}:8000", IMAGE)
    try:
        took = wait_until(answers_ready(url), name, start_period_s())
        yield Server(name, url, took)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_ready_within_the_start_period(server) -> None:
    limit = start_period_s()
    log.info("/health/ready 200 after %.1f s (start period %.0f s)", server.ready_after_s, limit)
    assert server.ready_after_s < limit
    assert healthy(server.name)


def test_captions_the_sample_image(server) -> None:
    answer = caption(server.url, "scene.png")
    assert_describes("scene.png", answer)
    log.info("scene.png: %r (%s ms)", answer["caption"], answer["timings_ms"]["total"])


def test_captions_the_sample_video(server) -> None:
    answer = caption(server.url, "motion.mp4")
    assert_describes("motion.mp4", answer)
    assert answer["input"]["codec"] == "h264" and answer["input"]["frames_used"] == 8
    log.info("motion.mp4: %r (%s ms)", answer["caption"], answer["timings_ms"]["total"])


def test_podman_stop_lets_requests_in_flight_finish_and_exits_promptly(server) -> None:
    """Last on this container: SIGTERM while 4 slow requests are in flight."""

    def slow_request(_: int) -> tuple[int, float]:
        response = httpx.post(
            f"{server.url}/v1/captions/video",
            files={"video": ("motion.mp4", (SAMPLES / "motion.mp4").read_bytes())},
            data={"num_frames": "32", "beam_size": "10"},
            timeout=120,
        )
        return response.status_code, time.monotonic()

    def in_flight() -> float:
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        (value,) = re.findall(r"^captioner_requests_in_progress (\S+)$", metrics, flags=re.M)
        return float(value) - 1  # this request counts itself

    with ThreadPoolExecutor(4) as pool:
        answers = pool.map(slow_request, range(4))
        waiting = time.monotonic()
        while in_flight() < 4:
            assert time.monotonic() - waiting < 20, "the 4 requests never were in flight together"
            time.sleep(0.02)
        stopping = time.monotonic()
        podman("stop", "--time", str(STOP_TIMEOUT_S), server.name, timeout=STOP_TIMEOUT_S + 30)
        stopped = time.monotonic()
        answers = list(answers)
    assert [status for status, _ in answers] == [200] * 4
    finished = [end - stopping for _, end in answers]
    assert max(finished) > 0, "every request finished before the stop: nothing was drained"
    state = inspect(server.name)["State"]
    # The app exits by itself, 0 for a graceful stop (app/serve.py); 137 would be podman's
    # SIGKILL at the end of the grace period.
    assert state["ExitCode"] == 0, state
    log.info(
        "podman stop: in-flight requests answered 200 at +%s s after SIGTERM; the container "
        "exited (code %d) and stop returned at +%.1f s (grace %d s)",
        ", ".join(f"{s:.1f}" for s in sorted(finished)),
        state["ExitCode"],
        stopped - stopping,
        STOP_TIMEOUT_S,
    )
    assert stopped - stopping < max(finished) + 10, "the exit after the last answer is slow"
    assert "Application shutdown complete" in logs(server.name)


# -- compose -----------------------------------------------------------------------------------


@pytest.fixture
def compose_project() -> Iterator[None]:
    """Port 8000 free before (compose.yaml publishes it); the project removed after."""
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", 8000))
        except OSError as error:
            pytest.fail(f"port 8000 is taken ({error}): compose.yaml publishes it; free it")
    assert project_containers() == [], "a captioner compose project is already up"
    if shutil.which(PODMAN_COMPOSE) is None:
        pytest.fail(f"{PODMAN_COMPOSE} not found: set CAPTIONER_PODMAN_COMPOSE to podman-compose")
    try:
        yield
    finally:
        for name in project_containers():
            podman("rm", "--force", "--time", "0", name, check=False)
        label = f"label=io.podman.compose.project={PROJECT}"
        for network in podman(
            "network", "ls", "--filter", label, "--format", "{{.Name}}"
        ).stdout.split():
            podman("network", "rm", "--force", network, check=False)
        podman("pod", "rm", "--force", f"pod_{PROJECT}", check=False)


def test_compose_up_serves_and_compose_down_stops_it(compose_project) -> None:
    files = ["compose.yaml"]
    up = time.monotonic()
    compose(files, "up", "--detach")  # the image built above: compose.yaml's captioner:cpu
    (api,) = project_containers("api")
    took = wait_until(answers_ready("http://127.0.0.1:8000"), api, start_period_s())
    log.info("compose up: ready on :8000 after %.1f s", time.monotonic() - up)
    assert took < start_period_s() and healthy(api)
    info = inspect(api)
    assert info["HostConfig"]["Init"] is True  # init: true
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    answer = caption("http://127.0.0.1:8000", "scene.png")
    assert_describes("scene.png", answer)
    log.info("compose scene.png: %r", answer["caption"])

    stopping = time.monotonic()
    compose(files, "stop")
    stop_s = time.monotonic() - stopping
    code = inspect(api)["State"]["ExitCode"]
    log.info("compose stop: %.1f s, exit code %d (stop_grace_period 40 s)", stop_s, code)
    assert code == 0 and stop_s < 20
    compose(files, "down")
    assert project_containers() == []


NGINX_LINE = re.compile(
    r'"POST /v1/captions/image HTTP/1\.1" (?P<status>\d{3}) \d+ (?P<time>[\d.]+) '
    r"(?P<upstreams>.+) id=(?P<id>\S+)$"
)


def lb_requests(lb: str) -> dict[str, dict[str, str]]:
    """nginx's access log (deploy/nginx.conf's format), by request id."""
    lines = (NGINX_LINE.search(line) for line in logs(lb).splitlines())
    return {m["id"]: m.groupdict() for m in lines if m}


def test_two_replicas_behind_nginx_and_a_killed_one_is_retried(compose_project) -> None:
    files = ["compose.yaml", "compose.scale.yaml"]
    up = time.monotonic()
    compose(files, "up", "--detach", "--scale", "api=2")
    replicas = project_containers("api")
    (lb,) = project_containers("lb")
    assert len(replicas) == 2, replicas
    # podman-compose enforces depends_on's service_healthy only with podman >= 4.6: wait here.
    for replica in replicas:
        wait_until(lambda r=replica: healthy(r), replica, start_period_s())
    url = "http://127.0.0.1:8000"
    wait_until(answers_ready(url), lb, 30)
    log.info("scale: 2 replicas healthy and nginx ready after %.1f s", time.monotonic() - up)
    address = {
        r: next(iter(inspect(r)["NetworkSettings"]["Networks"].values()))["IPAddress"]
        for r in replicas
    }

    for i in range(6):
        caption(url, "scene.png", headers={"X-Request-ID": f"spread-{i}"})
    served = lb_requests(lb)
    used = {served[f"spread-{i}"]["upstreams"] for i in range(6)}
    assert used == {f"{address[r]}:8000" for r in replicas}, used

    killed, survivor = replicas
    podman("kill", killed)
    for i in range(4):
        answer = caption(url, "scene.png", headers={"X-Request-ID": f"after-kill-{i}"})
        assert_describes("scene.png", answer)
    served = lb_requests(lb)
    retried = [
        (i, served[f"after-kill-{i}"])
        for i in range(4)
        if "," in served[f"after-kill-{i}"]["upstreams"]
    ]
    assert retried, [served[f"after-kill-{i}"] for i in range(4)]
    for i, line in retried:
        first, second = (u.strip() for u in line["upstreams"].split(","))
        assert first == f"{address[killed]}:8000" and second == f"{address[survivor]}:8000"
        assert line["status"] == "200"
        assert float(line["time"]) < 5, line  # proxy_connect_timeout 2s, not a 60 s wait
        log.info(
            "scale: request after-kill-%d went to the killed replica %s, was retried on %s: "
            "200 in %s s",
            i, first, second, line["time"],
        )  # fmt: skip
    # podman-compose's down knows the files' containers only (1 replica): the other one is an
    # orphan to it. (docker compose down removes every replica.)
    compose(files, "down", "--remove-orphans")
    assert project_containers() == []


def test_the_gpu_overlay_renders_a_gpu_reservation(compose_project) -> None:
    files = ["compose.yaml", "compose.gpu.yaml"]
    rendered = yaml.safe_load(compose(files, "config").stdout)
    api = rendered["services"]["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    args = api["build"]["args"]
    if isinstance(args, list):  # podman-compose concatenates the files' lists: the last wins
        args = dict(arg.split("=", 1) for arg in args)
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert api["image"] == "captioner:cuda" and api["environment"]["CAPTIONER_DEVICE"] == "cuda"
    assert api["ports"] == ["8000:8000"] and "/health/ready" in " ".join(api["healthcheck"]["test"])
    # What podman-compose would run: the reservation becomes a CDI device request.
    dry_run = compose(files, "--verbose", "--dry-run", "up", "--detach", "--no-build").stderr
    (create,) = [line for line in dry_run.splitlines() if "podman create" in line]
    assert "--device nvidia.com/gpu=all" in create, create
    log.warning("the GPU overlay was rendered, not run: this machine has no NVIDIA GPU or toolkit")
