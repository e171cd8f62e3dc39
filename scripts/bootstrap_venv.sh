#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the exact pins plus the atlasflow package (editable).
# Re-running is cheap: the Makefile calls this only when requirements or pyproject change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: Python 3.11 is required (scvi-tools 1.4.2 / anndata 0.12 pins); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and alone: pinned exactly, so pip never resolves the multi-GB CUDA build by accident.
# A local CPU wheel is used when pip's find-links has one; otherwise set PIP_EXTRA_INDEX_URL to
# PyTorch's CPU index, or take the PyPI build for a GPU machine.
torch_pin=$(grep -E '^torch==' requirements.txt)
"$VENV/bin/python" -m pip install --quiet "$torch_pin"
"$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet --no-deps -e .
# the test harness (stand-in servers, demo data, drivers): tests, benchmarks and make demo only
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e testing 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet --no-deps -e testing
"$VENV/bin/python" -m pip check
