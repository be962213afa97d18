#!/usr/bin/env bash
# Qwen2-VL-7B-Instruct (lmms-eval defaults: 32 frames, max_pixels 602112) with the Qwen3-VL table's methods at
# the paper's main retentions: uncompressed; VidCom2, VisionZip, FastVID, HoliTom at R = 0.25 and 0.15; each
# through lmms-eval on VideoMME, MLVU, LongVideoBench and MVBench, then results/qwen2_vl_{benchmarks,summary}.csv
# (no published numbers to compare with). Overrides: see scripts/eval_common.sh, e.g.
#   GPUS=4 METHODS="none vidcom2" RETENTIONS=0.25 TASKS=mvbench bash scripts/eval_qwen2_vl.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
TABLE_NAME=qwen2_vl
TABLE_MODEL_ID=qwen2_vl
TABLE_PRETRAINED=Qwen/Qwen2-VL-7B-Instruct
TABLE_BASE_ARGS="attn_implementation=flash_attention_2"
TABLE_FRAMES_KEY=max_num_frames
TABLE_FRAMES=32
TABLE_TASKS=videomme,mlvu_dev,longvideobench_val_v,mvbench
TABLE_PAPER=""
TABLE_ROWS=(
  "none 1.0"
  "vidcom2 0.25" "vidcom2 0.15"
  "visionzip 0.25" "visionzip 0.15"
  "fastvid 0.25" "fastvid 0.15"
  "holitom 0.25" "holitom 0.15"
)
run_paper_table
