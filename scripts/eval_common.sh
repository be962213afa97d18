#!/usr/bin/env bash
# Shared body of the paper-table scripts (scripts/eval_<table>.sh); sourced, not run.
#
# A table script sets, then calls run_paper_table:
#   TABLE_NAME        CSV prefix and default log folder (llava_ov -> results/llava_ov_*.csv, ./logs/llava_ov)
#   TABLE_MODEL_ID    lmms-eval --model id          TABLE_PRETRAINED   default checkpoint (hub id)
#   TABLE_BASE_ARGS   the model's own --model_args  TABLE_FRAMES_KEY   its frame-budget argument
#   TABLE_FRAMES      frame counts of the table ("32", or "32 64")
#   TABLE_ROWS        array of planned rows "METHOD R [KEY=VALUE,...]" (R = 1.0 for none)
#   TABLE_TASKS       lmms-eval tasks               TABLE_COLLECT      accuracy | efficiency
#   TABLE_PAPER       paper CSV under results/paper/ to compare with ("" when the paper has no numbers)
#   TABLE_BENCH_MODEL (efficiency) the `vidcom2 bench` model of the same checkpoint
# Every row x frame count is one lmms-eval run in OUTPUT_DIR/<method>[_r<R>][_<options>]_f<frames>; a run
# whose results exist is skipped (delete its folder to rerun). Before anything is launched, every planned
# run's --model_args is checked against the installed method registry (a method it lacks is an error).
#
# Environment overrides (all optional):
#   GPUS=8  METHODS="none vidcom2"  RETENTIONS="0.25 0.15"  FRAMES="32 64"  TASKS=<lmms-eval tasks>
#   MODEL=<hub id or dir>  PAPER_MODEL=<the paper's model name, for a local MODEL the collector cannot match>
#   OUTPUT_DIR=./logs/<name>  RESULTS_DIR=results  EXTRA_MODEL_ARGS="attn_implementation=sdpa"  SKIP_BASELINE=1
#   DRY_RUN=1 (print each planned command, run nothing)  LAUNCHER="accelerate launch --num_processes=$GPUS -m"
#   INCLUDE_PATH=<dir of local task YAMLs>  GEN_KWARGS=max_new_tokens=64 (lmms-eval --gen_kwargs, over every task's)
#   PYTHON=python  BENCH=0 (efficiency: no `vidcom2 bench` rows)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/no_multicast.sh"

_eval_words() { local text="${1//,/ }"; echo "$text"; }  # "a,b c" -> "a b c"
_eval_num() { LC_ALL=C printf '%g' "$1"; }
_eval_has() {
  local needle="$1" x
  shift
  for x in "$@"; do [[ "$x" == "$needle" ]] && return 0; done
  return 1
}

# run_name METHOD R OPTIONS FRAMES -> none_f32, vidcom2_r0.25_f32, vidcom2_r0.25_frame_score-equal_f32
_eval_run_name() {
  local method="$1" r="$2" options="$3" frames="$4" name
  if [[ "$method" == "none" ]]; then name="none"; else name="${method}_r${r}"; fi
  if [[ -n "$options" ]]; then
    options="${options//=/-}"
    options="${options//,/_}"
    name+="_${options//\//-}"
  fi
  echo "${name}_f${frames}"
}

# a command as a line to copy: words with shell-special characters quoted, commas and = left as they are
_eval_show() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$word "; else out+="'${word//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

_eval_has_results() { compgen -G "$1/*/*_results.json" > /dev/null; }

run_paper_table() {
  local repo_root
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local name="$TABLE_NAME" gpus="${GPUS:-8}"
  local tasks="${TASKS:-$TABLE_TASKS}"
  local model="${MODEL:-$TABLE_PRETRAINED}"
  local out_root="${OUTPUT_DIR:-./logs/$name}"
  local results_dir="${RESULTS_DIR:-$repo_root/results}"
  local launcher="${LAUNCHER:-accelerate launch --num_processes=$gpus -m}"
  local python="${PYTHON:-python}"
  local collect_kind="${TABLE_COLLECT:-accuracy}"
  export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"  # mlvu needs it exported
  # Compression is passed through --model_args only: a stray COMPRESSOR / R_RATIO would apply to the
  # baseline too (our wrappers then refuse conflicting values, but do not rely on it).
  if [[ -n "${COMPRESSOR:-}" || -n "${R_RATIO:-}" ]]; then
    echo "eval: unset COMPRESSOR / R_RATIO; this script sets compression per run" >&2
    exit 2
  fi
  local -a frames_list methods_sel retentions_sel
  read -ra frames_list <<< "$(_eval_words "${FRAMES:-$TABLE_FRAMES}")"
  read -ra methods_sel <<< "$(_eval_words "${METHODS:-}")"
  read -ra retentions_sel <<< "$(_eval_words "${RETENTIONS:-}")"
  local i
  for i in "${!retentions_sel[@]}"; do retentions_sel[i]="$(_eval_num "${retentions_sel[i]}")"; done

  # The table's methods and retentions, to refuse a selection naming something the table does not have.
  local -a table_methods=() table_retentions=()
  local row method r options
  for row in "${TABLE_ROWS[@]}"; do
    read -r method r options <<< "$row"
    _eval_has "$method" "${table_methods[@]}" || table_methods+=("$method")
    [[ "$method" == "none" ]] || _eval_has "$(_eval_num "$r")" "${table_retentions[@]}" \
      || table_retentions+=("$(_eval_num "$r")")
  done
  local m
  for m in "${methods_sel[@]}"; do
    _eval_has "$m" "${table_methods[@]}" || {
      echo "eval: METHODS names $m, which is not in the $name table (its methods: ${table_methods[*]})" >&2
      exit 2
    }
  done
  for r in "${retentions_sel[@]}"; do
    _eval_has "$r" "${table_retentions[@]}" || {
      echo "eval: RETENTIONS names $r, which is not in the $name table (its retentions: ${table_retentions[*]})" >&2
      exit 2
    }
  done

  # Plan: every row x frames; `selected` are the runs to launch, `all_runs` every run of the table
  # (the collector reads those that have results, e.g. a baseline from an earlier call).
  local -a run_names=() run_args=() selected=() all_runs=()
  local frames run_name model_args
  for frames in "${frames_list[@]}"; do
    for row in "${TABLE_ROWS[@]}"; do
      read -r method r options <<< "$row"
      run_name="$(_eval_run_name "$method" "$r" "${options:-}" "$frames")"
      all_runs+=("$run_name")
      if [[ "$method" == "none" ]]; then
        [[ "${SKIP_BASELINE:-0}" == "1" ]] && continue
      elif [[ ${#retentions_sel[@]} -gt 0 ]] && ! _eval_has "$(_eval_num "$r")" "${retentions_sel[@]}"; then
        continue
      fi
      [[ ${#methods_sel[@]} -eq 0 ]] || _eval_has "$method" "${methods_sel[@]}" || continue
      model_args="pretrained=$model,$TABLE_BASE_ARGS,$TABLE_FRAMES_KEY=$frames,resume_dir=$out_root/resume/$run_name"
      [[ "$method" == "none" ]] || model_args+=",compressor=$method,retention=$r"
      [[ -z "${options:-}" ]] || model_args+=",$options"
      [[ -z "${EXTRA_MODEL_ARGS:-}" ]] || model_args+=",$EXTRA_MODEL_ARGS"
      run_names+=("$run_name")
      run_args+=("$model_args")
      selected+=("$method")
    done
  done
  if [[ ${#run_names[@]} -eq 0 ]]; then
    echo "eval: METHODS='${METHODS:-}' RETENTIONS='${RETENTIONS:-}' select no run of the $name table" >&2
    exit 2
  fi
  echo "eval: $name $collect_kind table: ${#run_names[@]} planned runs (${#all_runs[@]} in the table), tasks $tasks"

  local dry="${DRY_RUN:-0}"
  if [[ "$dry" != "1" ]]; then  # the runs still to launch, checked before the first starts
    local -a check=()
    for i in "${!run_names[@]}"; do
      _eval_has_results "$out_root/${run_names[i]}" || check+=("${run_names[i]}" "${run_args[i]}")
    done
    [[ ${#check[@]} -eq 0 ]] || "$python" -m vidcom2_lmms_eval.plan_check "$TABLE_MODEL_ID" "${check[@]}"
  fi

  local run_dir t0 t1 results_json
  for i in "${!run_names[@]}"; do
    run_name="${run_names[i]}"
    run_dir="$out_root/$run_name"
    if _eval_has_results "$run_dir"; then
      echo "eval: $run_name already has results in $run_dir - skipped (delete it to rerun)"
      continue
    fi
    local cmd=($launcher lmms_eval --model "$TABLE_MODEL_ID" --model_args "${run_args[i]}" --tasks "$tasks"
      --batch_size 1 --log_samples --log_samples_suffix "$TABLE_MODEL_ID" --output_path "$run_dir")
    [[ -z "${INCLUDE_PATH:-}" ]] || cmd+=(--include_path "$INCLUDE_PATH")
    [[ -z "${GEN_KWARGS:-}" ]] || cmd+=(--gen_kwargs "$GEN_KWARGS")
    echo "eval: [$run_name] $(_eval_show "${cmd[@]}")"
    [[ "$dry" == "1" ]] && continue
    mkdir -p "$run_dir"
    t0="$(date +%s.%N)"
    if ! "${cmd[@]}" 2>&1 | tee "$run_dir/lmms_eval.log"; then
      echo "eval: FAILED - lmms-eval exited with an error for $run_name (see $run_dir/lmms_eval.log)" >&2
      exit 1
    fi
    t1="$(date +%s.%N)"
    # lmms-eval logs evaluation errors and exits 0: the results file is the only proof of success.
    if ! _eval_has_results "$run_dir"; then
      echo "eval: FAILED - lmms-eval wrote no results for $run_name (see $run_dir/lmms_eval.log)" >&2
      exit 1
    fi
    results_json="$(ls -t "$run_dir"/*/*_results.json | head -n 1)"
    printf '{"wall_seconds": %s, "started_unix": %s, "processes_requested": %s}\n' \
      "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" "$t0" "$gpus" \
      > "$(dirname "$results_json")/vidcom2_launch.json"
    printf '%q ' "${cmd[@]}" > "$(dirname "$results_json")/vidcom2_command.txt"
  done

  local bench_csv="$out_root/bench.csv"
  if [[ "$collect_kind" == "efficiency" && "${BENCH:-1}" == "1" ]]; then
    local -a bench_methods=() bench_rs=("1.0")
    for m in "${selected[@]}"; do _eval_has "$m" "${bench_methods[@]}" || bench_methods+=("$m"); done
    for row in "${TABLE_ROWS[@]}"; do
      read -r method r options <<< "$row"
      [[ "$method" == "none" ]] && continue
      if [[ ${#retentions_sel[@]} -eq 0 ]] || _eval_has "$(_eval_num "$r")" "${retentions_sel[@]}"; then
        _eval_has "$r" "${bench_rs[@]}" || bench_rs+=("$r")
      fi
    done
    local methods_csv rs_csv
    methods_csv="$(IFS=,; echo "${bench_methods[*]}")"
    rs_csv="$(IFS=,; echo "${bench_rs[*]}")"
    local bench=("$python" -c "from llava.cli import main; raise SystemExit(main())" bench
      --models "$TABLE_BENCH_MODEL" --compressors "$methods_csv" --retentions "$rs_csv"
      --frames "${frames_list[0]}" --batch-sizes 1 --out "$bench_csv")
    if [[ -f "$bench_csv" ]]; then
      echo "eval: $bench_csv exists - bench skipped (delete it to rerun)"
    else
      echo "eval: [bench] $(_eval_show "${bench[@]}")"
      [[ "$dry" == "1" ]] || "${bench[@]}"
    fi
  fi
  [[ "$dry" == "1" ]] && return 0

  local -a present=()
  local run
  for run in "${all_runs[@]}"; do _eval_has_results "$out_root/$run" && present+=("$run"); done
  local runs_csv
  runs_csv="$(IFS=,; echo "${present[*]}")"
  local -a paper_model=()
  [[ -z "${PAPER_MODEL:-}" ]] || paper_model=(--paper-model "$PAPER_MODEL")
  if [[ "$collect_kind" == "efficiency" ]]; then
    local -a bench_args=()
    [[ ! -f "$bench_csv" ]] || bench_args=(--bench "$bench_csv" --bench-model "$TABLE_BENCH_MODEL")
    "$python" -m vidcom2_lmms_eval.efficiency_table "$out_root" --out "$results_dir" --name "$name" \
      --paper "$repo_root/results/paper/$TABLE_PAPER" --runs "$runs_csv" "${bench_args[@]}" "${paper_model[@]}"
  else
    local -a paper=()
    [[ -z "${TABLE_PAPER:-}" ]] || paper=(--paper "$repo_root/results/paper/$TABLE_PAPER")
    "$python" "$repo_root/scripts/collect_results.py" "$out_root" --out "$results_dir" --name "$name" \
      --runs "$runs_csv" "${paper[@]}" "${paper_model[@]}"
  fi
}
