#!/usr/bin/env bash
# GPU efficiency benchmark: full-size random-weight models on one GPU, the same adapters
# the evaluation uses. Overridable: MODELS, OUT, PLOT, EXTRA (more `vidcom2 bench` flags).
#   bash scripts/bench_efficiency.sh
#   MODELS=llava_ov_7b EXTRA="--full" bash scripts/bench_efficiency.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/no_multicast.sh
MODELS=${MODELS:-llava_ov_7b,llava_vid_7b,qwen2_vl_7b,qwen2_5_vl_7b,qwen3_vl_8b}
OUT=${OUT:-results/efficiency_h100.csv}
PLOT=${PLOT:-results/efficiency_h100.png}
PYTHON=${PYTHON:-python3}
# shellcheck disable=SC2086
PYTHONPATH=${PYTHONPATH:-.} "$PYTHON" -c "from llava.cli import main; raise SystemExit(main())" \
  bench --models "$MODELS" --out "$OUT" --plot "$PLOT" ${EXTRA:-}
