#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install alignkit into it.
#
#   scripts/bootstrap.sh          runtime only
#   scripts/bootstrap.sh dev      with the test and lint tools
#
# torch is never replaced: an interpreter that already has torch (CPU or CUDA build) is
# kept through a venv that sees its site-packages. Without torch, a machine with an NVIDIA
# GPU gets PyPI's default (CUDA) build and a machine without one gets the CPU build
# (ALIGNKIT_TORCH, default torch==2.13.0; set PIP_INDEX_URL/PIP_EXTRA_INDEX_URL to a CPU
# wheel index if your platform's default build is a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${ALIGNKIT_VENV:-.venv}
extra=${1:-}

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: keeping the torch of $python ($("$python" -c 'import torch; print(torch.__version__)'))"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install torch
  else
    "${pip[@]}" install "${ALIGNKIT_TORCH:-torch==2.13.0}"
  fi
fi

target="."
[ "$extra" = "dev" ] && target=".[dev]"
"${pip[@]}" install -e "$target"

# The labelling app's browser tests drive the system Chromium (Debian's package; no browser
# is ever downloaded by the tests). Installed here where this user can (root with apt-get);
# elsewhere they are skipped with the install command as the reason, and CI fails without it.
if [ "$extra" = "dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing chromium for the labelling app's browser tests"
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
  else
    echo "bootstrap: no chromium: the browser tests will be skipped (apt-get install chromium)"
  fi
fi
