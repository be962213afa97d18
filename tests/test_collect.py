"""Collector on hand-made lmms-eval-shaped outputs: averages, failed samples, paper matching, efficiency."""

import csv
import json
import sys
from pathlib import Path

import pytest
from vidcom2_lmms_eval.collect import PAPER_COLUMNS, CollectError, collect, relative_average
from vidcom2_lmms_eval.efficiency_table import collect_efficiency
from vidcom2_lmms_eval.paper import paper_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "lmms_helpers"))
from fake_runs import DURATIONS, METRIC, OV, STAMP, bench_csv, oks, write_run  # noqa: E402

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
PAPER = PAPER_DIR / "paper_accuracy.csv"


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_relative_average_reproduces_the_paper_table():
    rows = _rows(PAPER)
    bases = {(r["model"], r["frames"]): r for r in rows if r["method"] == "Upper bound"}
    for r in rows:
        base = bases[(r["model"], r["frames"])]
        ours = relative_average(
            {c: float(r[c]) for c in PAPER_COLUMNS}, {c: float(base[c]) for c in PAPER_COLUMNS}, PAPER_COLUMNS
        )
        assert ours == pytest.approx(float(r["avg_rel_7col_reported"]), abs=0.16), r


def test_collect_hand_computed(tmp_path):
    # 6 docs per task; videomme durations cycle short/medium/long, MLVU types cycle over 7 (6 present)
    base = oks(
        {"mvbench_action_count": 6, "mvbench_moving_count": 3, "longvideobench_val_v": 3, "mlvu_dev": 6, "videomme": 6}
    )
    comp = oks(
        {"mvbench_action_count": 3, "mvbench_moving_count": 3, "longvideobench_val_v": 2, "mlvu_dev": 3, "videomme": 4}
    )
    write_run(tmp_path / "logs", "none_f32", "none", 1.0, base)
    write_run(tmp_path / "logs", "vidcom2_r0.25_f32", "vidcom2", 0.25, comp)
    out = collect(tmp_path / "logs", tmp_path / "res", "llava_ov", PAPER, expect_runs=2)
    summary = {r["method"]: r for r in _rows(out["summary"])}
    b, c = summary["none"], summary["vidcom2"]
    assert float(b["mvbench"]) == pytest.approx(75.0) and float(c["mvbench"]) == pytest.approx(50.0)  # 9/12, 6/12
    assert float(b["mlvu_dev"]) == pytest.approx(600 / 7, abs=1e-4) and float(c["mlvu_dev"]) == pytest.approx(
        300 / 7, abs=1e-4
    )
    # videomme docs 0..3 right: short = docs 0, 3 (2/2), medium = 1, 4 (1/2), long = 2, 5 (1/2)
    assert [float(c[f"videomme_{d}"]) for d in DURATIONS] == [100.0, 50.0, 50.0]
    ratios = [50 / 75, (2 / 6) / (3 / 6), 3 / 6, 4 / 6, 1.0, 0.5, 0.5]
    assert float(c["avg_rel_7col"]) == pytest.approx(100 * sum(ratios) / 7, abs=1e-3)
    assert float(b["avg_rel_7col"]) == pytest.approx(100.0)
    assert float(c["avg_4bench"]) == pytest.approx((50 + 100 / 3 + 300 / 7 + 200 / 3) / 4, abs=1e-3)
    assert float(c["paper_avg_rel_7col"]) == 99.6 and c["paper_source"] == "VidCom2 paper Table 2"
    assert float(c["avg_rel_7col_drift"]) == pytest.approx(float(c["avg_rel_7col"]) - 99.6, abs=1e-3)
    assert c["paper_model_match"] == "hub id" and c["commit"] == "abc1234" and float(c["launch_wall_s"]) == 100.0
    assert float(c["achieved_retention"]) == pytest.approx(0.25) and float(c["peak_reserved_gb"]) == 3.0
    bench = _rows(out["benchmarks"])
    assert len(bench) == 2 * 7  # model x method x retention x frames x benchmark (7 columns)
    mv = next(r for r in bench if r["method"] == "vidcom2" and r["benchmark"] == "mvbench")
    assert (float(mv["paper_score"]), float(mv["paper_drift"])) == (57.2, pytest.approx(50.0 - 57.2))
    assert float(mv["avg_rel_7col"]) == pytest.approx(float(c["avg_rel_7col"]), abs=1e-3)
    vs = [r for r in _rows(out["vs_paper"]) if r["method"] == "vidcom2" and r["column"] == "mvbench"]
    assert float(vs[0]["paper"]) == 57.2 and float(vs[0]["diff"]) == pytest.approx(50.0 - 57.2)


def test_failed_samples_are_wrong_in_every_benchmark(tmp_path):
    verdicts = oks({t: 6 for t in METRIC})  # every answer right, but some samples failed
    failed = {"mvbench_action_count": {5}, "longvideobench_val_v": {0, 1}, "mlvu_dev": {0}, "videomme": {2}}
    write_run(tmp_path / "logs", "none_f32", "none", 1.0, verdicts, failed=failed)
    out = collect(tmp_path / "logs", tmp_path / "res", "t")
    bench = {r["benchmark"]: r for r in _rows(out["benchmarks"])}
    # lmms-eval: MVBench drops the empty answer (100%), LVB's random letter was right (100%)
    assert float(bench["mvbench"]["lmms_eval_score"]) == 100.0 and float(bench["mvbench"]["score"]) == pytest.approx(
        100 * 11 / 12, abs=1e-4
    )
    assert float(bench["longvideobench_val_v"]["lmms_eval_score"]) == 100.0
    assert float(bench["longvideobench_val_v"]["score"]) == pytest.approx(100 * 4 / 6, abs=1e-4)
    assert float(bench["mlvu_dev"]["score"]) == pytest.approx(100 * 5 / 7, abs=1e-4)  # type 0 has its one sample failed
    assert float(bench["videomme"]["score"]) == pytest.approx(100 * 5 / 6, abs=1e-4)
    assert float(bench["videomme_long"]["score"]) == 50.0 and bench["videomme_long"]["failed_samples"] == "1"
    assert [bench[b]["failed_samples"] for b in ("mvbench", "longvideobench_val_v", "mlvu_dev")] == ["1", "2", "1"]


def test_paper_model_matching(tmp_path):
    assert paper_model("llava_onevision", OV) == ("LLaVA-OV-7B", "hub id")
    snapshot = "/data/hub/models--lmms-lab--LLaVA-Video-7B-Qwen2/snapshots/0123abc"
    assert paper_model("llava_vid", snapshot).name == "LLaVA-Video-7B"
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen3-VL-8B-Instruct"}))
    assert paper_model("qwen3_vl", str(named)).how == "config.json _name_or_path"
    sized = tmp_path / "ov_copy"
    sized.mkdir()
    (sized / "config.json").write_text(json.dumps({"hidden_size": 3584, "num_hidden_layers": 28}))
    assert paper_model("llava_onevision", str(sized)).name == "LLaVA-OV-7B"
    assert paper_model("llava_vid", str(sized)).name == "LLaVA-Video-7B"  # same LM, the id decides
    assert paper_model("qwen2_vl", str(sized)) == ("ov_copy", "")
    assert paper_model("llava_onevision", str(tmp_path), "LLaVA-OV-7B").how == "PAPER_MODEL override"


def test_a_local_checkpoint_without_a_match_fails_loudly(tmp_path):
    ckpt = tmp_path / "my_checkpoint"
    ckpt.mkdir()
    verdicts = oks({t: 3 for t in METRIC})
    write_run(tmp_path / "logs", "none_f32", "none", 1.0, verdicts, pretrained=str(ckpt))
    stale = tmp_path / "res" / "t_vs_paper.csv"
    stale.parent.mkdir()
    stale.write_text("old\n")
    with pytest.raises(CollectError, match="no run matches a row of .*PAPER_MODEL=LLaVA-OV-7B"):
        collect(tmp_path / "logs", tmp_path / "res", "t", PAPER)
    assert (tmp_path / "res" / "t_summary.csv").is_file() and not stale.exists()
    out = collect(tmp_path / "logs", tmp_path / "res", "t", PAPER, paper_model_override="LLaVA-OV-7B")
    vs = _rows(out["vs_paper"])
    assert {r["method"] for r in vs} == {"none"} and len(vs) == 9  # 7 columns + 2 averages


def test_variants_are_rows_of_their_own_and_runs_can_be_selected(tmp_path):
    verdicts = oks({t: 3 for t in METRIC})
    for name, options in (("vidcom2_r0.25_f32", {}), ("vidcom2_r0.25_frame_score-equal_f32", {"frame_score": "equal"})):
        write_run(tmp_path / "logs", name, "vidcom2", 0.25, verdicts, options=options)
    write_run(tmp_path / "logs", "none_f32", "none", 1.0, verdicts)
    out = collect(tmp_path / "logs", tmp_path / "res", "t", PAPER)
    summary = {r["variant"]: r for r in _rows(out["summary"]) if r["method"] == "vidcom2"}
    assert set(summary) == {"", "frame_score=equal"}
    assert float(summary[""]["paper_avg_rel_7col"]) == 99.6 and summary["frame_score=equal"]["paper_avg_rel_7col"] == ""
    assert float(summary["frame_score=equal"]["avg_rel_7col"]) == pytest.approx(100.0)
    out = collect(
        tmp_path / "logs", tmp_path / "res", "t", PAPER, runs=["none_f32", "vidcom2_r0.25_frame_score-equal_f32"]
    )
    summary = _rows(out["summary"])
    assert len(summary) == 2 and float(summary[1]["paper_avg_rel_7col"]) == 99.6  # the only VidCom2 0.25 run
    with pytest.raises(CollectError, match="no lmms-eval .*run --runs vidcom2_r0.15_f32 first"):
        collect(tmp_path / "logs", tmp_path / "res", "t", runs=["vidcom2_r0.15_f32"])


def test_collect_fails_loudly(tmp_path):
    with pytest.raises(CollectError, match="no lmms-eval"):
        collect(tmp_path, tmp_path / "res", "x")
    d = write_run(tmp_path / "logs", "none_f32", "none", 1.0, oks({t: 1 for t in METRIC}))
    with pytest.raises(CollectError, match="expected 3 runs"):
        collect(tmp_path / "logs", tmp_path / "res", "x", expect_runs=3)
    results = json.loads((d / f"{STAMP}_results.json").read_text())
    results["results"]["videomme"]["videomme_perception_score,none"] = 99.0
    (d / f"{STAMP}_results.json").write_text(json.dumps(results))
    with pytest.raises(CollectError, match="videomme recomputed with lmms-eval's rule gives 16.666667%"):
        collect(tmp_path / "logs", tmp_path / "res", "x")
    next((tmp_path / "logs").rglob("*_vidcom2_meter.json")).unlink()
    with pytest.raises(CollectError, match="no \\*_vidcom2_meter.json"):
        collect(tmp_path / "logs", tmp_path / "res", "x")


def test_efficiency_table_against_the_paper(tmp_path):
    mv = {"mvbench_action_count": [True, True, False, True], "mvbench_moving_count": [True, False, False, True]}
    for name, method, r, wall in (("none_f32", "none", 1.0, 200.0), ("vidcom2_r0.25_f32", "vidcom2", 0.25, 150.0)):
        write_run(tmp_path / "logs", name, method, r, mv, wall=wall)
    path = collect_efficiency(
        tmp_path / "logs",
        tmp_path / "res",
        "llava_ov",
        PAPER_DIR / "paper_efficiency.csv",
        bench_csv=bench_csv(tmp_path / "bench.csv"),
        bench_model="llava_ov_7b",
    )
    rows = {(r["source"], r["method"]): r for r in _rows(path)}
    assert set(rows) == {(s, m) for s in ("lmms-eval mvbench", "vidcom2 bench") for m in ("none", "vidcom2")}
    ours = rows[("lmms-eval mvbench", "vidcom2")]
    assert float(ours["llm_s"]) == pytest.approx(4.0 * 0.25 + 3.0)  # prefill + decode sums
    assert float(ours["model_s"]) == pytest.approx(0.5 + 2.0 + 0.1 + 1.0 + 3.0)
    assert float(ours["total_s"]) == 150.0 and float(ours["total_vs_vanilla"]) == pytest.approx(0.75)
    assert float(ours["llm_vs_vanilla"]) == pytest.approx(4.0 / 7.0, abs=1e-4)
    assert float(ours["samples_per_s_per_process"]) == pytest.approx(8 / 150 / 4, abs=1e-4)
    assert float(ours["mvbench"]) == pytest.approx(62.5)
    assert float(ours["paper_llm_s"]) == 180.7 and float(ours["paper_llm_vs_vanilla"]) == pytest.approx(
        180.7 / 618, abs=1e-4
    )
    bench = rows[("vidcom2 bench", "vidcom2")]
    assert float(bench["llm_s"]) == pytest.approx(0.38) and float(bench["total_vs_vanilla"]) == pytest.approx(
        494 / 663, abs=1e-4
    )
    assert float(bench["paper_total_vs_vanilla"]) == pytest.approx(1126 / 1563, abs=1e-4)
    with pytest.raises(CollectError, match="written without paper columns.*PAPER_MODEL=LLaVA-OV-7B"):
        collect_efficiency(
            tmp_path / "logs", tmp_path / "res", "x", PAPER_DIR / "paper_efficiency.csv", paper_model_override="Other"
        )
