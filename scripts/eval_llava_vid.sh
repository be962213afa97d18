#!/usr/bin/env bash
# Reproduce the LLaVA-Video-7B (paper Table 2, 64 frames as in the VidCom2 README command): uncompressed baseline and VidCom2 at R = 0.25 and 0.15 through lmms-eval,
# then results/llava_vid_{benchmarks,summary,vs_paper}.csv. Overrides: see scripts/eval_common.sh,
# e.g.  GPUS=4 RETENTIONS="0.25" TASKS=mvbench OUTPUT_DIR=/data/logs bash scripts/eval_llava_vid.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
run_paper_table llava_vid llava_vid lmms-lab/LLaVA-Video-7B-Qwen2 \
  "conv_template=qwen_1_5,mm_spatial_pool_mode=average,attn_implementation=flash_attention_2" \
  max_frames_num 64
