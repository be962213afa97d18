#!/usr/bin/env bash
# The project's test command (README, CI): install into .venv if needed, then lint and test on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
