#!/usr/bin/env bash
# README's main-job command: set up on a fresh machine when needed, then train a small
# ResNet on 2 CPU processes (torchrun, gloo) with its BatchNorms converted by distnorm's
# policy (SyncBatchNorm over both ranks), in well under 2 minutes; it ends with the test
# accuracy and the checkpoint's path. NPROC=4 bash launch/quickstart.sh uses more processes;
# extra arguments go to launch/train.py (e.g. --resume runs/demo/checkpoint.pt).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" \
  launch/train.py "$@"
