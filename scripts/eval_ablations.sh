#!/usr/bin/env bash
# The paper's VidCom2 ablations on LLaVA-OneVision-7B, 32 frames, at R = 0.25 and 0.15 (every knob is a
# VidCom2Config field; the default row is the released code):
#   frame allocation: uniqueness-driven (default, frame_score=neg_mean) vs equal (every frame keeps R)
#   token score:      v+f (default: least similar to video and frame centres) vs f only vs v only
#   similarity:       gaussian kernel (default, released code) vs cosine (the paper's prose)
#   temperature:      tau of the frame-budget softmax, 0.01 (default) vs 0.001, 0.1, 1.0
# Logs go to ./logs/llava_ov like eval_llava_ov.sh, so its uncompressed and default VidCom2 runs are
# shared (run once); CSVs: results/llava_ov_ablations_{benchmarks,summary}.csv (the `variant` column names
# each row's knobs; the relative averages are against the shared uncompressed run).
# Overrides: see scripts/eval_common.sh, e.g.  RETENTIONS=0.25 bash scripts/eval_ablations.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
TABLE_NAME=llava_ov_ablations
OUTPUT_DIR="${OUTPUT_DIR:-./logs/llava_ov}"
TABLE_MODEL_ID=llava_onevision
TABLE_PRETRAINED=lmms-lab/llava-onevision-qwen2-7b-ov
TABLE_BASE_ARGS="conv_template=qwen_1_5,model_name=llava_qwen,attn_implementation=flash_attention_2"
TABLE_FRAMES_KEY=max_frames_num
TABLE_FRAMES=32
TABLE_TASKS=videomme,mlvu_dev,longvideobench_val_v,mvbench
TABLE_PAPER=""
TABLE_ROWS=("none 1.0")
for r in 0.25 0.15; do
  TABLE_ROWS+=(
    "vidcom2 $r"
    "vidcom2 $r frame_score=equal"
    "vidcom2 $r token_score=f" "vidcom2 $r token_score=v"
    "vidcom2 $r similarity=cosine"
    "vidcom2 $r temperature=0.001" "vidcom2 $r temperature=0.1" "vidcom2 $r temperature=1.0"
  )
done
run_paper_table
