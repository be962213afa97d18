"""End-to-end through the real lmms-eval CLI: the default job (1 and 2 processes) and failure paths."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vidcom2_lmms_eval.collect import CollectError
from vidcom2_lmms_eval.default_job import check_run, lmms_eval_command, run_default
from vidcom2_lmms_eval.synthetic_task import build_task

ROOT = Path(__file__).resolve().parents[1]
FAKE_RUNNER = ROOT / "tests" / "lmms_helpers" / "run_lmms_eval_fake.py"
N_DOCS = 15  # plumbing task: 5 synthetic videos x 3 questions
N_EVENT = 6  # event videos in the default-job tests

pytestmark = pytest.mark.slow


def _summary(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in csv.DictReader(path.open())}


def test_default_job_single_process(tmp_path):
    """The README's command, shortened: two methods (DyCoke cannot run at R = 0.25 on 8 frames: a row says so)."""
    env = {**os.environ, "WORK_DIR": str(tmp_path / "w"), "PYTHON": sys.executable, "METHODS": "vidcom2,dycoke",
           "RETENTIONS": "0.25", "VIDEOS": str(N_EVENT)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "run_default.sh")], check=True, env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    rows = _summary(tmp_path / "w" / "results" / "synthetic_summary.csv")
    assert set(rows) == {"none", "vidcom2"}
    for r in rows.values():
        assert int(r["samples"]) == N_EVENT and int(r["failed_samples"]) == 0 and r["lmms_eval_version"] == "0.7.3"
        assert 0.0 <= float(r["vidcom2_synth_event"]) <= 100.0
    assert float(rows["none"]["achieved_retention"]) == 1.0
    assert 0.2 <= float(rows["vidcom2"]["achieved_retention"]) <= 0.35
    assert float(rows["vidcom2"]["prefill_s_sum"]) > 0 and float(rows["vidcom2"]["compress_s_sum"]) > 0
    table = list(csv.DictReader((tmp_path / "w" / "results" / "event_table.csv").open()))
    assert [(r["method"], r["retention"]) for r in table] == [("none", "1.0"), ("vidcom2", "0.25"), ("dycoke", "0.25")]
    assert float(table[0]["event_tokens_kept"]) == 100.0 and 0 <= float(table[1]["event_tokens_kept"]) <= 100
    assert table[2]["accuracy"] == "" and "cannot run: dycoke" in table[2]["note"]
    assert float(table[1]["accuracy"]) == float(rows["vidcom2"]["vidcom2_synth_event"])
    assert "event kept %" in proc.stdout and (tmp_path / "w" / "kept_tokens.png").stat().st_size > 0


def test_default_job_two_processes_merge_every_sample_once(tmp_path):
    written = run_default(tmp_path / "w", model=ROOT / "checkpoints" / "tiny_event_llava_ov", methods=[], nproc=2,
                          videos=N_EVENT, log=lambda line: None)
    row = _summary(written["summary"])["none"]
    assert int(row["samples"]) == N_EVENT and row["world_size"] == "2"
    meter = json.loads(Path(row["meter_file"]).read_text())
    assert meter["overall"]["samples_per_rank"] == {"0": 3, "1": 3}
    samples = next(Path(row["results_file"]).parent.glob("*_samples_vidcom2_synth_event.jsonl")).read_text()
    assert sorted(json.loads(s)["doc_id"] for s in samples.splitlines()) == list(range(N_EVENT))
    metered = [
        json.loads(s)["doc_id"] for s in next(Path(row["meter_file"]).parent.glob("*_meter_samples.jsonl")).open()
    ]
    assert sorted(metered) == list(range(N_EVENT))


def _fake_run(tmp_path, extra_args: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    from llava.synthetic_videos import make_videos

    make_videos(tmp_path / "videos")
    task = build_task(tmp_path / "task", tmp_path / "videos", broken=True)
    out, log = tmp_path / "out", tmp_path / "log.txt"
    cmd = lmms_eval_command(
        "llava_onevision",
        f"pretrained=fake,max_frames_num=4{extra_args}",
        task,
        out,
        1,
        launcher=[sys.executable, str(FAKE_RUNNER)],
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log.write_text(proc.stdout + proc.stderr)
    return out, log, proc


def test_video_error_makes_lmms_eval_exit_0_and_check_run_catches_it(tmp_path):
    out, log, proc = _fake_run(tmp_path, "")
    assert "does_not_exist.mp4" in log.read_text() and "doc_id=15" in log.read_text()
    with pytest.raises(CollectError, match="wrote no \\*_results.json"):
        check_run(out, log)  # whatever lmms-eval's exit status was (0 in 0.7.3)


def test_video_error_recorded_and_counted(tmp_path):
    out, log, proc = _fake_run(tmp_path, ",on_video_error=record")
    check_run(out, log)
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    assert results["n-samples"]["vidcom2_synth_mc"]["effective"] == N_DOCS + 2
    meter = json.loads(next(out.rglob("*_vidcom2_meter.json")).read_text())
    assert (meter["overall"]["samples"], meter["overall"]["failed"]) == (N_DOCS + 2, 2)
