#!/usr/bin/env bash
# README's test command: set up on a fresh machine when needed, lint (ruff check and
# ruff format --check; a finding fails the run before any test), then run the whole test
# suite (real multi-process gloo tests on CPU; GPU tests skip cleanly without a GPU).
# Extra arguments go to pytest, e.g.  bash launch/test.sh -k precision
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
lint_paths=(distnorm tests benchmarks launch tools)
"${PYTHON:-python3}" -m ruff check "${lint_paths[@]}"
"${PYTHON:-python3}" -m ruff format --check "${lint_paths[@]}"
exec "${PYTHON:-python3}" -m pytest "$@"
