#!/usr/bin/env bash
# The performance benchmarks on a CUDA GPU: one prepared run, from any directory.
#
#   bash benchmarks/gpu.sh            # about 8 minutes on one GPU; writes benchmarks/results/*_gpu*.json
#
# - the model alone in bf16 and fp16 (PyTorch CNN; ONNX Runtime is a CPU path) at batch 1, 64, 256;
# - JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg) against PIL on the CPUs;
# - end to end over HTTP: captioner serve (bf16, batches of up to 64) against the baseline server,
#   both on the GPU, at concurrency 1, 16 and 64.
# Then it rewrites docs/performance.md, which shows the GPU's name beside its figures.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu.sh: no CUDA device is visible to torch; nothing was measured")
print("gpu.sh:", torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

for precision in bf16 fp16; do
  python -m benchmarks.bench_model --device cuda --precision "$precision" --batches 1 64 256 \
    --out "benchmarks/results/model_gpu_${precision}.json"
done
python -m benchmarks.bench_jpeg --quick
python -m benchmarks.bench_http --device cuda --concurrency 1 16 64 --seconds 10 \
  --server-env CAPTIONER_PRECISION=bf16 CAPTIONER_MAX_BATCH_SIZE=64 CAPTIONER_MAX_QUEUE=256
python -m benchmarks.performance --render
