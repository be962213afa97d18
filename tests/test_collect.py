"""Collector maths on hand-made lmms-eval-shaped outputs: 7-column relative average, 4-benchmark mean."""

import csv
import json
from pathlib import Path

import pytest
from vidcom2_lmms_eval.collect import PAPER_COLUMNS, CollectError, collect, relative_average

PAPER = Path(__file__).resolve().parents[1] / "results" / "paper" / "paper_accuracy.csv"


def _meter(compressor: str, retention: float) -> dict:
    zero = {s: 0.0 for s in ("read_video", "preprocess", "vision", "compress", "prefill", "decode")}
    summary = {
        "samples": 10,
        "ok": 10,
        "failed": 0,
        "cached": 0,
        "stage_seconds_sum": {**zero, "prefill": 2.0},
        "wall_seconds_sum": 5.0,
        "visual_tokens_before_sum": 1000,
        "visual_tokens_after_sum": int(1000 * retention),
        "achieved_retention": retention,
        "peak_allocated_bytes_max": 2 * 1024**3,
        "peak_reserved_bytes_max": 3 * 1024**3,
    }
    return {
        "run": {
            "model_id": "llava_onevision",
            "pretrained": "lmms-lab/llava-onevision-qwen2-7b-ov",
            "frames": 32,
            "compressor": compressor,
            "retention": retention,
            "compression": f"{compressor}@{retention}",
            "world_size": 8,
        },
        "environment": {"lmms_eval": "0.7.3", "transformers": "5.17.0", "torch": "2.11", "gpu": "H100"},
        "overall": summary,
        "per_task": {"videomme": summary, "mvbench_action_count": summary, "mvbench_moving_count": summary},
    }


def _write_run(root: Path, name: str, compressor: str, retention: float, s: dict) -> None:
    """s: mvbench subtasks (a, b), lvb fraction, mlvu, videomme and per-duration correct counts out of 10."""
    d = root / name / "lmms-lab__llava-onevision-qwen2-7b-ov"
    d.mkdir(parents=True)
    results = {
        "results": {
            "mvbench_action_count": {"mvbench_accuracy,none": s["mv"][0], "mvbench_accuracy_stderr,none": 1.0},
            "mvbench_moving_count": {"mvbench_accuracy,none": s["mv"][1]},
            "longvideobench_val_v": {"lvb_acc,none": s["lvb"]},
            "mlvu_dev": {"mlvu_percetion_score,none": s["mlvu"]},
            "videomme": {"videomme_perception_score,none": s["vme"]},
        },
        "n-samples": {
            "mvbench_action_count": {"original": 200, "effective": 200},
            "mvbench_moving_count": {"original": 200, "effective": 600},
            "longvideobench_val_v": {"effective": 100},
            "mlvu_dev": {"effective": 100},
            "videomme": {"effective": 30},
        },
        "lmms_eval_version": "0.7.3",
    }
    (d / "20260101_000000_results.json").write_text(json.dumps(results))
    lines = []
    for duration, correct in zip(("short", "medium", "long"), s["dur"], strict=True):
        for i in range(10):
            lines.append(
                {
                    "videomme_perception_score": {
                        "duration": duration,
                        "pred_answer": "A" if i < correct else "B",
                        "answer": "A",
                    }
                }
            )
    (d / "20260101_000000_samples_videomme.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "20260101T000000_vidcom2_meter.json").write_text(json.dumps(_meter(compressor, retention)))


def test_relative_average_reproduces_the_paper_table():
    with PAPER.open() as fh:
        rows = list(csv.DictReader(fh))
    bases = {(r["model"], r["frames"]): r for r in rows if r["method"] == "Upper bound"}
    for r in rows:
        base = bases[(r["model"], r["frames"])]
        ours = relative_average(
            {c: float(r[c]) for c in PAPER_COLUMNS}, {c: float(base[c]) for c in PAPER_COLUMNS}, PAPER_COLUMNS
        )
        assert ours == pytest.approx(float(r["avg_rel_7col_reported"]), abs=0.16), r


def test_collect_hand_computed(tmp_path):
    base = {"mv": (50.0, 60.0), "lvb": 0.5, "mlvu": 60.0, "vme": 60.0, "dur": (8, 6, 4)}
    comp = {"mv": (40.0, 60.0), "lvb": 0.45, "mlvu": 66.0, "vme": 54.0, "dur": (8, 3, 4)}
    _write_run(tmp_path / "logs", "none", "none", 1.0, base)
    _write_run(tmp_path / "logs", "vidcom2_r0.25", "vidcom2", 0.25, comp)
    out = collect(tmp_path / "logs", tmp_path / "res", "llava_ov", PAPER, expect_runs=2)
    summary = {r["method"]: r for r in csv.DictReader(out["summary"].open())}
    # mvbench = sample-weighted mean of subtasks: base (50*200+60*600)/800 = 57.5, comp (40*200+60*600)/800 = 55
    assert float(summary["none"]["mvbench"]) == pytest.approx(57.5)
    assert float(summary["vidcom2"]["mvbench"]) == pytest.approx(55.0)
    assert float(summary["vidcom2"]["longvideobench_val_v"]) == pytest.approx(45.0)
    assert float(summary["vidcom2"]["videomme_medium"]) == pytest.approx(30.0)
    ratios = [55 / 57.5, 45 / 50, 66 / 60, 54 / 60, 80 / 80, 30 / 60, 40 / 40]
    assert float(summary["vidcom2"]["avg_rel_7col"]) == pytest.approx(100 * sum(ratios) / 7, abs=1e-3)
    assert float(summary["none"]["avg_rel_7col"]) == pytest.approx(100.0)
    assert float(summary["vidcom2"]["avg_4bench"]) == pytest.approx((55 + 45 + 66 + 54) / 4, abs=1e-3)
    assert float(summary["vidcom2"]["achieved_retention"]) == pytest.approx(0.25)
    assert float(summary["vidcom2"]["peak_reserved_gb"]) == pytest.approx(3.0)
    assert summary["vidcom2"]["lmms_eval_version"] == "0.7.3" and summary["vidcom2"]["transformers_version"] == "5.17.0"
    bench = list(csv.DictReader(out["benchmarks"].open()))
    assert len(bench) == 2 * 7  # model x method x retention x benchmark (7 columns)
    vs = [r for r in csv.DictReader(out["vs_paper"].open()) if r["method"] == "vidcom2" and r["column"] == "mvbench"]
    assert float(vs[0]["paper"]) == 57.2 and float(vs[0]["diff"]) == pytest.approx(55.0 - 57.2)
    assert vs[0]["paper_source"] == "VidCom2 paper Table 2"


def test_collect_fails_loudly(tmp_path):
    with pytest.raises(CollectError, match="no lmms-eval"):
        collect(tmp_path, tmp_path / "res", "x")
    _write_run(
        tmp_path / "logs",
        "none",
        "none",
        1.0,
        {"mv": (1.0, 1.0), "lvb": 0.5, "mlvu": 1.0, "vme": 1.0, "dur": (1, 1, 1)},
    )
    with pytest.raises(CollectError, match="expected 3 runs"):
        collect(tmp_path / "logs", tmp_path / "res", "x", expect_runs=3)
    next((tmp_path / "logs").rglob("*_vidcom2_meter.json")).unlink()
    with pytest.raises(CollectError, match="no \\*_vidcom2_meter.json"):
        collect(tmp_path / "logs", tmp_path / "res", "x")
