"""Hand-made lmms-eval run folders (results.json, per-sample logs, our meter) and `vidcom2 bench` CSVs.

Each task's per-sample verdicts are logged as lmms-eval 0.7.3 logs them and results.json holds what
the task's own aggregation reports (MVBench and MLVU through their real aggregation functions).
"""

import csv
import json
from pathlib import Path

from vidcom2_lmms_eval.mini_benchmarks import task_module
from vidcom2_lmms_eval.scoring import MLVU_DEV_TYPES

OV = "lmms-lab/llava-onevision-qwen2-7b-ov"
DURATIONS = ("short", "medium", "long")
STAMP = "20260101_000000"
METRIC = {
    "mvbench_action_count": "mvbench_accuracy",
    "mvbench_moving_count": "mvbench_accuracy",
    "longvideobench_val_v": "lvb_acc",
    "mlvu_dev": "mlvu_percetion_score",
    "videomme": "videomme_perception_score",
}


def metrics_for(task: str, oks: list[bool], failed: set[int]) -> list[dict]:
    """Per-sample verdicts as each lmms-eval task logs them; a failed sample logs an empty answer."""
    out = []
    for i, ok in enumerate(oks):
        pred = "" if i in failed else ("A" if ok else "B")
        if task.startswith("mvbench_"):
            out.append({"pred_answer": pred, "gt_answer": "A", "score": int(pred == "A")})
        elif task == "longvideobench_val_v":  # a failed sample gets a random letter: here the right one
            out.append(
                {
                    "id": str(i),
                    "duration_group": 60,
                    "question_category": "TOS",
                    "answer": "A",
                    "parsed_pred": "A" if i in failed else pred,
                }
            )
        elif task == "mlvu_dev":
            out.append({"task_type": MLVU_DEV_TYPES[i % 7], "pred_answer": pred, "answer": "A"})
        else:
            out.append({"duration": DURATIONS[i % 3], "pred_answer": pred, "answer": "A"})
    return out


def reported(task: str, metrics: list[dict]) -> float:
    """results.json's number, from lmms-eval's own aggregation where it is importable cheaply."""
    if task.startswith("mvbench_"):
        return task_module("mvbench").mvbench_aggregate_results(metrics)
    if task == "mlvu_dev":
        return task_module("mlvu").mlvu_aggregate_results_dev(metrics)
    if task == "longvideobench_val_v":  # fraction
        return sum(m["parsed_pred"] == m["answer"] for m in metrics) / len(metrics)
    return 100.0 * sum(m["pred_answer"] == m["answer"] for m in metrics) / len(metrics)


def write_run(root: Path, name: str, compressor: str, retention: float, oks: dict[str, list[bool]], **kw) -> Path:
    """One run folder: results.json, a samples log per task, the meter (+ its samples) and the launch file."""
    failed: dict[str, set[int]] = kw.get("failed", {})
    d = root / name / "model"
    d.mkdir(parents=True)
    results, n_samples, records = {}, {}, []
    for task, ok in oks.items():
        metrics = metrics_for(task, ok, failed.get(task, set()))
        results[task] = {f"{METRIC[task]},none": reported(task, metrics), f"{METRIC[task]}_stderr,none": "N/A"}
        n_samples[task] = {"original": len(ok), "effective": len(ok)}
        (d / f"{STAMP}_samples_{task}.jsonl").write_text(
            "".join(json.dumps({"doc_id": i, METRIC[task]: m}) + "\n" for i, m in enumerate(metrics))
        )
        for i in range(len(ok)):
            status = "failed" if i in failed.get(task, set()) else "ok"
            records.append({"task": task, "doc_id": i, "rank": 0, "status": status})
    (d / f"{STAMP}_results.json").write_text(
        json.dumps({"results": results, "n-samples": n_samples, "lmms_eval_version": "0.7.3"})
    )
    n, n_failed = len(records), sum(r["status"] == "failed" for r in records)
    summary = {
        "samples": n,
        "ok": n - n_failed,
        "failed": n_failed,
        "cached": 0,
        "stage_seconds_sum": {
            "read_video": 1.0,
            "preprocess": 0.5,
            "vision": 2.0,
            "compress": 0.1,
            "prefill": 4.0 * retention,
            "decode": 3.0,
        },
        "wall_seconds_sum": 20.0,
        "visual_tokens_before_sum": 1000,
        "visual_tokens_after_sum": int(1000 * retention),
        "achieved_retention": retention,
        "peak_allocated_bytes_max": 2 * 1024**3,
        "peak_reserved_bytes_max": 3 * 1024**3,
    }
    info = {
        "model_id": kw.get("model_id", "llava_onevision"),
        "pretrained": kw.get("pretrained", OV),
        "frames": kw.get("frames", 32),
        "compressor": compressor,
        "retention": retention,
        "compression": f"{compressor}@{retention}",
        "compression_options": kw.get("options", {}),
        "world_size": 4,
        "elapsed_seconds": 50.0,
    }
    env = {"lmms_eval": "0.7.3", "transformers": "5.17.0", "torch": "2.11", "gpu": "H100", "commit": "abc1234"}
    per_task = {t: summary for t in oks}
    (d / "20260101T000000_vidcom2_meter.json").write_text(
        json.dumps({"run": info, "environment": env, "overall": summary, "per_task": per_task})
    )
    (d / "20260101T000000_vidcom2_meter_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "vidcom2_launch.json").write_text(json.dumps({"wall_seconds": kw.get("wall", 100.0)}))
    return d


def oks(n_right: dict[str, int], n: int = 6) -> dict[str, list[bool]]:
    return {t: [i < n_right[t] for i in range(n)] for t in METRIC}


def bench_csv(path: Path) -> Path:
    fields = [
        "model",
        "compressor",
        "compressor_options",
        "retention",
        "frames",
        "batch",
        "achieved_retention",
        "read_video_ms",
        "preprocess_ms",
        "vision_ms",
        "compress_ms",
        "prefill_ms",
        "decode_ms",
        "end_to_end_ms",
        "samples_per_s",
        "peak_allocated_mib",
        "peak_reserved_mib",
        "repeats",
        "gpu",
    ]
    rows = [
        ["llava_ov_7b", "none", "", 1.0, 32, 1, 1.0, 60, 3, 40, 0, 160, 400, 663, 1.5, 16384, 17000, 3, "H200"],
        ["llava_ov_7b", "vidcom2", "", 0.25, 32, 1, 0.25, 70, 3, 40, 1, 40, 340, 494, 2.0, 15360, 16000, 3, "H200"],
        ["llava_ov_7b", "none", "", 1.0, 8, 1, 1.0, 10, 1, 10, 0, 40, 400, 461, 2.1, 15000, 15000, 3, "H200"],
    ]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        w.writerows(rows)
    return path
