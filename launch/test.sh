#!/usr/bin/env bash
# README's test command: set up on a fresh machine when needed, then run the whole test
# suite (real multi-process gloo tests on CPU; GPU tests skip cleanly without a GPU).
# Extra arguments go to pytest, e.g.  bash launch/test.sh -k precision
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec "${PYTHON:-python3}" -m pytest "$@"
