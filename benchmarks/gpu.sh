#!/usr/bin/env bash
# The GPU checks in one command, on a machine with an NVIDIA GPU (about 5 minutes on one
# H100): the GPU tests, then the GPU benchmark (benchmarks/gpu.py: one device against
# nn.BatchNorm2d, two ranks against nn.SyncBatchNorm, kernels and synchronizations per
# layer, memory bandwidth) and the layer overhead on CUDA. Results, for committing:
#   benchmarks/results/gpu_tests.txt, gpu_sync.{json,md,png},
#   gpu_layer_overhead/layer_overhead.{json,md,png}
# Install the CUDA build of torch first (pip install torch==2.13.0 on a CUDA machine);
# launch/setup_env.sh keeps it and adds the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "benchmarks/gpu.sh: no CUDA device visible to torch; run it on a GPU machine" >&2
  exit 2
fi
source launch/setup_env.sh
out=${OUT_DIR:-benchmarks/results}
mkdir -p "$out"
status=0
"$PYTHON" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.txt" || status=1
"$PYTHON" -m benchmarks.gpu --out "$out" || status=1
"$PYTHON" -m benchmarks.layer_overhead --devices cuda --fresh --out "$out/gpu_layer_overhead" \
  || status=1
exit $status
