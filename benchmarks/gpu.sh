#!/usr/bin/env bash
# The performance benchmarks on a CUDA GPU: one prepared run, from any directory.
#
#   bash benchmarks/gpu.sh            # about 5 minutes on one GPU; writes benchmarks/results/*_gpu*.json
#   PYTHON=python3 bash benchmarks/gpu.sh
#
# - the model alone in bf16 and fp16 (PyTorch CNN; ONNX Runtime is a CPU path) at batch 1, 64, 256;
# - JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg) against PIL on the CPUs;
# - end to end over HTTP: captioner serve (bf16, batches of up to 64) against the baseline server,
#   both on the GPU, at concurrency 1, 16 and 64.
# Then it rewrites docs/performance.md, which shows the GPU's name beside its figures.
#
# A step that fails is reported and the next one still runs (a GPU is often lent for minutes, so
# one broken step should not lose the others' figures); the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

"$PYTHON" - <<'PY' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu.sh: no CUDA device is visible to torch; nothing was measured")
print("gpu.sh:", torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

failed=()
step() {
  local started=$SECONDS
  echo "== gpu.sh: $*"
  if "$@"; then
    echo "== gpu.sh: done in $((SECONDS - started)) s: $*"
  else
    echo "== gpu.sh: FAILED after $((SECONDS - started)) s: $*"
    failed+=("$*")
  fi
}

for precision in bf16 fp16; do
  step "$PYTHON" -m benchmarks.bench_model --quick --device cuda --precision "$precision" \
    --batches 1 64 256 --out "benchmarks/results/model_gpu_${precision}.json"
done
step "$PYTHON" -m benchmarks.bench_jpeg --quick
step "$PYTHON" -m benchmarks.bench_http --device cuda --concurrency 1 16 64 --seconds 8 \
  --baseline-runtimes torch \
  --server-env CAPTIONER_PRECISION=bf16 CAPTIONER_MAX_BATCH_SIZE=64 CAPTIONER_MAX_QUEUE=256
step "$PYTHON" -m benchmarks.performance --render

if ((${#failed[@]})); then
  printf 'gpu.sh: failed: %s\n' "${failed[@]}"
  exit 1
fi
