#!/usr/bin/env bash
# The lent GPU machine's software on this CPU machine: Python 3.12, torch 2.11 (the CUDA 13 build, which runs on
# the CPU too), triton 3.6, built the way gpu_check.sh builds (pip install --no-build-isolation --no-deps -e .),
# then the whole test suite (Triton under its interpreter, the CUDA kernels on the emulator). It catches what
# would otherwise first show on the GPU machine, where a session has 30 minutes: an API that torch 2.11 or
# triton 3.6 lacks, a Python 3.12 difference, a build step that needs the network.
#
#   bash tools/compat_check.sh                 # HEAD, in a fresh clone under $WORK (default /tmp/lorakern-compat)
#   PYTEST_ARGS="tests/test_moe.py" bash tools/compat_check.sh
#
# Needs PyPI (about 5 GB of wheels: torch's CUDA libraries) and ~20 minutes on 2 cores, most of it the suite.
# NumPy stays below 2.4: Triton 3.6's interpreter cannot run with 2.4 (lorakern.backends.interpreter_problem);
# the GPU machine runs compiled kernels, so its NumPy does not matter there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/lorakern-compat}"
PYTHON="${PYTHON:-$(command -v python3.12 || true)}"
TORCH="${TORCH:-2.11.0}"
TRITON="${TRITON:-3.6.0}"
if [ -z "$PYTHON" ]; then
    echo "compat_check: no python3.12 on PATH (set PYTHON=...)" >&2
    exit 2
fi
mkdir -p "$WORK"
VENV="$WORK/venv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "torch==$TORCH" "triton==$TRITON" "numpy<2.4"
"${PIP[@]}" safetensors "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" peft transformers pybind11 ninja \
    matplotlib setuptools wheel
rm -rf "$WORK/repo"
git clone -q "$ROOT" "$WORK/repo"
cd "$WORK/repo"
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'commit', '$(git -C "$ROOT" rev-parse --short HEAD)')"
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rf ${PYTEST_ARGS:-}
