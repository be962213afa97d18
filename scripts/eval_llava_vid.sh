#!/usr/bin/env bash
# The paper's Table 2, LLaVA-Video-7B, 64 frames (as in the VidCom2 README command): uncompressed; VidCom2,
# FastV, SparseVLM at R = 0.25 / 0.15; DyCoke at 0.25 and 0.30; each through lmms-eval on VideoMME, MLVU,
# LongVideoBench and MVBench, then results/llava_vid_{benchmarks,summary,vs_paper}.csv.
# Overrides: see scripts/eval_common.sh, e.g.
#   GPUS=4 METHODS="none vidcom2" RETENTIONS=0.25 TASKS=mvbench OUTPUT_DIR=/data/logs bash scripts/eval_llava_vid.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
TABLE_NAME=llava_vid
TABLE_MODEL_ID=llava_vid
TABLE_PRETRAINED=lmms-lab/LLaVA-Video-7B-Qwen2
TABLE_BASE_ARGS="conv_template=qwen_1_5,mm_spatial_pool_mode=average,attn_implementation=flash_attention_2"
TABLE_FRAMES_KEY=max_frames_num
TABLE_FRAMES=64
TABLE_TASKS=videomme,mlvu_dev,longvideobench_val_v,mvbench
TABLE_PAPER=paper_accuracy.csv
TABLE_ROWS=(
  "none 1.0"
  "vidcom2 0.25" "vidcom2 0.15"
  "fastv 0.25" "fastv 0.15"
  "sparsevlm 0.25" "sparsevlm 0.15"
  "dycoke 0.25" "dycoke 0.30"
)
run_paper_table
