"""lmms-eval outputs (+ our meter) -> results CSVs: per-benchmark rows, the paper's averages, paper comparison.

Layout it reads: every directory under ``root`` that holds ``*_results.json`` (lmms-eval) is one run
(one model x method x retention x frames x options); the latest results file, its per-sample logs and
the latest ``*_vidcom2_meter.json`` of that directory are used. Method, retention, options and frames
come from the meter (it saw the resolved compression, including COMPRESSOR / R_RATIO), so a run
without a meter is an error.

Scores are recomputed from the per-sample logs with every failed sample (an unreadable video under
``on_video_error=record``) counted as a wrong answer, whatever the task's own aggregation does with an
empty answer (see :mod:`vidcom2_lmms_eval.scoring`); results.json's own number stays beside it
(``lmms_eval_score``) and the failures have their own column.

Averages (VidCom2 paper, Table 2): ``avg_rel_7col`` is the mean over the 7 columns MVBench,
LongVideoBench, MLVU, VideoMME overall/short/medium/long of score / uncompressed score, in percent;
``avg_4bench`` the plain mean of the 4 benchmark scores. ``avg_rel_all`` is the relative average
over whatever columns a run has (e.g. the synthetic task alone).

Paper comparison (``--paper``): a run's paper model comes from :func:`vidcom2_lmms_eval.paper.paper_model`;
its paper row is the one of its (model, frames, method, R), for the run with the method's defaults or
the only run of that setting (a table row that needs options), never for an ablation variant beside it.
When no run has a paper row the benchmarks and summary CSVs are written and the collection fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidcom2_lmms_eval.paper import (
    PAPER_METHOD_NAMES,
    index_accuracy,
    paper_key,
    paper_model,
    read_paper,
)
from vidcom2_lmms_eval.scoring import MVBENCH_PREFIX, SCORINGS, ScoringError, TaskScore, score_task, scoring_for

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
VIDEOMME_DURATIONS = ("short", "medium", "long")
LAUNCH_FILE = "vidcom2_launch.json"  # written by scripts/eval_common.sh next to lmms-eval's results


class CollectError(ValueError):
    """Missing or inconsistent lmms-eval output; the message names the file."""


@dataclass(frozen=True)
class BenchScore:
    """One benchmark of one run, in percent."""

    score: float  # failed samples counted wrong
    lmms_eval_score: float  # results.json (MVBench: the sample-weighted mean of its subtasks)
    samples: int
    failed: int


def _reported(task_results: dict[str, Any], metric: str, where: str) -> float:
    for key, value in task_results.items():
        if key.split(",")[0] == metric and not key.endswith("_stderr") and isinstance(value, (int, float)):
            return float(value)
    raise CollectError(f"{where}: no metric {metric!r} (have {sorted(task_results)})")


def _task_score(run_dir: Path, stamp: str, results: dict[str, Any], task: str, failed: set[Any]) -> TaskScore:
    scoring = scoring_for(task)
    reported = _reported(results["results"][task], scoring.metric, f"{run_dir} [{task}]")
    samples_file = run_dir / f"{stamp}_samples_{task}.jsonl"
    if samples_file.is_file():
        try:
            return score_task(task, samples_file, reported, failed)
        except ScoringError as exc:
            raise CollectError(str(exc)) from None
    if failed:
        raise CollectError(
            f"{samples_file}: missing, and the meter recorded {len(failed)} failed samples of {task}; scoring them as "
            "wrong needs lmms-eval's per-sample log (--log_samples)"
        )
    n = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    return TaskScore(task, reported * scoring.scale, reported * scoring.scale, n, 0, None)


def _duration_scores(videomme: TaskScore, where: Path) -> dict[str, BenchScore]:
    if videomme.verdicts is None:
        raise CollectError(f"{where}: no samples_videomme.jsonl; VideoMME short/medium/long need --log_samples")
    scoring, out = SCORINGS["videomme"], {}
    for duration in VIDEOMME_DURATIONS:
        part = [(m, forced) for m, forced in videomme.verdicts if m["duration"] == duration]
        if part:
            failed = sum(forced is False for _, forced in part)
            own = scoring.score((m, None) for m, _ in part)
            out[f"videomme_{duration}"] = BenchScore(scoring.score(part), own, len(part), failed)
    return out


def benchmark_scores(
    results: dict[str, Any], run_dir: Path, stamp: str, failed: dict[str, set[Any]]
) -> dict[str, BenchScore]:
    """{benchmark: BenchScore} for every known benchmark in a results.json (MVBench pools its subtasks)."""
    tasks = [t for t in results.get("results", {}) if scoring_for(t) is not None]
    scored = {t: _task_score(run_dir, stamp, results, t, failed.get(t, set())) for t in tasks}
    out: dict[str, BenchScore] = {}
    subtasks = [scored[t] for t in sorted(scored) if t.startswith(MVBENCH_PREFIX)]
    if subtasks:
        n = sum(s.samples for s in subtasks)
        if n == 0:
            raise CollectError(f"{run_dir}: MVBench subtasks without samples")
        ours = sum(s.score * s.samples for s in subtasks) / n  # every subtask pools all its samples
        reported = sum(s.task_rule_score * s.samples for s in subtasks) / n
        out["mvbench"] = BenchScore(ours, reported, n, sum(s.failed for s in subtasks))
    for task, s in scored.items():
        if not task.startswith(MVBENCH_PREFIX):
            out[task] = BenchScore(s.score, s.task_rule_score, s.samples, s.failed)
    if "videomme" in scored:
        out.update(_duration_scores(scored["videomme"], run_dir))
    return out


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


def failed_docs(meter_file: Path, meter: dict[str, Any]) -> dict[str, set[Any]]:
    """task -> doc ids the meter recorded as failed (from the meter's per-sample file)."""
    samples = meter_file.with_name(meter_file.name.replace("_vidcom2_meter.json", "_vidcom2_meter_samples.jsonl"))
    out: dict[str, set[Any]] = {}
    if not samples.is_file():
        if meter.get("overall", {}).get("failed"):
            raise CollectError(f"{samples}: missing, but {meter_file.name} counts failed samples")
        return out
    for line in samples.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("status") == "failed":
                out.setdefault(record["task"], set()).add(record["doc_id"])
    return out


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
    stamp = results_file.name.removesuffix("_results.json")
    scores = benchmark_scores(results, run_dir, stamp, failed_docs(meter_file, meter))
    if not scores:
        known = sorted({*SCORINGS, MVBENCH_PREFIX + "*"})
        raise CollectError(f"{results_file}: none of the known benchmarks {known} in its results")
    launch_file = run_dir / LAUNCH_FILE
    launch = json.loads(launch_file.read_text()) if launch_file.is_file() else {}
    return {
        "dir": run_dir,
        "results_file": results_file,
        "results": results,
        "meter_file": meter_file,
        "meter": meter,
        "scores": scores,
        "launch": launch,
    }


def variant(run_info: dict[str, Any]) -> str:
    """The run's explicitly given method options, ``k=v`` joined by ``,`` (empty: the method's defaults)."""
    options = run_info.get("compression_options") or {}
    return ",".join(f"{k}={options[k]}" for k in sorted(options))


def run_key(run: dict[str, Any], paper_model_override: str | None = None) -> tuple:
    info = run["meter"]["run"]
    model = paper_model(str(info["model_id"]), str(info["pretrained"]), paper_model_override).name
    return (model, info.get("frames"), info["compressor"], float(info["retention"]), variant(info))


def _stage_means(summary: dict[str, Any]) -> dict[str, float | None]:
    n = summary.get("ok") or 0
    return {f"{k}_s_mean": (v / n if n else None) for k, v in summary.get("stage_seconds_sum", {}).items()}


def _common(run: dict[str, Any], key: tuple, match: str) -> dict[str, Any]:
    model, frames, method, retention, options = key
    meter, env = run["meter"], run["meter"].get("environment", {})
    info = meter["run"]
    return {
        "model": model,
        "paper_model_match": match,
        "pretrained": info["pretrained"],
        "model_id": info["model_id"],
        "frames": frames,
        "method": method,
        "variant": options,
        "retention": retention,
        "compression": info.get("compression"),
        "world_size": info.get("world_size"),
        "lmms_eval_version": env.get("lmms_eval") or run["results"].get("lmms_eval_version"),
        "transformers_version": env.get("transformers"),
        "torch_version": env.get("torch"),
        "gpu": env.get("gpu") or "cpu",
        "dtype": info.get("dtype"),
        "attn_implementation": info.get("attn_implementation"),
        "commit": env.get("commit"),
        "date": env.get("date"),
    }


def _paper_row(paper: dict[tuple, dict[str, str]], key: tuple, alone: bool) -> dict[str, str] | None:
    """The paper's row for a run: the run with the method's defaults, or the only run of its
    (model, frames, method, R) (a table row that needs options); not an ablation variant beside them."""
    model, frames, method, retention, options = key
    if (options and not alone) or method not in PAPER_METHOD_NAMES:
        return None
    return paper.get(paper_key(model, frames, PAPER_METHOD_NAMES[method], retention))


def _paper_value(row: dict[str, str] | None, column: str) -> float | None:
    if row is None:
        return None
    if column == "avg_rel_7col":
        return float(row["avg_rel_7col_reported"])
    if column == "avg_4bench":
        return sum(float(row[c]) for c in FOUR_BENCHMARKS) / len(FOUR_BENCHMARKS)
    return float(row[column]) if row.get(column) not in (None, "") else None


def _diff(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else ours - theirs


def rows_for(
    runs: list[dict[str, Any]],
    paper: dict[tuple, dict[str, str]] | None = None,
    paper_model_override: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-benchmark rows, per-run summary rows, paper comparison rows) with relative averages
    against each model's uncompressed run at the same frames."""
    keyed: dict[tuple, tuple[dict[str, Any], str]] = {}
    for run in runs:
        info = run["meter"]["run"]
        match = paper_model(str(info["model_id"]), str(info["pretrained"]), paper_model_override).how
        key = run_key(run, paper_model_override)
        if key in keyed:
            raise CollectError(f"two runs for {key}: {keyed[key][0]['dir']} and {run['dir']}")
        keyed[key] = (run, match)
    paper = paper or {}
    per_setting: dict[tuple, int] = {}
    for key in keyed:
        per_setting[key[:4]] = per_setting.get(key[:4], 0) + 1
    bench_rows, summary_rows, vs_rows = [], [], []
    order = sorted(keyed, key=lambda k: (k[0], k[1] or 0, k[2] != "none", k[2], -k[3], k[4]))
    for key in order:
        run, match = keyed[key]
        base_run = keyed.get((key[0], key[1], "none", 1.0, ""), (None, ""))[0]
        scores = {k: v.score for k, v in run["scores"].items()}
        base = {k: v.score for k, v in base_run["scores"].items()} if base_run else {}
        common = _common(run, key, match)
        overall = run["meter"]["overall"]
        shared_cols = tuple(c for c in scores if c in base)
        averages = {
            "avg_rel_7col": relative_average(scores, base, PAPER_COLUMNS),
            "avg_4bench": plain_average(scores, FOUR_BENCHMARKS),
        }
        prow = _paper_row(paper, key, per_setting[key[:4]] == 1)
        paper_avgs = {c: _paper_value(prow, c) for c in averages}
        summary_rows.append(
            {
                **common,
                **{c: scores.get(c) for c in PAPER_COLUMNS},
                **{c: v for c, v in sorted(scores.items()) if c not in PAPER_COLUMNS},
                **averages,
                "avg_rel_all": relative_average(scores, base, shared_cols),
                "paper_avg_rel_7col": paper_avgs["avg_rel_7col"],
                "avg_rel_7col_drift": _diff(averages["avg_rel_7col"], paper_avgs["avg_rel_7col"]),
                "paper_avg_4bench": paper_avgs["avg_4bench"],
                "avg_4bench_drift": _diff(averages["avg_4bench"], paper_avgs["avg_4bench"]),
                "paper_source": prow["source"] if prow else None,
                "benchmarks": ";".join(sorted(scores)),
                "samples": overall["samples"],
                "failed_samples": overall["failed"],
                "cached_samples": overall["cached"],
                "achieved_retention": overall["achieved_retention"],
                "layer_average_retention": overall.get("layer_average_retention"),
                "visual_tokens_before_sum": overall["visual_tokens_before_sum"],
                "visual_tokens_after_sum": overall["visual_tokens_after_sum"],
                "wall_s_sum": overall["wall_seconds_sum"],
                **{f"{k}_s_sum": v for k, v in overall["stage_seconds_sum"].items()},
                "peak_allocated_gb": _gb(overall.get("peak_allocated_bytes_max")),
                "peak_reserved_gb": _gb(overall.get("peak_reserved_bytes_max")),
                "elapsed_s": run["meter"]["run"].get("elapsed_seconds"),
                "launch_wall_s": run["launch"].get("wall_seconds"),
                "results_file": str(run["results_file"]),
                "meter_file": str(run["meter_file"]),
            }
        )
        per_task = run["meter"].get("per_task", {})
        for bench, s in sorted(run["scores"].items()):
            task_meter = _task_meter(per_task, bench)
            theirs = _paper_value(prow, bench)
            bench_rows.append(
                {
                    **common,
                    "benchmark": bench,
                    "score": s.score,
                    "lmms_eval_score": s.lmms_eval_score,
                    "samples": s.samples,
                    "failed_samples": s.failed,
                    "baseline_score": base.get(bench),
                    "relative_to_baseline": (100.0 * s.score / base[bench]) if base.get(bench) else None,
                    **averages,
                    "paper_score": theirs,
                    "paper_drift": _diff(s.score, theirs),
                    **{f"paper_{c}": v for c, v in paper_avgs.items()},
                    "paper_source": prow["source"] if prow else None,
                    "achieved_retention": task_meter.get("achieved_retention"),
                    "layer_average_retention": task_meter.get("layer_average_retention"),
                    "wall_s_sum": task_meter.get("wall_seconds_sum"),
                    **_stage_means(task_meter),
                    "peak_allocated_gb": _gb(task_meter.get("peak_allocated_bytes_max")),
                }
            )
        if prow is not None:
            for col in (*PAPER_COLUMNS, *averages):
                ours = scores.get(col) if col in PAPER_COLUMNS else averages[col]
                theirs = _paper_value(prow, col)
                vs_rows.append(
                    {
                        "model": key[0],
                        "frames": key[1],
                        "method": key[2],
                        "retention": key[3],
                        "column": col,
                        "ours": ours,
                        "paper": theirs,
                        "diff": _diff(ours, theirs),
                        "failed_samples": overall["failed"],
                        "paper_source": prow["source"],
                    }
                )
    return bench_rows, summary_rows, vs_rows


def _task_meter(per_task: dict[str, Any], bench: str) -> dict[str, Any]:
    """Meter summary of a benchmark (merging subtasks for MVBench; videomme durations share videomme's)."""
    bench = "videomme" if bench.startswith("videomme_") else bench
    if bench == "mvbench":
        parts = [v for k, v in per_task.items() if k.startswith(MVBENCH_PREFIX)]
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


def select_runs(root: Path, names: list[str] | None) -> list[Path]:
    """Run directories under ``root``; with ``names``, only those under ``root/<name>`` (each must exist)."""
    if not names:
        return find_runs(root)
    dirs = []
    for name in names:
        found = find_runs(root / name)
        if not found:
            raise CollectError(f"{root / name}: no lmms-eval *_results.json (run --runs {name} first)")
        dirs += found
    return dirs


def _unmatched_message(runs: list[dict[str, Any]], paper_csv: Path, override: str | None) -> str:
    rows = read_paper(paper_csv)
    ours = sorted({run_key(r, override)[:4] for r in runs}, key=str)
    have = sorted({(r["model"], int(r["frames"])) for r in rows})
    pretrained = sorted({str(r["meter"]["run"]["pretrained"]) for r in runs})
    return (
        f"no run matches a row of {paper_csv}: our runs are (model, frames, method, R) {ours} from {pretrained}; "
        f"the paper has (model, frames) {have}. A local checkpoint of a paper model matches through its config.json "
        "or an explicit PAPER_MODEL=<paper name> (vidcom2 collect --paper-model), e.g. PAPER_MODEL=LLaVA-OV-7B. "
        "The benchmarks and summary CSVs were written; no vs_paper CSV."
    )


def collect(
    root: str | Path,
    out_dir: str | Path,
    name: str,
    paper_csv: str | Path | None = None,
    expect_runs: int | None = None,
    runs: list[str] | None = None,
    paper_model_override: str | None = None,
) -> dict[str, Path]:
    """Read the runs under ``root`` (only ``root/<r>`` for ``r`` in ``runs`` when given) and write
    ``<name>_benchmarks.csv``, ``<name>_summary.csv`` and, with ``paper_csv``, ``<name>_vs_paper.csv``
    into ``out_dir``. With ``paper_csv``, a collection where no run matches a paper row raises after
    writing the first two (an empty comparison is never written). Returns the written paths."""
    root, out = Path(root), Path(out_dir)
    run_dirs = select_runs(root, runs)
    if not run_dirs:
        raise CollectError(f"no lmms-eval *_results.json under {root}")
    if expect_runs is not None and len(run_dirs) != expect_runs:
        raise CollectError(
            f"expected {expect_runs} runs under {root}, found {len(run_dirs)}: {[str(d) for d in run_dirs]}"
        )
    loaded = [load_run(d) for d in run_dirs]
    paper = index_accuracy(read_paper(Path(paper_csv))) if paper_csv is not None else None
    bench_rows, summary_rows, vs_rows = rows_for(loaded, paper, paper_model_override)
    written = {
        "benchmarks": write_csv(bench_rows, out / f"{name}_benchmarks.csv"),
        "summary": write_csv(summary_rows, out / f"{name}_summary.csv"),
    }
    if paper_csv is not None:
        target = out / f"{name}_vs_paper.csv"
        if not vs_rows:
            target.unlink(missing_ok=True)  # a stale comparison from an earlier collection would mislead
            raise CollectError(_unmatched_message(loaded, Path(paper_csv), paper_model_override))
        written["vs_paper"] = write_csv(vs_rows, target)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder holding one lmms-eval output folder per run")
    p.add_argument("--out", default="results", help="CSV folder")
    p.add_argument("--name", required=True, help="CSV file prefix, e.g. llava_ov")
    p.add_argument("--paper", default=None, help="paper numbers CSV (results/paper/paper_accuracy.csv)")
    p.add_argument("--paper-model", default=None, help="the paper's name of the model, e.g. LLaVA-OV-7B (local dirs)")
    p.add_argument("--expect-runs", type=int, default=None, help="fail unless exactly this many runs are found")
    p.add_argument("--runs", default=None, help="comma list of run folders under ROOT to read (default: all)")


def run_cli(args: argparse.Namespace) -> int:
    runs = [r for r in (args.runs or "").split(",") if r]
    written = collect(
        Path(args.root), Path(args.out), args.name, args.paper, args.expect_runs, runs or None, args.paper_model
    )
    print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collect_results.py", description="lmms-eval outputs -> results CSVs")
    add_arguments(parser)
    try:
        return run_cli(parser.parse_args(argv))
    except (CollectError, OSError) as exc:  # a clear line for the table scripts, not a traceback
        print(f"collect: error: {exc}", file=sys.stderr)
        return 1
