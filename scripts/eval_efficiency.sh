#!/usr/bin/env bash
# The paper's Table 3: efficiency of every method on MVBench, LLaVA-OneVision-7B, 32 frames. Each of
# uncompressed; VidCom2, Random, FastV, PDrop, SparseVLM, DyCoke at R = 0.25 and 0.15 runs the whole
# MVBench through lmms-eval with our meter (LLM time = prefill + decode, model time = + preprocess, vision
# and compression, the launch's wall-clock total, peak memory, samples/s per process, MVBench accuracy);
# then `vidcom2 bench` measures the same methods one request at a time (random weights, needs a GPU;
# BENCH=0 skips it). Writes results/llava_ov_efficiency.csv with the paper's numbers and each time's
# ratio to the uncompressed row beside ours (absolute seconds depend on GPU and process count; the
# paper's ran on 4 GPUs, hence GPUS=4 here).
# Overrides: see scripts/eval_common.sh, e.g.  METHODS="none vidcom2" BENCH=0 bash scripts/eval_efficiency.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/eval_common.sh"
GPUS="${GPUS:-4}"
TABLE_NAME=llava_ov
OUTPUT_DIR="${OUTPUT_DIR:-./logs/llava_ov_efficiency}"
TABLE_MODEL_ID=llava_onevision
TABLE_PRETRAINED=lmms-lab/llava-onevision-qwen2-7b-ov
TABLE_BASE_ARGS="conv_template=qwen_1_5,model_name=llava_qwen,attn_implementation=flash_attention_2"
TABLE_FRAMES_KEY=max_frames_num
TABLE_FRAMES=32
TABLE_TASKS=mvbench
TABLE_COLLECT=efficiency
TABLE_PAPER=paper_efficiency.csv
TABLE_BENCH_MODEL=llava_ov_7b
TABLE_ROWS=("none 1.0")
for method in vidcom2 random fastv pdrop sparsevlm dycoke; do
  TABLE_ROWS+=("$method 0.25" "$method 0.15")
done
run_paper_table
