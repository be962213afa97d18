#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at $VENV (default .venv) and install the
# package with its pinned dependencies. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q)
# torch and torchvision must match; these pairs have wheels for CPU-only machines (x86_64: a CUDA
# build that also runs on CPU, about 7 GiB in the venv; aarch64: a CPU build, under 2 GiB).
case "$(uname -m)" in
  aarch64|arm64) TORCH=("torch==2.9.1" "torchvision==0.24.1"); NEED_GIB=2 ;;
  *) TORCH=("torch==2.14.1" "torchvision==0.29.1"); NEED_GIB=8 ;;
esac
NEED_GIB=${BOOTSTRAP_NEED_GIB:-$NEED_GIB}
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  # Say so before pip runs out of disk half-way (pip only reports "[Errno 28] No space left on device").
  free_gib=$(df -Pk "$VENV" | awk 'NR==2 {printf "%d", $4 / 1048576}')
  if [ "$free_gib" -lt "$NEED_GIB" ]; then
    echo "scripts/bootstrap.sh: installing torch into $VENV needs about $NEED_GIB GiB free;" \
         "the disk holding $VENV has $free_gib GiB. Free space there, or point VENV at a larger disk." >&2
    exit 1
  fi
  "${PIP[@]}" "${TORCH[@]}"
fi
if ! "$VENV/bin/python" -c "import llava.model.vidcom2, lmms_eval, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.vidcom2-installed" ]; then
  "${PIP[@]}" -e ".[dev]"
  touch "$VENV/.vidcom2-installed"
fi
