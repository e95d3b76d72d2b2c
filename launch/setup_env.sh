#!/usr/bin/env bash
# Installs what distnorm's demo and tests need, once, into the current Python environment.
# Sourced by launch/quickstart.sh and launch/test.sh; safe to run again (it skips what is there).
set -euo pipefail
PYTHON=${PYTHON:-python3}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# torch first, pinned: an unpinned "torch" pulled in by another package may fetch a
# multi-GB CUDA build. Where a torch is already importable (GPU machines), it is kept.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
  "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
if ! "$PYTHON" -c "import distnorm, pytest, sklearn, tqdm" 2>/dev/null; then
  echo "[setup] installing distnorm (editable) with its dev extras"
  "$PYTHON" -m pip install --quiet -e "$repo[dev]"
fi
