#!/usr/bin/env bash
# Create .venv and install the exact pins (requirements.txt) plus the atlasflow package (editable).
# Re-running is cheap: the Makefile calls this only when requirements or pyproject change.
#
# Supported: CPython 3.11.0-3.13.x (tested: 3.11.2, 3.11.7, 3.12.1, 3.13.0; CI runs 3.11). Without
# PYTHON, the first of python3.11, python3.12, python3.13, python3 that is supported is taken.
# Anything else is refused here, before anything is installed, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
REQUIREMENTS=requirements.txt
die() { echo "error: $*" >&2; exit 2; }

# "3.12.1" when $1 runs and is a supported CPython, else nothing
supported() {
  "$1" -c 'import platform, sys
ok = platform.python_implementation() == "CPython" and (3, 11) <= sys.version_info[:2] <= (3, 13)
print(platform.python_version() if ok else "")' 2>/dev/null || true
}

PY=${PYTHON:-}
if [ -n "$PY" ]; then
  command -v "$PY" >/dev/null 2>&1 || die "PYTHON=$PY: no such program"
  [ -n "$(supported "$PY")" ] || die "PYTHON=$PY is $("$PY" -c 'import platform; print(platform.python_implementation(), platform.python_version())' 2>&1 | head -1);" \
    "atlasflow's pins (Airflow 3.3, scanpy 1.11, scvi-tools 1.4, torch 2.13) are tested on CPython 3.11, 3.12 and 3.13"
else
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && [ -n "$(supported "$cand")" ]; then PY=$cand; break; fi
  done
  [ -n "$PY" ] || die "no CPython 3.11, 3.12 or 3.13 found (python3.11 … python3 on the PATH);" \
    "install one (Debian/Ubuntu: apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.x"
fi
version=$(supported "$PY")

if [ -x "$VENV/bin/python" ]; then
  have=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo broken)
  [ "${have%.*}" = "${version%.*}" ] || die "$VENV was made with Python $have, not $version ($PY):" \
    "remove it (make clean) or choose another folder with VENV=…"
else
  "$PY" -c 'import ensurepip, venv' 2>/dev/null || die "$PY (Python $version) has no venv/ensurepip module;" \
    "on Debian/Ubuntu: apt-get install python${version%.*}-venv"
  echo "creating $VENV with Python $version ($PY), pins from $REQUIREMENTS"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and alone: pinned exactly, so pip never resolves the multi-GB CUDA build by accident.
# A local CPU wheel is used when pip's find-links has one; otherwise set PIP_EXTRA_INDEX_URL to
# PyTorch's CPU index (https://download.pytorch.org/whl/cpu), or take the PyPI build for a GPU machine
# (on Linux that is the CUDA build: about 3 GB of downloads with its nvidia-* libraries).
torch_pin=$(grep -E '^torch==' "$REQUIREMENTS")
"$VENV/bin/python" -m pip install --quiet "$torch_pin"
"$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet --no-deps -e .
# the test harness (stand-in servers, demo data, drivers): tests, benchmarks and make demo only
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e testing 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet --no-deps -e testing
"$VENV/bin/python" -m pip check
