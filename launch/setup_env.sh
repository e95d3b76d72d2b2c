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
# The package with its dev extras (ruff, which the test command runs before the tests;
# Lightning, for distnorm.lightning's tests) and the launchers the tests run for real:
# Accelerate, DeepSpeed, and mpi4py with the MPICH wheel (which brings mpiexec and the MPI
# library). Lightning takes any torch >= 2.1, as distnorm does, so pip keeps the torch
# above (a fresh venv holding torch 2.13.0 only: `pip install --dry-run -e
# ".[dev,launchers]"` installs no torch).
modules="distnorm, pytest, ruff, sklearn, tqdm, matplotlib, lightning, accelerate, deepspeed, mpi4py"
if ! "$PYTHON" -c "import $modules" 2>/dev/null; then
  echo "[setup] installing distnorm (editable) with its dev and launchers extras"
  "$PYTHON" -m pip install --quiet -e "$repo[dev,launchers]"
fi
# pyenv only puts new console scripts (torchrun, accelerate, deepspeed, mpiexec) on PATH
# after a rehash; the tests find them next to the interpreter either way.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
