#!/usr/bin/env bash
# Shared body of scripts/eval_<model>.sh: one paper table = the uncompressed baseline plus VidCom2 at
# each retention, each run through lmms-eval under `accelerate launch`, then the collector.
# Sourced, not run. Environment overrides (all optional):
#   GPUS=8  RETENTIONS="0.25 0.15"  TASKS=videomme,mlvu_dev,longvideobench_val_v,mvbench
#   FRAMES=<model default>  MODEL=<hub id or dir>  OUTPUT_DIR=./logs/<name>  RESULTS_DIR=results
#   EXTRA_MODEL_ARGS="temperature=0.02,frame_score=equal"  SKIP_BASELINE=1  DRY_RUN=1
#   LAUNCHER="accelerate launch --num_processes=$GPUS -m"   (e.g. "python -m" for one process)
#   INCLUDE_PATH=<dir of local task YAMLs>   (lmms-eval --include_path, e.g. a synthetic task)
set -euo pipefail

run_paper_table() {
  local name="$1" model_id="$2" default_model="$3" base_args="$4" frames_key="$5" default_frames="$6"
  local repo_root
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local gpus="${GPUS:-8}"
  local retentions="${RETENTIONS:-0.25 0.15}"
  local tasks="${TASKS:-videomme,mlvu_dev,longvideobench_val_v,mvbench}"
  local frames="${FRAMES:-$default_frames}"
  local model="${MODEL:-$default_model}"
  local out_root="${OUTPUT_DIR:-./logs/$name}"
  local results_dir="${RESULTS_DIR:-$repo_root/results}"
  local launcher="${LAUNCHER:-accelerate launch --num_processes=$gpus -m}"
  export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"  # mlvu needs it exported
  # Compression is passed through --model_args only: a stray COMPRESSOR / R_RATIO would apply to the
  # baseline too (our wrappers then refuse conflicting values, but do not rely on it).
  if [[ -n "${COMPRESSOR:-}" || -n "${R_RATIO:-}" ]]; then
    echo "eval: unset COMPRESSOR / R_RATIO; this script sets compression per run" >&2
    exit 2
  fi

  local configs=()
  [[ "${SKIP_BASELINE:-0}" == "1" ]] || configs+=("none")
  local r
  for r in $retentions; do configs+=("$r"); done

  local cfg run_name run_dir model_args
  for cfg in "${configs[@]}"; do
    if [[ "$cfg" == "none" ]]; then run_name="none"; else run_name="vidcom2_r${cfg}"; fi
    run_dir="$out_root/$run_name"
    model_args="pretrained=$model,$base_args,$frames_key=$frames,resume_dir=$out_root/resume/$run_name"
    [[ "$cfg" == "none" ]] || model_args+=",compressor=vidcom2,retention=$cfg"
    [[ -z "${EXTRA_MODEL_ARGS:-}" ]] || model_args+=",$EXTRA_MODEL_ARGS"
    if compgen -G "$run_dir/*/*_results.json" > /dev/null; then
      echo "eval: $run_name already has results in $run_dir - skipped (delete it to rerun)"
      continue
    fi
    local cmd=($launcher lmms_eval --model "$model_id" --model_args "$model_args" --tasks "$tasks"
      --batch_size 1 --log_samples --log_samples_suffix "$model_id" --output_path "$run_dir")
    [[ -z "${INCLUDE_PATH:-}" ]] || cmd+=(--include_path "$INCLUDE_PATH")
    echo "eval: ${cmd[*]}"
    [[ "${DRY_RUN:-0}" == "1" ]] && continue
    mkdir -p "$run_dir"
    "${cmd[@]}" 2>&1 | tee "$run_dir/lmms_eval.log"
    # lmms-eval logs evaluation errors and exits 0: the results file is the only proof of success.
    if ! compgen -G "$run_dir/*/*_results.json" > /dev/null; then
      echo "eval: FAILED - lmms-eval wrote no results for $run_name (see $run_dir/lmms_eval.log)" >&2
      exit 1
    fi
  done
  [[ "${DRY_RUN:-0}" == "1" ]] && return 0

  "${PYTHON:-python}" "$repo_root/scripts/collect_results.py" "$out_root" --out "$results_dir" --name "$name" \
    --paper "$repo_root/results/paper/paper_accuracy.csv" --expect-runs "${#configs[@]}"
}
