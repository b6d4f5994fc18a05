# syntax=docker/dockerfile:1
# captioner HTTP service: one process, one model, dynamic batching.
#   CPU (default):  docker build -t captioner:cpu .
#   CUDA:           docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t captioner:cuda .
# The default model ships inside the captioner package (captioner/assets/default-model), so
# installing the package puts it in the image; nothing is downloaded at run time.

ARG PYTHON_VERSION=3.11

# -- build: a virtualenv with torch from the chosen index, then the package -------------------
FROM python:${PYTHON_VERSION}-slim AS build

# Which torch wheels: the CPU-only index by default; a CUDA index (cu126, cu128, ...) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from TORCH_INDEX_URL (bounds as in pyproject.toml), so that installing the
# package below keeps this build instead of pulling PyPI's default one.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch>=2.2,<=2.14.1" "torchvision>=0.17,<=0.29.1"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY app ./app
RUN pip install --no-cache-dir . \
    && python -c "import captioner.inference as i; assert (i.DEFAULT_MODEL_DIR / 'config.json').is_file(), 'no default model in the package'"

# -- runtime: the virtualenv only, as an unprivileged user ------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

RUN useradd --no-log-init --create-home --uid 10001 --user-group captioner
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CAPTIONER_HOST=0.0.0.0 \
    CAPTIONER_PORT=8000

USER 10001:10001
WORKDIR /home/captioner
EXPOSE 8000

# On CPUs the CNN runs on ONNX Runtime, exported once per model into this cache: export the
# default model's now, so that a container starts without doing it (a mounted custom model is
# exported on its first start, into the same writable folder).
ENV CAPTIONER_CACHE_DIR=/home/captioner/.cache/captioner
RUN python -c "from captioner.inference import Captioner; Captioner.load(device='cpu')"

# Ready = model loaded and warmed up (503 before). start-period covers loading the model.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('CAPTIONER_PORT', '8000'), timeout=2)"]

# uvicorn handles SIGTERM itself: stop accepting, finish in-flight requests, drain the batcher.
STOPSIGNAL SIGTERM
CMD ["captioner", "serve"]
