"""lmms-eval outputs (+ our meter) -> results CSVs: per-benchmark rows, the paper's averages, paper comparison.

Layout it reads: every directory under ``root`` that holds ``*_results.json`` (lmms-eval) is one run
(one model x method x retention); the latest results file and the latest ``*_vidcom2_meter.json`` of
that directory are used. Method, retention and frames come from the meter (it saw the resolved
compression, including COMPRESSOR / R_RATIO), so a run without a meter is an error.

Averages (VidCom2 paper, Table 2): ``avg_rel_7col`` is the mean over the 7 columns MVBench,
LongVideoBench, MLVU, VideoMME overall/short/medium/long of score / uncompressed score, in percent;
``avg_4bench`` the plain mean of the 4 benchmark scores. ``avg_rel_all`` is the relative average
over whatever columns a run has (e.g. the synthetic task alone).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAPER_COLUMNS = (
    "mvbench",
    "longvideobench_val_v",
    "mlvu_dev",
    "videomme",
    "videomme_short",
    "videomme_medium",
    "videomme_long",
)
FOUR_BENCHMARKS = ("mvbench", "longvideobench_val_v", "mlvu_dev", "videomme")


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's score sits in lmms-eval's results.json and its scale to percent."""

    metric: str
    scale: float = 1.0
    subtask_prefix: str | None = None  # group scored as the sample-weighted mean of its subtasks


# Metric names and scales from lmms-eval 0.7.3's task YAMLs / aggregation functions.
BENCHMARKS: dict[str, Benchmark] = {
    "videomme": Benchmark("videomme_perception_score"),  # percent
    "mlvu_dev": Benchmark("mlvu_percetion_score"),  # percent (sic: lmms-eval's spelling)
    "longvideobench_val_v": Benchmark("lvb_acc", 100.0),  # fraction
    "mvbench": Benchmark("mvbench_accuracy", subtask_prefix="mvbench_"),  # group without aggregate
    "vidcom2_synth_mc": Benchmark("accuracy", 100.0),  # fraction
    "vidcom2_synth_event": Benchmark("accuracy", 100.0),  # fraction
}

# pretrained -> model name used in the paper table
PAPER_MODEL_NAMES = {
    "lmms-lab/llava-onevision-qwen2-7b-ov": "LLaVA-OV-7B",
    "lmms-lab/LLaVA-Video-7B-Qwen2": "LLaVA-Video-7B",
    "Qwen/Qwen3-VL-8B-Instruct": "Qwen3-VL-8B-Instruct",
}
PAPER_METHOD_NAMES = {"none": "Upper bound", "vidcom2": "VidCom2"}


class CollectError(ValueError):
    """Missing or inconsistent lmms-eval output; the message names the file."""


def _metric(task_results: dict[str, Any], metric: str, where: str) -> float:
    for key, value in task_results.items():
        if key.split(",")[0] == metric and not key.endswith("_stderr") and isinstance(value, (int, float)):
            return float(value)
    raise CollectError(f"{where}: no metric {metric!r} (have {sorted(task_results)})")


def benchmark_scores(results: dict[str, Any], run_dir: Path) -> dict[str, tuple[float, int]]:
    """{benchmark: (score in percent, samples)} for every known benchmark present in a results.json."""
    per_task = results.get("results", {})
    n_samples = results.get("n-samples", {})
    scores: dict[str, tuple[float, int]] = {}
    for name, bench in BENCHMARKS.items():
        if bench.subtask_prefix:
            subtasks = [t for t in per_task if t.startswith(bench.subtask_prefix)]
            if not subtasks:
                continue
            total, weight = 0.0, 0
            for t in subtasks:
                n = int(n_samples.get(t, {}).get("effective", 0))
                if n == 0:
                    raise CollectError(f"{run_dir}: no n-samples for {t}")
                total += _metric(per_task[t], bench.metric, f"{run_dir} [{t}]") * n
                weight += n
            scores[name] = (total / weight * bench.scale, weight)
        elif name in per_task:
            n = int(n_samples.get(name, {}).get("effective", 0))
            scores[name] = (_metric(per_task[name], bench.metric, f"{run_dir} [{name}]") * bench.scale, n)
    return scores


def videomme_durations(samples_file: Path) -> dict[str, tuple[float, int]]:
    """VideoMME short/medium/long accuracy (percent) from lmms-eval's per-sample log."""
    counts: dict[str, list[int]] = {}
    for line in samples_file.read_text().splitlines():
        if not line.strip():
            continue
        data = json.loads(line).get("videomme_perception_score")
        if not isinstance(data, dict):
            raise CollectError(f"{samples_file}: sample without videomme_perception_score")
        c = counts.setdefault(str(data["duration"]), [0, 0])
        c[0] += int(str(data["pred_answer"]).lower() == str(data["answer"]).lower())
        c[1] += 1
    return {f"videomme_{d}": (100.0 * ok / n, n) for d, (ok, n) in counts.items() if d in ("short", "medium", "long")}


def relative_average(row: dict[str, float], base: dict[str, float], columns: tuple[str, ...]) -> float | None:
    """Mean of row[c] / base[c] over ``columns``, in percent; None unless every column is in both."""
    if not columns or any(c not in row or c not in base or not base[c] for c in columns):
        return None
    return 100.0 * sum(row[c] / base[c] for c in columns) / len(columns)


def plain_average(row: dict[str, float], columns: tuple[str, ...]) -> float | None:
    if any(c not in row for c in columns):
        return None
    return sum(row[c] for c in columns) / len(columns)


def _latest(run_dir: Path, pattern: str) -> Path | None:
    files = sorted(run_dir.glob(pattern))
    return files[-1] if files else None


def load_run(run_dir: Path) -> dict[str, Any]:
    """One run directory -> scores, meter and versions (raises CollectError when anything is missing)."""
    results_file = _latest(run_dir, "*_results.json")
    if results_file is None:
        raise CollectError(
            f"{run_dir}: no lmms-eval *_results.json (did the evaluation fail? lmms-eval exits 0 on errors)"
        )
    results = json.loads(results_file.read_text())
    meter_file = _latest(run_dir, "*_vidcom2_meter.json")
    if meter_file is None:
        raise CollectError(
            f"{run_dir}: no *_vidcom2_meter.json next to {results_file.name} (not run through our wrappers?)"
        )
    meter = json.loads(meter_file.read_text())
    scores = benchmark_scores(results, run_dir)
    if not scores:
        raise CollectError(f"{results_file}: none of the known benchmarks {sorted(BENCHMARKS)} in its results")
    if "videomme" in scores:
        stamp = results_file.name.removesuffix("_results.json")
        samples = run_dir / f"{stamp}_samples_videomme.jsonl"
        if not samples.is_file():
            raise CollectError(f"{samples}: missing; VideoMME short/medium/long need --log_samples")
        scores.update(videomme_durations(samples))
    return {
        "dir": run_dir,
        "results_file": results_file,
        "results": results,
        "meter_file": meter_file,
        "meter": meter,
        "scores": scores,
    }


def _model_name(run: dict[str, Any]) -> str:
    pretrained = str(run["meter"]["run"]["pretrained"])
    return PAPER_MODEL_NAMES.get(pretrained, pretrained.rstrip("/").split("/")[-1])


def _stage_means(summary: dict[str, Any]) -> dict[str, float | None]:
    n = summary.get("ok") or 0
    return {f"{k}_s_mean": (v / n if n else None) for k, v in summary.get("stage_seconds_sum", {}).items()}


def rows_for(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-benchmark rows, per-run summary rows) with relative averages against each model's baseline."""
    keyed: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        info = run["meter"]["run"]
        key = (_model_name(run), info.get("frames"), info["compressor"], float(info["retention"]))
        if key in keyed:
            raise CollectError(f"two runs for {key}: {keyed[key]['dir']} and {run['dir']}")
        keyed[key] = run
    bench_rows, summary_rows = [], []
    for (model, frames, method, retention), run in sorted(
        keyed.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] != "none", -kv[0][3])
    ):
        base_run = keyed.get((model, frames, "none", 1.0))
        scores = {k: v[0] for k, v in run["scores"].items()}
        base = {k: v[0] for k, v in base_run["scores"].items()} if base_run else {}
        meter, env = run["meter"], run["meter"].get("environment", {})
        common = {
            "model": model,
            "pretrained": meter["run"]["pretrained"],
            "model_id": meter["run"]["model_id"],
            "frames": frames,
            "method": method,
            "retention": retention,
            "compression": meter["run"].get("compression"),
            "world_size": meter["run"].get("world_size"),
            "lmms_eval_version": env.get("lmms_eval") or run["results"].get("lmms_eval_version"),
            "transformers_version": env.get("transformers"),
            "torch_version": env.get("torch"),
            "gpu": env.get("gpu") or "cpu",
            "dtype": meter["run"].get("dtype"),
            "attn_implementation": meter["run"].get("attn_implementation"),
        }
        overall = meter["overall"]
        shared_cols = tuple(c for c in scores if c in base)
        summary = {
            **common,
            **{c: scores.get(c) for c in PAPER_COLUMNS},
            **{c: v for c, v in sorted(scores.items()) if c not in PAPER_COLUMNS},
            "avg_rel_7col": relative_average(scores, base, PAPER_COLUMNS),
            "avg_4bench": plain_average(scores, FOUR_BENCHMARKS),
            "avg_rel_all": relative_average(scores, base, shared_cols),
            "benchmarks": ";".join(sorted(scores)),
            "samples": overall["samples"],
            "failed_samples": overall["failed"],
            "cached_samples": overall["cached"],
            "achieved_retention": overall["achieved_retention"],
            "visual_tokens_before_sum": overall["visual_tokens_before_sum"],
            "visual_tokens_after_sum": overall["visual_tokens_after_sum"],
            "wall_s_sum": overall["wall_seconds_sum"],
            **{f"{k}_s_sum": v for k, v in overall["stage_seconds_sum"].items()},
            "peak_allocated_gb": _gb(overall.get("peak_allocated_bytes_max")),
            "peak_reserved_gb": _gb(overall.get("peak_reserved_bytes_max")),
            "results_file": str(run["results_file"]),
            "meter_file": str(run["meter_file"]),
        }
        summary_rows.append(summary)
        per_task = meter.get("per_task", {})
        for bench, (score, n) in sorted(run["scores"].items()):
            task_meter = _task_meter(per_task, bench)
            bench_rows.append(
                {
                    **common,
                    "benchmark": bench,
                    "score": score,
                    "baseline_score": base.get(bench),
                    "relative_to_baseline": (100.0 * score / base[bench]) if base.get(bench) else None,
                    "samples": n,
                    "failed_samples": task_meter.get("failed"),
                    "achieved_retention": task_meter.get("achieved_retention"),
                    "wall_s_sum": task_meter.get("wall_seconds_sum"),
                    **_stage_means(task_meter),
                    "peak_allocated_gb": _gb(task_meter.get("peak_allocated_bytes_max")),
                }
            )
    return bench_rows, summary_rows


def _task_meter(per_task: dict[str, Any], bench: str) -> dict[str, Any]:
    """Meter summary of a benchmark (merging subtasks for groups; videomme durations share videomme's)."""
    bench = "videomme" if bench.startswith("videomme_") else bench
    spec = BENCHMARKS.get(bench)
    if spec and spec.subtask_prefix:
        parts = [v for k, v in per_task.items() if k.startswith(spec.subtask_prefix)]
        if not parts:
            return {}
        before = sum(p["visual_tokens_before_sum"] for p in parts)
        stage_keys = {k for p in parts for k in p["stage_seconds_sum"]}
        return {
            "failed": sum(p["failed"] for p in parts),
            "ok": sum(p["ok"] for p in parts),
            "achieved_retention": sum(p["visual_tokens_after_sum"] for p in parts) / before if before else None,
            "wall_seconds_sum": sum(p["wall_seconds_sum"] for p in parts),
            "stage_seconds_sum": {k: sum(p["stage_seconds_sum"].get(k, 0.0) for p in parts) for k in stage_keys},
            "peak_allocated_bytes_max": max((p["peak_allocated_bytes_max"] or 0 for p in parts), default=None) or None,
        }
    return per_task.get(bench, {})


def _gb(value: int | None) -> float | None:
    return None if value is None else value / 1024**3


def compare_with_paper(summary_rows: list[dict[str, Any]], paper_csv: Path) -> list[dict[str, Any]]:
    """Our score next to the paper's for every (model, frames, method, retention, column) both have."""
    with paper_csv.open() as fh:
        paper = list(csv.DictReader(fh))
    out = []
    for row in summary_rows:
        method = PAPER_METHOD_NAMES.get(row["method"])
        for p in paper:
            if (p["model"], int(p["frames"]), p["method"], float(p["retention"])) != (
                row["model"],
                row["frames"],
                method,
                round(row["retention"], 2),
            ):
                continue
            for col in (*PAPER_COLUMNS, "avg_rel_7col"):
                ours = row.get(col)
                theirs = float(p["avg_rel_7col_reported" if col == "avg_rel_7col" else col])
                out.append(
                    {
                        "model": row["model"],
                        "frames": row["frames"],
                        "method": row["method"],
                        "retention": row["retention"],
                        "column": col,
                        "ours": ours,
                        "paper": theirs,
                        "diff": None if ours is None else ours - theirs,
                        "paper_source": p["source"],
                    }
                )
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
    return path


def _fmt(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def find_runs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*_results.json")})


def collect(
    root: str | Path,
    out_dir: str | Path,
    name: str,
    paper_csv: str | Path | None = None,
    expect_runs: int | None = None,
) -> dict[str, Path]:
    """Read every run under ``root`` and write ``<name>_benchmarks.csv``, ``<name>_summary.csv`` and,
    with ``paper_csv``, ``<name>_vs_paper.csv`` into ``out_dir``. Returns the written paths."""
    root, out = Path(root), Path(out_dir)
    run_dirs = find_runs(root)
    if not run_dirs:
        raise CollectError(f"no lmms-eval *_results.json under {root}")
    if expect_runs is not None and len(run_dirs) != expect_runs:
        raise CollectError(
            f"expected {expect_runs} runs under {root}, found {len(run_dirs)}: {[str(d) for d in run_dirs]}"
        )
    bench_rows, summary_rows = rows_for([load_run(d) for d in run_dirs])
    written = {
        "benchmarks": write_csv(bench_rows, out / f"{name}_benchmarks.csv"),
        "summary": write_csv(summary_rows, out / f"{name}_summary.csv"),
    }
    if paper_csv is not None:
        written["vs_paper"] = write_csv(compare_with_paper(summary_rows, Path(paper_csv)), out / f"{name}_vs_paper.csv")
    return written
