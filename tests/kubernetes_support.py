"""Render deploy/kubernetes (kustomize) and validate every manifest offline.

Used by tests/test_kubernetes.py, and by deploy/kubernetes/check.sh, which renders and validates
each variant into a folder, then lints that folder with checkov:

    python -m tests.kubernetes_support check OUT_DIR

Rendering is ``kubectl kustomize`` (kustomize is built into kubectl 1.14+). Every resource is
validated against the Kubernetes JSON schemas shipped by kubernetes-validate, strict (no unknown
fields), for the oldest and the newest Kubernetes the manifests support. The two custom
resources (ServiceMonitor, KEDA's ScaledObject) have no schema there: they are checked against
``CRD_SCHEMAS`` below, strict subsets of their CRDs covering the fields these manifests use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest supported (batch.kubernetes.io/job-name pod labels, kustomize v5 in kubectl) and
# the newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27", "1.37")
NAMESPACE = "captioner"


@dataclass(frozen=True)
class Variant:
    """A kustomization to render: a base or overlay folder plus optional components."""

    name: str
    base: str  # folder under deploy/kubernetes
    components: tuple[str, ...] = ()


# Every folder and every component is rendered at least once; components that exclude each
# other (two queue autoscalers, two model sources) go into different variants.
VARIANTS = (
    Variant("cpu", "base"),
    Variant("gpu", "overlays/gpu"),
    Variant(
        "cpu-ingress-monitor-keda-pvc",
        "base",
        ("ingress", "service-monitor", "queue-autoscaling-keda", "model-pvc"),
    ),
    Variant(
        "cpu-adapter-init-container",
        "base",
        ("queue-autoscaling-prometheus-adapter", "model-init-container"),
    ),
    Variant(
        "gpu-ingress-monitor-keda-init-container",
        "overlays/gpu",
        ("ingress", "service-monitor", "queue-autoscaling-keda", "model-init-container"),
    ),
    Variant("training", "training"),
)


class KubectlMissing(RuntimeError):
    """kubectl is not installed: nothing can be rendered."""


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise KubectlMissing(
            "kubectl is not installed; it renders the kustomizations (`kubectl kustomize`). "
            "Install it from your distribution or https://kubernetes.io/docs/tasks/tools/"
        )
    return path


def render(variant: Variant) -> list[dict]:
    """The variant's manifests, as ``kubectl apply -k`` would send them."""
    if not variant.components:
        folder = KUBERNETES / variant.base
        return _kustomize(folder)
    # kustomize takes only relative paths to other kustomizations: write an overlay next to them.
    with tempfile.TemporaryDirectory(dir=KUBERNETES, prefix=".render-") as temporary:
        overlay = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": NAMESPACE,
            "resources": [f"../{variant.base}"],
            "components": [f"../components/{name}" for name in variant.components],
        }
        (Path(temporary) / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
        return _kustomize(Path(temporary))


def _kustomize(folder: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder} failed:\n{result.stderr}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


# -- custom resources ------------------------------------------------------------------------

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


def _strict(required: list[str], **properties: dict) -> dict:
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


# Field names and types as in the CRDs of prometheus-operator (monitoring.coreos.com/v1) and
# KEDA 2.x (keda.sh/v1alpha1); only the fields these manifests use are allowed.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _strict(
            ["selector", "endpoints"],
            selector=_strict(["matchLabels"], matchLabels=_LABELS),
            endpoints={
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    ["port"],
                    port={"type": "string"},
                    path={"type": "string", "pattern": "^/"},
                    interval=_DURATION,
                    scrapeTimeout=_DURATION,
                ),
            },
        ),
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _strict(
            ["scaleTargetRef", "triggers"],
            scaleTargetRef=_strict(
                ["name"],
                apiVersion={"type": "string"},
                kind={"type": "string"},
                name={"type": "string"},
            ),
            minReplicaCount={"type": "integer", "minimum": 0},
            maxReplicaCount={"type": "integer", "minimum": 1},
            pollingInterval={"type": "integer", "minimum": 1},
            cooldownPeriod={"type": "integer", "minimum": 0},
            triggers={
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    ["type", "metadata"],
                    type={"const": "prometheus"},
                    metricType={"enum": ["AverageValue", "Value", "Utilization"]},
                    # The prometheus scaler's parameters: strings, all of them.
                    metadata=_strict(
                        ["serverAddress", "query", "threshold"],
                        serverAddress={"type": "string", "pattern": "^https?://"},
                        query={"type": "string"},
                        threshold={"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                    ),
                ),
            },
        ),
    ),
}


def validate(resource: dict, version: str) -> None:
    """Raise if the resource is not valid for this Kubernetes version (strict schemas)."""
    key = (resource.get("apiVersion"), resource.get("kind"))
    if key in CRD_SCHEMAS:
        jsonschema.validate(resource, CRD_SCHEMAS[key])
        return
    # A kind without a schema raises SchemaNotFoundError: an unknown kind is an error too.
    kubernetes_validate.validate(resource, version, strict=True)


def check(out: Path) -> int:
    """Render every variant into OUT and validate each resource; prints one line per file."""
    failures = 0
    out.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        resources = render(variant)
        path = out / f"{variant.name}.yaml"
        path.write_text(yaml.safe_dump_all(resources, sort_keys=False))
        for resource in resources:
            for version in KUBERNETES_VERSIONS:
                try:
                    validate(resource, version)
                except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                    failures += 1
                    name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
                    message = getattr(exc, "message", None) or str(exc)
                    print(f"INVALID {path.name}: {name} (Kubernetes {version}): {message}")
        kinds = ", ".join(sorted({resource["kind"] for resource in resources}))
        print(f"valid: {os.path.relpath(path)}: {len(resources)} resources ({kinds})")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "check":
        print("usage: python -m tests.kubernetes_support check OUT_DIR", file=sys.stderr)
        return 2
    try:
        return check(Path(argv[1]))
    except KubectlMissing as exc:
        print(f"kubernetes: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
