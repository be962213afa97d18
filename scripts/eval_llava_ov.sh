#!/usr/bin/env bash
# Reproduce the LLaVA-OneVision-7B (paper Table 2, 32 frames): uncompressed baseline and VidCom2 at R = 0.25 and 0.15 through lmms-eval,
# then results/llava_ov_{benchmarks,summary,vs_paper}.csv. Overrides: see scripts/eval_common.sh,
# e.g.  GPUS=4 RETENTIONS="0.25" TASKS=mvbench OUTPUT_DIR=/data/logs bash scripts/eval_llava_ov.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
run_paper_table llava_ov llava_onevision lmms-lab/llava-onevision-qwen2-7b-ov \
  "conv_template=qwen_1_5,model_name=llava_qwen,attn_implementation=flash_attention_2" \
  max_frames_num 32
