#!/usr/bin/env bash
# Evaluation-stream throughput (`vidcom2 bench --stream`): one model per call, its rows appended to OUT.
# 32 frames, batch 1, uncompressed (serial and prefetched) and VidCom2 at R = 0.25 / 0.15, answers of
# 1 token (48 samples) and 32 tokens (12 samples). Overridable: OUT, SAMPLES, WORKERS, ATTN, EXTRA.
#   VIDCOM2_COMMIT=<commit> MODEL=llava_ov_7b bash scripts/bench_stream.sh
#   MODEL=qwen3_vl_8b EXTRA="--preprocess-device cuda" bash scripts/bench_stream.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/no_multicast.sh
MODEL=${MODEL:?set MODEL, e.g. llava_ov_7b, qwen2_5_vl_7b or qwen3_vl_8b}
OUT=${OUT:-results/throughput_h200.csv}
PYTHON=${PYTHON:-python3}
case "$MODEL" in
  qwen*) ATTN=${ATTN:-sdpa_varlen} ;;  # the Qwen vision towers on the packed flash kernel, as the efficiency rows
  *) ATTN=${ATTN:-sdpa} ;;
esac
# shellcheck disable=SC2086
PYTHONPATH=${PYTHONPATH:-.:lmms-eval} "$PYTHON" -m llava.cli bench --stream "${SAMPLES:-48,12}" \
  --answer-tokens 1,32 --models "$MODEL" --frames 32 --batch-sizes 1 --compressors none,vidcom2 \
  --retentions 0.25,0.15 --serial-baseline --prefetch-workers "${WORKERS:-3}" --warmup 2 --attn "$ATTN" \
  --no-progress --out "$OUT" --append ${EXTRA:-}
