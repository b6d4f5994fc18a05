"""deploy/kubernetes: every variant renders, validates against the Kubernetes schemas, and agrees
with the server's own settings (ports, probes, drain, body size, queue), so they cannot drift.

Rendering needs kubectl (``kubectl kustomize``): without it these tests are skipped, except in
CI (CI=true), where that is a failure. No cluster is needed or used.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from app.uploads import largest_body
from captioner.cli import build_parser
from captioner.onnx_encoder import CACHE_ENV
from tests.kubernetes_support import (
    KUBERNETES,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    ROOT,
    VARIANTS,
    KubectlMissing,
    render,
    validate,
)

MiB = 1024 * 1024
SERVER_VARIANTS = [v for v in VARIANTS if v.name != "training"]
# Measured on a 2-core machine (docs/kubernetes.md): process start to /health/ready.
MEASURED_READY_S = 22
# ... and the peak RSS under heavy load, with the ConfigMap's thread counts (same page).
MEASURED_PEAK_MIB = 1543


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    try:
        return {variant.name: render(variant) for variant in VARIANTS}
    except KubectlMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def one(resources: list[dict], kind: str) -> dict:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def kinds(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def server(resources: list[dict]) -> dict:
    """The captioner container of the Deployment."""
    (container,) = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def environment(resources: list[dict]) -> dict[str, str]:
    """The server's CAPTIONER_* variables from its ConfigMap, as the pod gets them."""
    (source,) = server(resources)["envFrom"]
    config_map = one(resources, "ConfigMap")
    assert source["configMapRef"]["name"] == config_map["metadata"]["name"]
    return config_map["data"]


def settings_of(resources: list[dict], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the server builds from this ConfigMap (pydantic validates every value)."""
    for name in [n for n in os.environ if n.startswith("CAPTIONER_")]:
        monkeypatch.delenv(name)
    for name, value in environment(resources).items():
        monkeypatch.setenv(name, value)
    return Settings()


def app_paths(settings: Settings) -> set[str]:
    """The paths the server answers (its OpenAPI document lists every route, /metrics too)."""
    return set(create_app(settings).openapi()["paths"])


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


# -- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_every_manifest_validates_against_the_kubernetes_schemas(
    rendered, variant, version
) -> None:
    for resource in rendered[variant]:
        validate(resource, version)


def test_validation_rejects_a_misspelt_field_and_an_unknown_kind(rendered) -> None:
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError, match="readinesProbe"):
        validate(deployment, KUBERNETES_VERSIONS[0])
    scaled = copy.deepcopy(one(rendered["cpu-ingress-monitor-keda-pvc"], "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["treshold"] = "1"
    with pytest.raises(jsonschema.ValidationError, match="treshold"):
        validate(scaled, KUBERNETES_VERSIONS[0])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}, "1.37")


def test_every_variant_and_component_is_rendered() -> None:
    components = {p.parent.name for p in (KUBERNETES / "components").glob("*/kustomization.yaml")}
    assert components == {c for v in VARIANTS for c in v.components}
    folders = {
        str(p.parent.relative_to(KUBERNETES))
        for p in KUBERNETES.glob("**/kustomization.yaml")
        if "components" not in p.parts
    }
    assert folders == {v.base for v in VARIANTS}


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_everything_lives_in_the_namespace_with_the_app_label(rendered, variant) -> None:
    for resource in rendered[variant]:
        assert resource["metadata"].get("namespace") == NAMESPACE, resource["metadata"]["name"]
    for resource in rendered[variant]:
        if resource["kind"] in ("Deployment", "Service", "ConfigMap", "Job"):
            assert resource["metadata"]["labels"]["app.kubernetes.io/name"] == "captioner"


# -- the server's settings -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_the_configmap_holds_real_settings_with_valid_values(
    rendered, variant, monkeypatch
) -> None:
    names = {f"CAPTIONER_{field.upper()}" for field in Settings.model_fields}
    names.add(CACHE_ENV)  # the library's: where exported ONNX encoders go
    assert environment(rendered[variant]).keys() <= names
    settings = settings_of(rendered[variant], monkeypatch)
    # The model and the decoding threads use the CPU limit, not the node's cores.
    cpus = float(server(rendered[variant])["resources"]["limits"]["cpu"])
    assert settings.torch_threads is not None and settings.torch_threads <= cpus
    assert settings.preprocess_workers is not None and settings.preprocess_workers <= cpus


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_ports_and_probes_are_the_servers(rendered, variant, monkeypatch) -> None:
    settings = settings_of(rendered[variant], monkeypatch)
    container = server(rendered[variant])
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    routes = app_paths(settings)
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/health/ready"
    assert probes["startupProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == "/health/live"
    for probe in probes.values():
        assert probe["path"] in routes
        assert probe["path"] in settings.auth_exempt_paths  # kubelet sends no API key
        assert port_number(container, probe["port"]) == settings.port
    service = one(rendered[variant], "Service")
    (service_port,) = service["spec"]["ports"]
    assert port_number(container, service_port["targetPort"]) == settings.port
    labels = one(rendered[variant], "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_the_startup_probe_waits_for_the_model_to_load(rendered, variant) -> None:
    container = server(rendered[variant])
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 10 * MEASURED_READY_S  # slow nodes, cold caches, a bigger custom model
    # Liveness never touches the model, so it cannot kill a replica that is still loading.
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_the_grace_period_covers_the_prestop_sleep_and_the_whole_drain(
    rendered, variant, monkeypatch
) -> None:
    settings = settings_of(rendered[variant], monkeypatch)
    pod = one(rendered[variant], "Deployment")["spec"]["template"]["spec"]
    command = server(rendered[variant])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # Endpoints take a few seconds to leave every kube-proxy and ingress controller.
    assert 5 <= pre_stop <= 30
    # On SIGTERM: uvicorn waits up to shutdown_timeout_s for open requests, then the batcher
    # as long again for its queue (app/serve.py, app/service.py).
    drain = 2 * settings.shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    # ... and an in-flight request ends (answered or 504) within the drain.
    assert settings.request_timeout_s <= settings.shutdown_timeout_s


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_the_api_keys_come_from_a_secret(rendered, variant) -> None:
    (variable,) = server(rendered[variant])["env"]
    assert variable["name"] == "CAPTIONER_API_KEYS"
    assert variable["valueFrom"]["secretKeyRef"] == {
        "name": "captioner-api-keys",
        "key": "CAPTIONER_API_KEYS",
    }
    assert "CAPTIONER_API_KEYS" not in environment(rendered[variant])


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity in MiB (the binary suffixes these manifests use)."""
    number, suffix = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * {"Mi": 1, "Gi": 1024}[suffix]


def test_the_memory_request_and_limit_cover_the_measured_peak(rendered) -> None:
    resources = server(rendered["cpu"])["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= MEASURED_PEAK_MIB
    assert mebibytes(resources["limits"]["memory"]) >= 1.25 * MEASURED_PEAK_MIB
    # Guaranteed CPU: the thread pools are sized to it (captioner.env).
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]


# -- security ------------------------------------------------------------------------------------


def dockerfile_user() -> int:
    runtime = (ROOT / "Dockerfile").read_text().split("AS runtime", 1)[1]
    (user,) = re.findall(r"^USER (\d+):\d+$", runtime, flags=re.M)
    return int(user)


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_pods_run_non_root_on_a_read_only_root_without_capabilities(rendered, variant) -> None:
    for workload in kinds(rendered[variant], "Deployment") + kinds(rendered[variant], "Job"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == dockerfile_user()
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        # What the process writes goes to a volume: the root filesystem is read-only.
        writable = {
            mount["mountPath"]
            for mount in pod["containers"][0]["volumeMounts"]
            if not mount.get("readOnly")
        }
        assert "/tmp" in writable  # uploads are spooled there (tempfile)


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_a_custom_model_is_mounted_and_its_onnx_export_has_somewhere_to_go(
    rendered, variant
) -> None:
    env = environment(rendered[variant])
    container = server(rendered[variant])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    if "CAPTIONER_MODEL_PATH" not in env:
        # The image's model, and its ONNX export made at build time (Dockerfile).
        assert CACHE_ENV not in env
        return
    assert env["CAPTIONER_MODEL_PATH"] in mounts
    assert mounts[env["CAPTIONER_MODEL_PATH"]]["readOnly"] is True
    assert not mounts[env[CACHE_ENV]].get("readOnly")
    pod = one(rendered[variant], "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    source = volumes[mounts[env["CAPTIONER_MODEL_PATH"]]["name"]]
    if "persistentVolumeClaim" in source:
        claim = one(rendered[variant], "PersistentVolumeClaim")
        assert source["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    else:  # filled by the init container
        (init,) = pod["initContainers"]
        assert any(m["name"] == source["name"] for m in init["volumeMounts"])
        assert init["command"][-1].rstrip("/") == env["CAPTIONER_MODEL_PATH"]


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_the_network_policy_lets_in_the_http_port_only(rendered, variant) -> None:
    policy = one(rendered[variant], "NetworkPolicy")
    labels = one(rendered[variant], "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["http"]
    assert {"Ingress", "Egress"} == set(policy["spec"]["policyTypes"])


# -- Ingress -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS if "ingress" in v.components])
def test_the_ingress_lets_the_largest_request_through_and_waits_for_the_server(
    rendered, variant, monkeypatch
) -> None:
    settings = settings_of(rendered[variant], monkeypatch)
    ingress = one(rendered[variant], "Ingress")
    annotations = ingress["metadata"]["annotations"]
    # Exactly the server's largest body, in whole MiB: past it, the app's own 413 never comes.
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == (
        f"{math.ceil(largest_body(settings) / MiB)}m"
    )
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        seconds = int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"])
        assert seconds > settings.request_timeout_s
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = one(rendered[variant], "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]


def test_largest_body_is_the_largest_endpoint_limit() -> None:
    settings = Settings()
    # With the defaults: a frame list of 32 frames of 20 MiB each, beyond a 200 MiB video.
    assert largest_body(settings) > settings.max_frames * settings.max_image_bytes
    assert largest_body(settings) > settings.max_images * settings.max_image_bytes
    big_video = Settings(max_video_bytes=2048 * MiB)
    assert largest_body(big_video) > big_video.max_video_bytes


# -- autoscaling and metrics ---------------------------------------------------------------------

QUEUE_METRIC = "captioner_queue_depth"


def test_the_queue_metric_is_one_the_server_exports() -> None:
    names = {metric.name for metric in Metrics().registry.collect()}
    assert QUEUE_METRIC in names


@pytest.mark.parametrize("variant", [v.name for v in SERVER_VARIANTS])
def test_exactly_one_autoscaler_owns_the_deployment(rendered, variant) -> None:
    resources = rendered[variant]
    autoscalers = kinds(resources, "HorizontalPodAutoscaler") + kinds(resources, "ScaledObject")
    (autoscaler,) = autoscalers  # KEDA's makes its own HPA: the base one must be gone
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "captioner")
    minimum = autoscaler["spec"].get("minReplicas", autoscaler["spec"].get("minReplicaCount"))
    # The PodDisruptionBudget takes at most one replica away: at least one stays up.
    budget = one(resources, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and minimum >= 2
    labels = one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_cpu_autoscaling_is_the_default(rendered) -> None:
    (metric,) = one(rendered["cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_keda_scales_on_the_queue_before_replicas_turn_requests_away(rendered, monkeypatch) -> None:
    resources = rendered["cpu-ingress-monitor-keda-pvc"]
    settings = settings_of(resources, monkeypatch)
    (trigger,) = one(resources, "ScaledObject")["spec"]["triggers"]
    assert trigger["metricType"] == "AverageValue"  # the query's sum, per replica
    query = trigger["metadata"]["query"]
    assert re.fullmatch(
        rf'sum\({QUEUE_METRIC}\{{namespace="{NAMESPACE}", service="captioner"}}\)', query
    )
    assert settings.max_batch_size <= float(trigger["metadata"]["threshold"]) < settings.max_queue


def test_the_prometheus_adapter_serves_the_metric_the_hpa_asks_for(rendered, monkeypatch) -> None:
    resources = rendered["cpu-adapter-init-container"]
    settings = settings_of(resources, monkeypatch)
    (metric,) = one(resources, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    values = KUBERNETES / "components/queue-autoscaling-prometheus-adapter"
    (rule,) = yaml.safe_load((values / "prometheus-adapter-values.yaml").read_text())["rules"][
        "custom"
    ]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    assert re.fullmatch(rule["name"]["matches"], QUEUE_METRIC)
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    target = float(metric["pods"]["target"]["averageValue"])
    assert settings.max_batch_size <= target < settings.max_queue


def test_the_service_monitor_scrapes_the_metrics_route_without_a_key(rendered, monkeypatch) -> None:
    resources = rendered["cpu-ingress-monitor-keda-pvc"]
    settings = settings_of(resources, monkeypatch)
    monitor = one(resources, "ServiceMonitor")
    service = one(resources, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] in app_paths(settings)
    assert endpoint["path"] in settings.auth_exempt_paths


# -- GPU -----------------------------------------------------------------------------------------


def test_the_gpu_overlay_asks_for_a_gpu_node_and_the_cuda_image(rendered, monkeypatch) -> None:
    resources = rendered["gpu"]
    settings = settings_of(resources, monkeypatch)
    assert settings.device == "cuda"
    container = server(resources)
    assert container["image"] == "captioner:cuda"  # compose.gpu.yaml's tag
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    assert server(rendered["cpu"])["image"] == "captioner:cpu"
    assert Settings.model_fields["max_batch_size"].default < settings.max_batch_size


# -- multi-node training ---------------------------------------------------------------------


def torchrun_options(job: dict) -> dict[str, str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    options = dict(a.removeprefix("--").split("=", 1) for a in args[: args.index("-m")])
    return options


def test_the_training_job_is_one_torchrun_node_per_pod(rendered) -> None:
    resources = rendered["training"]
    job = one(resources, "Job")
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    options = torchrun_options(job)
    assert spec["completionMode"] == "Indexed"
    assert int(options["nnodes"]) == spec["parallelism"] == spec["completions"]
    assert int(options["nproc-per-node"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    # The rendezvous is on pod 0, by its name under the headless Service.
    service = one(resources, "Service")
    host, port = options["rdzv-endpoint"].split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port) == port_number(container, "rendezvous")
    # What follows -m is a real command line of `captioner train`.
    module_args = container["args"][container["args"].index("-m") + 1 :]
    assert module_args[0] == "captioner.cli"
    parsed = build_parser().parse_args(module_args[1:])
    assert parsed.command == "train" and parsed.resume


def test_training_pods_talk_to_each_other_only(rendered) -> None:
    resources = rendered["training"]
    policy = one(resources, "NetworkPolicy")
    labels = one(resources, "Job")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": selector}}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_jobs_torchrun_command_trains_across_two_nodes(rendered, tmp_path) -> None:
    """Two torchrun agents, as two pods would run them, meet at the c10d rendezvous and train
    together; only the address (pod 0's name) and the data differ from the manifest."""
    from captioner.data.scenes import generate_corpus

    manifest = generate_corpus(tmp_path / "scenes", 24, 8, seed=3, image_size=64)
    config = tmp_path / "train.toml"
    config.write_text(
        'preset = "test-tiny"\nname = "two-nodes"\nepochs = 1\nbatch_size = 8\n'
        f'num_workers = 0\nout_dir = "{tmp_path / "run"}"\n'
        f'[data]\nmin_count = 1\nmax_val_items = 8\ntrain = "{manifest}"\n'
    )
    job = one(rendered["training"], "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    port = _free_port()
    replaced = {
        "--rdzv-endpoint": f"127.0.0.1:{port}",  # pod 0's name, in the cluster
        "--config": str(config),
        "--nproc-per-node": "1",  # one CPU process per node here; one per GPU there
    }
    args = [
        f"{a.split('=')[0]}={replaced[a.split('=')[0]]}" if a.split("=")[0] in replaced else a
        for a in container["args"]
    ]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"},
        )
        for _ in range(int(torchrun_options(job)["nnodes"]))
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    # torchrun's own report (LOGLEVEL=INFO): one group of two nodes, ranked 0 and 1.
    assert all("group_world_size=2" in output for output in outputs)
    ranks = {re.search(r"group_rank=(\d+)", output).group(1) for output in outputs}
    assert ranks == {"0", "1"}
    assert (tmp_path / "run" / "best" / "config.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


# -- the measured numbers, measured again --------------------------------------------------------


SERVE = "from captioner.cli import main; raise SystemExit(main(['serve']))"


def rss_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_the_server_with_the_configmaps_settings_fits_the_memory_request(
    rendered, tmp_path
) -> None:
    """`captioner serve` with the base ConfigMap's settings and the shipped model: ready within
    the startup probe's budget, and its peak RSS under load below the memory request."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env.update(environment(rendered["cpu"]))
    port = _free_port()
    env.update(CAPTIONER_PORT=str(port), CAPTIONER_HOST="127.0.0.1", CAPTIONER_ACCESS_LOG="false")
    container = server(rendered["cpu"])
    startup = container["startupProbe"]
    started = time.monotonic()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = started + startup["periodSeconds"] * startup["failureThreshold"]
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            else:
                pytest.fail("not ready within the startup probe's budget")
            ready_s = time.monotonic() - started
            image = (ROOT / "captioner/assets/samples/scene.png").read_bytes()
            files = [("images", ("scene.png", image, "image/png"))] * 16
            for _ in range(3):
                assert client.post("/v1/captions/images", files=files).status_code == 200
        memory = rss_kib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    request = container["resources"]["requests"]["memory"]
    assert request.endswith("Mi")
    logging.getLogger(__name__).info(
        "ready in %.1f s; RSS %d MiB, peak %d MiB",
        ready_s,
        memory["VmRSS"] // 1024,
        memory["VmHWM"] // 1024,
    )
    assert memory["VmHWM"] < int(request.removesuffix("Mi")) * 1024
