#!/usr/bin/env bash
# The paper's Table 2, LLaVA-OneVision-7B, 32 frames: every row (uncompressed; VidCom2, FastV, PDrop,
# SparseVLM at R = 0.25 / 0.15; Random at 0.25; DyCoke at 0.25 and 0.30), each through lmms-eval on
# VideoMME, MLVU, LongVideoBench and MVBench, then results/llava_ov_{benchmarks,summary,vs_paper}.csv.
# Overrides: see scripts/eval_common.sh, e.g.
#   GPUS=4 METHODS="none vidcom2" RETENTIONS=0.25 TASKS=mvbench OUTPUT_DIR=/data/logs bash scripts/eval_llava_ov.sh
#   DRY_RUN=1 bash scripts/eval_llava_ov.sh     (print every planned lmms-eval command)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
TABLE_NAME=llava_ov
TABLE_MODEL_ID=llava_onevision
TABLE_PRETRAINED=lmms-lab/llava-onevision-qwen2-7b-ov
TABLE_BASE_ARGS="conv_template=qwen_1_5,model_name=llava_qwen,attn_implementation=flash_attention_2"
TABLE_FRAMES_KEY=max_frames_num
TABLE_FRAMES=32
TABLE_TASKS=videomme,mlvu_dev,longvideobench_val_v,mvbench
TABLE_PAPER=paper_accuracy.csv
TABLE_ROWS=(
  "none 1.0"
  "vidcom2 0.25" "vidcom2 0.15"
  "random 0.25"
  "fastv 0.25" "fastv 0.15"
  "pdrop 0.25" "pdrop 0.15"
  "sparsevlm 0.25" "sparsevlm 0.15"
  "dycoke 0.25" "dycoke 0.30"
)
run_paper_table
