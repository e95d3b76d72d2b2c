#!/usr/bin/env bash
# The real-timm tests (tests/test_timm.py), in a side virtual environment: timm needs
# torchvision, and on a CPU-only machine the torchvision wheels that import pair with the
# full torch wheel (about 5.5 GB), not with the CPU wheel of the default setup.
#   bash launch/test_timm.sh            # venv in ${TIMM_VENV:-.venv-timm}, then the tests
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TIMM_VENV:-.venv-timm}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 timm==1.0.31 pyyaml pytest
  "$venv/bin/pip" install --quiet --no-deps -e .
fi
exec "$venv/bin/python" -m pytest -q tests/test_timm.py tests/test_norm_act.py tests/test_builders.py "$@"
