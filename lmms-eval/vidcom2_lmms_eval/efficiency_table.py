"""The paper's Table 3 (efficiency on MVBench) from our runs, next to the paper's numbers.

Rows of ``<name>_efficiency.csv``:

- ``lmms-eval mvbench``: one per run of scripts/eval_efficiency.sh (the whole MVBench through lmms-eval,
  metered by our wrappers). ``llm_s`` = prefill + decode, ``model_s`` = preprocess + vision + compress +
  prefill + decode, summed over every sample of every rank; ``total_s`` = the launch's wall-clock
  (model loading and video decoding included, as the paper's "total"); ``samples_per_s_per_process`` =
  samples / total_s / processes (the paper's throughput is per GPU: 0.64 = 4000 / 1563 s / 4).
- ``vidcom2 bench``: the same methods through ``vidcom2 bench`` (random weights, one request at a time,
  fixed decode length), per request.

Absolute seconds depend on the GPU, the process count and what each timer includes (the paper's "LLM"
timer wrapped the whole generate call, on rank 0 only), so every time also comes as a ratio to the
uncompressed row of the same source (``*_vs_vanilla``), beside the paper's own ratio: those compare.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from vidcom2_lmms_eval.collect import CollectError, _gb, load_run, run_key, select_runs, write_csv
from vidcom2_lmms_eval.paper import EFFICIENCY_METHOD_NAMES, efficiency_model, read_paper

LLM_STAGES = ("prefill", "decode")
MODEL_STAGES = ("preprocess", "vision", "compress", "prefill", "decode")
TIMES = ("llm_s", "model_s", "total_s")
PAPER_TIMES = {"llm_s": "llm_generation_s", "model_s": "model_generation_s", "total_s": "total_s"}
# `vidcom2 bench` model name -> the paper's
BENCH_PAPER_MODELS = {
    "llava_ov_7b": "LLaVA-OV-7B",
    "llava_vid_7b": "LLaVA-Video-7B",
    "qwen3_vl_8b": "Qwen3-VL-8B-Instruct",
}


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _paper_columns(paper: dict[tuple, dict[str, str]], method: str, retention: float) -> dict[str, Any]:
    row = paper.get((EFFICIENCY_METHOD_NAMES.get(method), round(retention, 2)))
    vanilla = paper.get(("Vanilla", 1.0))
    out: dict[str, Any] = {}
    for ours, theirs in PAPER_TIMES.items():
        value = float(row[theirs]) if row else None
        out[f"paper_{ours}"] = value
        out[f"paper_{ours.removesuffix('_s')}_vs_vanilla"] = _ratio(value, float(vanilla[theirs]) if vanilla else None)
    out["paper_peak_mem_gb"] = float(row["peak_mem_gb"]) if row else None
    out["paper_samples_per_s_per_gpu"] = float(row["throughput_samples_per_s"]) if row else None
    out["paper_mvbench"] = float(row["mvbench"]) if row else None
    out["paper_note"] = row["note"] if row else None
    return out


def _with_ratios(rows: list[dict[str, Any]]) -> None:
    """Add each time's ratio to the uncompressed row of the same source, model and frames."""
    bases = {(r["source"], r["model"], r["frames"]): r for r in rows if r["method"] == "none" and not r["variant"]}
    for r in rows:
        base = bases.get((r["source"], r["model"], r["frames"]))
        for t in TIMES:
            r[f"{t.removesuffix('_s')}_vs_vanilla"] = _ratio(r[t], base[t] if base else None)


def eval_rows(runs: list[dict[str, Any]], paper_model_override: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        if "mvbench" not in run["scores"]:
            raise CollectError(f"{run['dir']}: no MVBench in this run; the efficiency table is measured on MVBench")
        model, frames, method, retention, options = run_key(run, paper_model_override)
        meter, env = run["meter"], run["meter"].get("environment", {})
        overall, world = meter["overall"], int(meter["run"].get("world_size") or 1)
        stages = overall["stage_seconds_sum"]
        total = run["launch"].get("wall_seconds")
        n = overall["samples"]
        rows.append(
            {
                "source": "lmms-eval mvbench",
                "unit": "whole run: seconds summed over samples and ranks; total_s wall-clock",
                "model": model,
                "frames": frames,
                "method": method,
                "variant": options,
                "retention": retention,
                "achieved_retention": overall["achieved_retention"],
                "processes": world,
                "samples": n,
                "failed_samples": overall["failed"],
                "cached_samples": overall["cached"],  # timings of cached samples are from an earlier launch
                "llm_s": sum(stages.get(s, 0.0) for s in LLM_STAGES),
                "model_s": sum(stages.get(s, 0.0) for s in MODEL_STAGES),
                "read_video_s": stages.get("read_video"),
                "samples_wall_s": overall["wall_seconds_sum"],
                "total_s": total,
                "elapsed_s": meter["run"].get("elapsed_seconds"),
                "samples_per_s": n / total if total else None,
                "samples_per_s_per_process": n / total / world if total else None,
                "peak_allocated_gb": _gb(overall.get("peak_allocated_bytes_max")),
                "peak_reserved_gb": _gb(overall.get("peak_reserved_bytes_max")),
                "mvbench": run["scores"]["mvbench"].score,
                "mvbench_lmms_eval": run["scores"]["mvbench"].lmms_eval_score,
                "gpu": env.get("gpu") or "cpu",
                "torch_version": env.get("torch"),
                "transformers_version": env.get("transformers"),
                "attn_implementation": meter["run"].get("attn_implementation"),
                "dtype": meter["run"].get("dtype"),
                "commit": env.get("commit"),
                "date": env.get("date"),
            }
        )
    return rows


def bench_rows(bench_csv: Path, bench_model: str, frames: int | None) -> list[dict[str, Any]]:
    """`vidcom2 bench` rows of one model at batch 1 (and ``frames`` when given), per request."""
    with Path(bench_csv).open() as fh:
        found = [
            r
            for r in csv.DictReader(fh)
            if r["model"] == bench_model and int(r["batch"]) == 1 and (frames is None or int(r["frames"]) == frames)
        ]
    if not found:
        raise CollectError(f"{bench_csv}: no batch-1 rows of bench model {bench_model!r} at {frames} frames")

    def ms(r: dict[str, str], *keys: str) -> float:
        return sum(float(r[k]) for k in keys) / 1000.0

    return [
        {
            "source": "vidcom2 bench",
            "unit": "one request (random weights, fixed decode length): seconds",
            "model": BENCH_PAPER_MODELS.get(bench_model, bench_model),
            "frames": int(r["frames"]),
            "method": r["compressor"],
            "variant": r.get("compressor_options") or "",
            "retention": float(r["retention"]),
            "achieved_retention": float(r["achieved_retention"]),
            "processes": 1,
            "samples": int(r["repeats"]),
            "llm_s": ms(r, *(f"{s}_ms" for s in LLM_STAGES)),
            "model_s": ms(r, *(f"{s}_ms" for s in MODEL_STAGES)),
            "read_video_s": ms(r, "read_video_ms"),
            "total_s": ms(r, "end_to_end_ms"),
            "samples_per_s": float(r["samples_per_s"]),
            "samples_per_s_per_process": float(r["samples_per_s"]),
            "peak_allocated_gb": float(r["peak_allocated_mib"]) / 1024,
            "peak_reserved_gb": float(r["peak_reserved_mib"]) / 1024,
            "gpu": r.get("gpu"),
            "torch_version": r.get("torch"),
            "transformers_version": r.get("transformers"),
            "attn_implementation": r.get("attn_implementation"),
            "dtype": r.get("dtype"),
            "commit": r.get("commit"),
            "date": r.get("date"),
            "command": r.get("command"),
        }
        for r in found
    ]


def collect_efficiency(
    root: str | Path,
    out_dir: str | Path,
    name: str,
    paper_csv: str | Path,
    runs: list[str] | None = None,
    bench_csv: str | Path | None = None,
    bench_model: str | None = None,
    paper_model_override: str | None = None,
) -> Path:
    """Write ``<name>_efficiency.csv``; raises (after writing) when no row matches the paper's model."""
    loaded = [load_run(d) for d in select_runs(Path(root), runs)]
    if not loaded:
        raise CollectError(f"no lmms-eval *_results.json under {root}")
    rows = eval_rows(loaded, paper_model_override)
    if bench_csv is not None:
        frames = rows[0]["frames"] if rows else None
        rows += bench_rows(Path(bench_csv), bench_model or "", frames)
    _with_ratios(rows)
    paper_rows = read_paper(Path(paper_csv))
    their_model = efficiency_model(paper_rows, Path(paper_csv))
    paper = {(r["method"], round(float(r["retention"]), 2)): r for r in paper_rows}
    matched = 0
    for r in rows:
        if r["model"] == their_model and not r["variant"]:
            r.update(_paper_columns(paper, r["method"], r["retention"]))
            matched += r["paper_note"] is not None
    path = write_csv(rows, Path(out_dir) / f"{name}_efficiency.csv")
    if not matched:
        models = sorted({r["model"] for r in rows})
        raise CollectError(
            f"{path}: written without paper columns: {paper_csv} is {their_model}'s, our rows are {models}; "
            f"for a local checkpoint set PAPER_MODEL={their_model} (--paper-model)"
        )
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder holding one lmms-eval output folder per run (MVBench runs)")
    p.add_argument("--out", default="results", help="CSV folder")
    p.add_argument("--name", required=True, help="CSV prefix: writes <name>_efficiency.csv")
    p.add_argument("--paper", default="results/paper/paper_efficiency.csv", help="the paper's Table 3")
    p.add_argument("--runs", default=None, help="comma list of run folders under ROOT (default: all)")
    p.add_argument("--bench", default=None, help="a `vidcom2 bench` CSV to add (its batch-1 rows of --bench-model)")
    p.add_argument("--bench-model", default=None, help="bench model name, e.g. llava_ov_7b")
    p.add_argument("--paper-model", default=None, help="the paper's name of the model (local checkpoints)")


def run_cli(args: argparse.Namespace) -> int:
    runs = [r for r in (args.runs or "").split(",") if r] or None
    path = collect_efficiency(
        args.root, args.out, args.name, args.paper, runs, args.bench, args.bench_model, args.paper_model
    )
    print(json.dumps({"efficiency": str(path)}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidcom2_lmms_eval.efficiency_table", description=__doc__)
    add_arguments(parser)
    try:
        return run_cli(parser.parse_args(argv))
    except (CollectError, OSError) as exc:  # a clear line for the table scripts, not a traceback
        print(f"collect-efficiency: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
