#!/usr/bin/env bash
# README's main-job command: set up on a fresh machine when needed, then train a small
# ResNet on 2 CPU processes (torchrun, gloo) with distnorm's SyncBatchNorm (~1 minute).
# NPROC=4 bash launch/quickstart.sh to use more processes; extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" \
  launch/train.py "$@"
