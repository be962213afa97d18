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
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  # torch and torchvision must match; these pairs have wheels for CPU-only machines
  # (x86_64: a CUDA build that also runs on CPU; aarch64: a CPU build).
  case "$(uname -m)" in
    aarch64|arm64) "${PIP[@]}" "torch==2.9.1" "torchvision==0.24.1" ;;
    *) "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" ;;
  esac
fi
if ! "$VENV/bin/python" -c "import llava.model.vidcom2, lmms_eval, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.vidcom2-installed" ]; then
  "${PIP[@]}" -e ".[dev]"
  touch "$VENV/.vidcom2-installed"
fi
