#!/usr/bin/env bash
# The embedded default main job (offline, CPU, a few minutes): tiny random LLaVA-OV checkpoint +
# synthetic videos -> a local multiple-choice task through the real lmms-eval CLI, uncompressed and
# VidCom2 R=0.25 -> CSVs in $WORK_DIR/results (committed results/ are untouched unless
# RESULTS_DIR=results). NPROC=2 runs every evaluation as 2 torchrun processes.
#   WORK_DIR=work/eval_default ARCH=llava_ov NPROC=1 FRAMES=8 RETENTIONS=1.0,0.25 bash scripts/run_default.sh
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A fresh machine: create .venv and install the package first (idempotent; skipped when PYTHON is given).
[[ -n "${PYTHON:-}" ]] || bash "$repo_root/scripts/bootstrap.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
args=(eval-default --work-dir "${WORK_DIR:-work/eval_default}" --arch "${ARCH:-llava_ov}"
  --nproc "${NPROC:-1}" --frames "${FRAMES:-8}" --retentions "${RETENTIONS:-1.0,0.25}")
[[ -z "${RESULTS_DIR:-}" ]] || args+=(--results-dir "$RESULTS_DIR")
[[ -z "${EXTRA_MODEL_ARGS:-}" ]] || args+=(--model-args "$EXTRA_MODEL_ARGS")
[[ "${FRESH:-0}" != "1" ]] || args+=(--fresh)
# not `python -m llava.cli`: run as __main__ it would not see subcommands registered into llava.cli
"${PYTHON:-$repo_root/.venv/bin/python}" -c 'import sys; from llava.cli import main; sys.exit(main(sys.argv[1:]))' "${args[@]}"
