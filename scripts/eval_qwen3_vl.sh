#!/usr/bin/env bash
# Reproduce the Qwen3-VL-8B-Instruct (project page table, 64 frames; FRAMES=32 for the 32-frame table): uncompressed baseline and VidCom2 at R = 0.25 and 0.15 through lmms-eval,
# then results/qwen3_vl_{benchmarks,summary,vs_paper}.csv. Overrides: see scripts/eval_common.sh,
# e.g.  GPUS=4 RETENTIONS="0.25" TASKS=mvbench OUTPUT_DIR=/data/logs bash scripts/eval_qwen3_vl.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
run_paper_table qwen3_vl qwen3_vl Qwen/Qwen3-VL-8B-Instruct \
  "attn_implementation=flash_attention_2" \
  max_num_frames 64
