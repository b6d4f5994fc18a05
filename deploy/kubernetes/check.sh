#!/usr/bin/env bash
# Render every kustomization of deploy/kubernetes, validate each manifest against the Kubernetes
# schemas, check it against the server's settings, and lint it for security. Offline; no cluster.
#
#   deploy/kubernetes/check.sh [OUT_DIR]     (the rendered manifests go there; default: a temp dir)
#
# 1. `kubectl kustomize` renders each variant (tests/kubernetes_support.py: VARIANTS) and
#    kubernetes-validate checks every resource, strict, for Kubernetes 1.27 and 1.37;
# 2. tests/test_kubernetes.py (not the slow tests) checks probes, ports, drain timing, body
#    size, queue targets and security settings against app/settings.py;
# 3. checkov lints the rendered manifests (deploy/kubernetes/.checkov.yaml says what it skips
#    and why). It lives in a virtualenv of its own, made once in the cache folder, with the
#    version pinned in pyproject.toml (the k8s-lint extra).
# Exit status: 0 passed, 1 failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$#" -gt 1 ]; then
  echo "usage: deploy/kubernetes/check.sh [OUT_DIR]" >&2
  exit 2
fi
OUT=${1:-$(mktemp -d)}
CACHE=${CAPTIONER_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/captioner/kubernetes-check}
log() { echo "kubernetes-check: $*" >&2; }

started=$SECONDS
log "rendering and validating into $OUT"
python -m tests.kubernetes_support check "$OUT"

log "checking the manifests against the server's settings"
python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kubernetes.py

checkov=$(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["k8s-lint"])')
venv="$CACHE/${checkov//==/-}"
if [ ! -x "$venv/bin/checkov" ]; then
  log "installing $checkov into $venv"
  install_started=$SECONDS
  rm -rf "$venv"
  python -m venv "$venv"
  mkdir -p "$CACHE"
  if ! "$venv/bin/pip" install --disable-pip-version-check -q "$checkov" >"$CACHE/pip.log" 2>&1; then
    tail -20 "$CACHE/pip.log" >&2
    log "FAILED: installing $checkov (log: $CACHE/pip.log)"
    exit 1
  fi
  log "installed in $((SECONDS - install_started)) s ($(du -sm "$venv" | cut -f1) MB)"
fi
log "linting with $checkov"
"$venv/bin/checkov" --directory "$OUT" --config-file deploy/kubernetes/.checkov.yaml
log "passed in $((SECONDS - started)) s"
