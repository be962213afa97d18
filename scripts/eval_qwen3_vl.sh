#!/usr/bin/env bash
# The VidCom2 project page's Qwen3-VL-8B-Instruct table, 32 and 64 frames: uncompressed; VidCom2,
# VisionZip, FastVID, HoliTom at R = 0.25 and 0.35; each through lmms-eval on VideoMME, MLVU,
# LongVideoBench and MVBench, then results/qwen3_vl_{benchmarks,summary,vs_paper}.csv.
# Overrides: see scripts/eval_common.sh, e.g.  FRAMES=64 METHODS="none vidcom2" bash scripts/eval_qwen3_vl.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
TABLE_NAME=qwen3_vl
TABLE_MODEL_ID=qwen3_vl
TABLE_PRETRAINED=Qwen/Qwen3-VL-8B-Instruct
TABLE_BASE_ARGS="attn_implementation=flash_attention_2"
TABLE_FRAMES_KEY=max_num_frames
TABLE_FRAMES="32 64"
TABLE_TASKS=videomme,mlvu_dev,longvideobench_val_v,mvbench
TABLE_PAPER=paper_accuracy.csv
TABLE_ROWS=(
  "none 1.0"
  "vidcom2 0.25" "vidcom2 0.35"
  "visionzip 0.25" "visionzip 0.35"
  "fastvid 0.25" "fastvid 0.35"
  "holitom 0.25" "holitom 0.35"
)
run_paper_table
