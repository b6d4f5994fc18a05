#!/usr/bin/env bash
# The container, tested for real with podman: build the image from ./Dockerfile, run it, then
# compose.yaml, compose.scale.yaml (2 replicas behind nginx) and the rendered GPU overlay.
# The checks themselves are tests/test_container.py (pytest -m container); this script
# prepares what they need and prints the measurements.
#
#   deploy/container-test.sh
#
# Exit status: 0 passed, 1 failed, 77 containers cannot run on this machine (one line says why).
#
# Everything this machine needs and a user with Docker and internet does not lives here, not in
# the Dockerfile or the compose files:
#   * podman runs with runc and explicit ulimits (a containers.conf in the cache folder): crun
#     fails on hybrid cgroups, and podman's default ulimits cannot be set here;
#   * python:3.11-slim and nginx:1.27-alpine are pulled when a registry answers; otherwise they
#     are local stand-ins, built once and cached: Debian bookworm (debootstrap) with python3,
#     python (python-is-python3), pip and venv; and that image with Debian's nginx and wget;
#   * the build gets --network host and this machine's pip configuration (its CA bundle, local
#     indexes and wheel folders, mounted read-only for the build only), and TORCH_INDEX_URL falls
#     back to the pip index when download.pytorch.org cannot be reached.
# It also removes dangling images after the build (earlier builds' layers: 6 GB a build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then
  echo "usage: deploy/container-test.sh (no arguments; CAPTIONER_CONTAINER_CACHE and" \
    "CAPTIONER_DEBIAN_MIRROR may be set)" >&2
  exit 2
fi

CACHE=${CAPTIONER_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/captioner/container-test}
IMAGE=captioner:cpu  # compose.yaml's image name, so that compose runs what was built here
BUILD_STAGE=captioner:build-stage
PYTHON_BASE=docker.io/library/python:3.11-slim
NGINX_BASE=docker.io/library/nginx:1.27-alpine
DEBIAN_MIRROR=${CAPTIONER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PODMAN_COMPOSE=podman-compose==1.6.0  # 1.0.3 (Debian's) knows no !reset and no --scale

log() { echo "container-test: $*" >&2; }
cannot_run() {
  echo "container-test: CONTAINERS CANNOT RUN HERE, nothing was tested: $*" >&2
  exit 77
}
elapsed() { echo $(($(date +%s) - $1)); }

command -v podman >/dev/null || cannot_run "podman is not installed (Debian: apt-get install podman runc)"
mkdir -p "$CACHE"

# -- podman's configuration for this machine ---------------------------------------------------
{
  echo "[containers]"
  echo 'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]'
  if command -v runc >/dev/null; then
    printf '[engine]\nruntime = "runc"\n'
  fi
} >"$CACHE/containers.conf"
export CONTAINERS_CONF="$CACHE/containers.conf"

# -- base images: pulled, or local stand-ins ---------------------------------------------------
have_image() { podman image exists "$1"; }

python_stand_in() {
  command -v debootstrap >/dev/null ||
    cannot_run "$PYTHON_BASE cannot be pulled and debootstrap is not installed to build a stand-in"
  [ "$(id -u)" -eq 0 ] || cannot_run "$PYTHON_BASE cannot be pulled and debootstrap needs root"
  local root="$CACHE/rootfs" start
  start=$(date +%s)
  rm -rf "$root"
  log "building a stand-in for $PYTHON_BASE with debootstrap from $DEBIAN_MIRROR"
  if ! debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -5 "$CACHE/debootstrap.log" >&2
    cannot_run "$PYTHON_BASE cannot be pulled and debootstrap failed (log: $CACHE/debootstrap.log)"
  fi
  # Slim, as the official image: no package caches, lists or docs.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  tar -C "$root" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.captioner.stand-in=debootstrap-bookworm' \
    --change 'CMD ["python3"]' - "$PYTHON_BASE" >/dev/null
  rm -rf "$root"
  log "stand-in $PYTHON_BASE built in $(elapsed "$start") s"
}

nginx_stand_in() {
  log "building a stand-in for $NGINX_BASE: $PYTHON_BASE with Debian's nginx and wget"
  podman build --quiet --pull=never --network host -t "$NGINX_BASE" -f - . >/dev/null <<EOF
FROM $PYTHON_BASE
RUN apt-get update && apt-get install -y --no-install-recommends nginx wget \\
    && rm -rf /var/lib/apt/lists/*
LABEL org.captioner.stand-in=debian-nginx
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
EOF
}

pull_or() {  # image, function that builds a stand-in
  if have_image "$1"; then
    stand_in=$(podman image inspect --format '{{index .Labels "org.captioner.stand-in"}}' "$1")
    log "$1: ${stand_in:+the local stand-in ($stand_in), }cached"
    return
  fi
  if timeout 300 podman pull --quiet "$1" >/dev/null 2>"$CACHE/pull.log"; then
    log "pulled $1"
  else
    log "cannot pull $1 ($(tail -1 "$CACHE/pull.log"))"
    "$2"
  fi
}

pull_or "$PYTHON_BASE" python_stand_in
pull_or "$NGINX_BASE" nginx_stand_in

probe=$(podman run --rm "$PYTHON_BASE" python -c 'print("ok")' 2>&1) ||
  cannot_run "podman run fails: $(echo "$probe" | tail -1)"

# -- the build's view of this machine's pip configuration --------------------------------------
# One pip.conf with the effective settings, and every local path it names mounted read-only.
mapfile -t build_flags < <(python - "$CACHE/pip.conf" <<'EOF'
import os
import subprocess
import sys
from urllib.parse import urlparse

# `pip config list` prints section.key='value', files first and the environment (":env:") last;
# the later line wins, as in pip.
options = {}
listing = subprocess.run(
    [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
).stdout
for line in listing.splitlines():
    key, _, value = line.partition("=")
    options[key.rpartition(".")[2]] = value.strip("'\"")
keep = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host", "default-timeout")
options = {k: v for k, v in options.items() if k in keep}

mounts = set()
for key, value in options.items():
    for item in value.split():
        path = urlparse(item).path if item.startswith("file:") else item
        if not path.startswith("/"):
            continue
        if key.endswith("index-url"):  # an index's pages link into its parent folder
            path = os.path.dirname(path.rstrip("/"))
        if os.path.exists(path):
            mounts.add(path)

with open(sys.argv[1], "w") as conf:
    conf.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(options.items())))
flags = [f"--volume={sys.argv[1]}:/etc/pip.conf:ro"]
flags += [f"--volume={path}:{path}:ro" for path in sorted(mounts)]
print("\n".join(flags))
EOF
)
[ "${#build_flags[@]}" -gt 0 ] || { log "FAILED: reading pip's configuration"; exit 1; }

torch_index=()
if ! timeout 20 python -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=15)' 2>/dev/null; then
  index=$(python -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)
  log "download.pytorch.org cannot be reached: TORCH_INDEX_URL=$index (PyPI's torch bundles CUDA: a larger image than a CPU-index build)"
  torch_index=(--build-arg "TORCH_INDEX_URL=$index")
fi

# -- build ---------------------------------------------------------------------------------------
# --format docker: podman's default (OCI) image format has no HEALTHCHECK and would drop it.
# The build stage is tagged too, so that pruning dangling images (earlier builds' layers, which
# would fill the disk run after run) keeps this build's layers, torch's among them, cached.
build() {  # extra podman build flags
  podman build --format docker --pull=never --network host "${build_flags[@]}" \
    "${torch_index[@]}" "$@" . >>"$CACHE/build.log" 2>&1 || {
    tail -40 "$CACHE/build.log" >&2
    log "FAILED: the build (log: $CACHE/build.log)"
    exit 1
  }
}
start=$(date +%s)
log "building $IMAGE from ./Dockerfile"
: >"$CACHE/build.log"
build --target build -t "$BUILD_STAGE"
build -t "$IMAGE"
log "built $IMAGE in $(elapsed "$start") s ($(grep -c '^--> Using cache' "$CACHE/build.log") steps cached; log: $CACHE/build.log)"
podman image prune --force >/dev/null

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
cuda=$(podman run --rm --network none "$IMAGE" sh -c \
  'du -smc /opt/venv/lib/python3*/site-packages/nvidia /opt/venv/lib/python3*/site-packages/triton 2>/dev/null | tail -1 | cut -f1')
log "image size: $((size / 1000000)) MB, of which CUDA libraries (nvidia/, triton/): ${cuda:-0} MB"

# -- podman-compose, in a virtualenv of its own --------------------------------------------------
venv="$CACHE/podman-compose"
if ! "$venv/bin/podman-compose" version 2>/dev/null | grep -q "${PODMAN_COMPOSE#*==}"; then
  python -m venv "$venv"
  "$venv/bin/pip" install --quiet "$PODMAN_COMPOSE"
fi

# -- the tests -----------------------------------------------------------------------------------
log "running tests/test_container.py"
status=0
CAPTIONER_CONTAINER_IMAGE=$IMAGE CAPTIONER_PODMAN_COMPOSE="$venv/bin/podman-compose" \
  python -m pytest -m container tests/test_container.py -p no:cacheprovider \
  -o log_cli=true --log-cli-level=INFO --log-cli-format="container-test: %(message)s" || status=$?
if [ "$status" -ne 0 ]; then
  log "FAILED: tests/test_container.py (pytest exit $status)"
  exit 1
fi
log "passed"
