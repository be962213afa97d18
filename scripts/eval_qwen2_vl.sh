#!/usr/bin/env bash
# Reproduce the Qwen2-VL-7B-Instruct (lmms-eval defaults: 32 frames, max_pixels 602112): uncompressed baseline and VidCom2 at R = 0.25 and 0.15 through lmms-eval,
# then results/qwen2_vl_{benchmarks,summary,vs_paper}.csv. Overrides: see scripts/eval_common.sh,
# e.g.  GPUS=4 RETENTIONS="0.25" TASKS=mvbench OUTPUT_DIR=/data/logs bash scripts/eval_qwen2_vl.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
run_paper_table qwen2_vl qwen2_vl Qwen/Qwen2-VL-7B-Instruct \
  "attn_implementation=flash_attention_2" \
  max_num_frames 32
