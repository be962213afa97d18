#!/usr/bin/env bash
# The default job (offline, CPU, a few minutes): the tiny LLaVA-OV checkpoint trained on the brief-event
# task (checkpoints/tiny_event_llava_ov, made by `vidcom2 train-tiny`) answers 48 synthetic videos through
# the real lmms-eval CLI, uncompressed and with every method at R = 0.25 and 0.10; prints one table
# (method, achieved retention, accuracy, share of the event's tokens kept) and writes it with the CSVs
# and kept_tokens.png into $WORK_DIR (committed results/ are untouched unless RESULTS_DIR=results).
#   WORK_DIR=work/eval_default METHODS=vidcom2,random RETENTIONS=0.25 VIDEOS=48 NPROC=1 FRAMES=8 bash scripts/run_default.sh
#   MODEL=DIR evaluates another checkpoint; MODEL=train trains a fresh one into $WORK_DIR first.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/no_multicast.sh"
# A fresh machine: create .venv and install the package first (idempotent; skipped when PYTHON is given).
[[ -n "${PYTHON:-}" ]] || bash "$repo_root/scripts/bootstrap.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
model="${MODEL:-$repo_root/checkpoints/tiny_event_llava_ov}"
args=(eval-default --work-dir "${WORK_DIR:-work/eval_default}" --nproc "${NPROC:-1}" --frames "${FRAMES:-8}"
  --retentions "${RETENTIONS:-0.25,0.1}" --videos "${VIDEOS:-48}")
[[ "$model" == "train" ]] || args+=(--model "$model")
[[ -z "${METHODS:-}" ]] || args+=(--methods "$METHODS")
[[ -z "${RESULTS_DIR:-}" ]] || args+=(--results-dir "$RESULTS_DIR")
[[ -z "${EXTRA_MODEL_ARGS:-}" ]] || args+=(--model-args "$EXTRA_MODEL_ARGS")
[[ "${FRESH:-0}" != "1" ]] || args+=(--fresh)
# not `python -m llava.cli`: run as __main__ it would not see subcommands registered into llava.cli
"${PYTHON:-$repo_root/.venv/bin/python}" -c 'import sys; from llava.cli import main; sys.exit(main(sys.argv[1:]))' "${args[@]}"
