"""The paper-table scripts, unchanged, on CPU: every table's plan (DRY_RUN), the registry check, and real
runs of lmms-eval's own videomme, mlvu_dev, longvideobench_val_v and mvbench tasks on miniature local
copies (vidcom2_lmms_eval.mini_benchmarks) in one and two processes, with and without broken videos.

Only the environment overrides differ from a GPU node: the launcher (one process, or torchrun), a tiny
checkpoint or the fake model, HF_HOME holding the miniature benchmarks, CPU model args appended after
the script's own.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from vidcom2_lmms_eval.mini_benchmarks import MLVU_TASK_TYPES, write_mini_benchmarks
from vidcom2_lmms_eval.plan_check import check_runs
from vidcom2_lmms_eval.synthetic_task import build_task

from llava.model.tiny import write_tiny_llava
from llava.synthetic_videos import make_videos

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FAKE_RUNNER = ROOT / "tests" / "lmms_helpers" / "run_lmms_eval_fake.py"  # the fake model always answers "A"
sys.path.insert(0, str(ROOT / "tests" / "lmms_helpers"))
from fake_runs import bench_csv, write_run  # noqa: E402

CPU_ARGS = "attn_implementation=sdpa,device=cpu,dtype=float32"  # later keys win in lmms-eval's model_args


def _rows(method: str, retentions: tuple[str, ...], frames: str = "32") -> list[str]:
    return [f"{method}_r{r}_f{frames}" for r in retentions]


PLANS = {
    "eval_llava_ov.sh": ["none_f32"]
    + _rows("vidcom2", ("0.25", "0.15"))
    + _rows("random", ("0.25",))
    + [r for m in ("fastv", "pdrop", "sparsevlm") for r in _rows(m, ("0.25", "0.15"))]
    + _rows("dycoke", ("0.25", "0.30")),
    "eval_llava_vid.sh": ["none_f64"]
    + [r for m in ("vidcom2", "fastv", "sparsevlm") for r in _rows(m, ("0.25", "0.15"), "64")]
    + _rows("dycoke", ("0.25", "0.30"), "64"),
    "eval_qwen3_vl.sh": [
        run
        for f in ("32", "64")
        for run in [f"none_f{f}"]
        + [r for m in ("vidcom2", "visionzip", "fastvid", "holitom") for r in _rows(m, ("0.25", "0.35"), f)]
    ],
    "eval_qwen2_vl.sh": ["none_f32"]
    + [r for m in ("vidcom2", "visionzip", "fastvid", "holitom") for r in _rows(m, ("0.25", "0.15"))],
    "eval_ablations.sh": ["none_f32"]
    + [
        f"vidcom2_r{r}{v}_f32"
        for r in ("0.25", "0.15")
        for v in (
            "",
            "_frame_score-equal",
            "_token_score-f",
            "_token_score-v",
            "_similarity-cosine",
            "_temperature-0.001",
            "_temperature-0.1",
            "_temperature-1.0",
        )
    ],
    "eval_efficiency.sh": ["none_f32"]
    + [r for m in ("vidcom2", "random", "fastv", "pdrop", "sparsevlm", "dycoke") for r in _rows(m, ("0.25", "0.15"))],
}
PLANS["eval_qwen2_5_vl.sh"] = PLANS["eval_qwen2_vl.sh"]


def _env(**overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **overrides,
    }
    # only the overrides a test sets reach the script; the datasets-cache variables would send lmms-eval
    # away from the miniature benchmarks in $HF_HOME/datasets
    cache_dirs = ("HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE")
    table = ("COMPRESSOR", "R_RATIO", "PAPER_MODEL", "METHODS", "RETENTIONS", "FRAMES", "TASKS", "DRY_RUN")
    table += ("GEN_KWARGS", "EXTRA_MODEL_ARGS", "INCLUDE_PATH", "SKIP_BASELINE", "BENCH", "GPUS", "MODEL", "LAUNCHER")
    table += ("OUTPUT_DIR", "RESULTS_DIR")
    for key in (*cache_dirs, *table):
        if key not in overrides:
            env.pop(key, None)
    return env


def _run(script: str, cwd: Path, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / script)], env=_env(**overrides), cwd=cwd, capture_output=True, text=True
    )


def _planned(stdout: str) -> list[tuple[str, str]]:
    return re.findall(r"^eval: \[(\S+)\] (.*)$", stdout, re.M)


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("script", sorted(PLANS))
def test_dry_run_plans_every_row_of_the_table(script, tmp_path):
    proc = _run(script, tmp_path, DRY_RUN="1", GPUS="2")
    assert proc.returncode == 0, proc.stderr
    planned = _planned(proc.stdout)
    assert [name for name, _ in planned if name != "bench"] == PLANS[script]
    for name, command in planned:
        if name == "bench":
            assert "--models llava_ov_7b" in command and "--retentions 1.0,0.25,0.15" in command
            continue
        model_args = command.split("--model_args ")[1].split(" ")[0]
        method, _, rest = name.partition("_r")
        frames = name.rsplit("_f", 1)[1]
        assert f"_frames_num={frames}," in model_args or f"max_num_frames={frames}," in model_args
        assert command.startswith("accelerate launch --num_processes=2 -m lmms_eval")
        if method.startswith("none"):
            assert "compressor=" not in model_args
        else:
            assert f",compressor={method},retention={rest.split('_')[0]}" in model_args
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_methods_retentions_and_frames_select_a_subset(tmp_path):
    proc = _run("eval_llava_ov.sh", tmp_path, DRY_RUN="1", METHODS="none,fastv", RETENTIONS="0.15")
    assert [n for n, _ in _planned(proc.stdout)] == ["none_f32", "fastv_r0.15_f32"]
    proc = _run("eval_qwen3_vl.sh", tmp_path, DRY_RUN="1", FRAMES="64", METHODS="holitom", RETENTIONS="0.35")
    assert [n for n, _ in _planned(proc.stdout)] == ["holitom_r0.35_f64"]
    proc = _run("eval_llava_ov.sh", tmp_path, DRY_RUN="1", RETENTIONS="0.30")
    assert [n for n, _ in _planned(proc.stdout)] == ["none_f32", "dycoke_r0.30_f32"]
    for bad in ({"METHODS": "uniform"}, {"RETENTIONS": "0.5"}):
        proc = _run("eval_llava_ov.sh", tmp_path, DRY_RUN="1", **bad)
        assert proc.returncode == 2 and "which is not in the llava_ov table" in proc.stderr


def test_a_run_the_registry_cannot_serve_fails_before_anything_is_launched(tmp_path):
    common = {"LAUNCHER": "false", "OUTPUT_DIR": str(tmp_path / "logs"), "RESULTS_DIR": str(tmp_path / "res")}
    proc = _run("eval_llava_ov.sh", tmp_path, METHODS="none,vidcom2", EXTRA_MODEL_ARGS="nosuch.knob=1", **common)
    assert proc.returncode == 2 and "planned run none_f32: unknown model_args ['nosuch.knob']" in proc.stderr
    assert "planned run vidcom2_r0.15_f32" in proc.stderr  # every problem listed at once
    assert "nothing was launched" in proc.stderr and not (tmp_path / "logs").exists()


def test_plan_check_names_a_method_the_registry_lacks():
    """What a table row of an in-LLM baseline meets before that method is registered."""
    runs = [("nosuchmethod_r0.25_f32", "pretrained=x,compressor=nosuchmethod,retention=0.25,max_frames_num=32")]
    runs.append(("vidcom2_r0.25_f32", "pretrained=x,compressor=vidcom2,retention=0.25,temperature=0.1"))
    problems = check_runs("llava_onevision", runs)
    assert len(problems) == 1 and problems[0].startswith("planned run nosuchmethod_r0.25_f32: unknown compressor")
    assert "vidcom2" in problems[0]  # the valid names are listed


def test_efficiency_script_collects_its_runs_and_the_bench(tmp_path):
    """Finished MVBench runs and a bench CSV in place: the script skips them and writes the efficiency table."""
    logs = tmp_path / "logs"
    mvbench = {"mvbench_action_count": [True, False], "mvbench_moving_count": [True, True]}
    write_run(logs, "none_f32", "none", 1.0, mvbench, wall=200.0)
    write_run(logs, "vidcom2_r0.25_f32", "vidcom2", 0.25, mvbench, wall=150.0)
    write_run(logs, "not_in_the_table", "uniform", 0.25, mvbench)  # not read: the collector takes the table's runs
    bench_csv(logs / "bench.csv")
    env = {"OUTPUT_DIR": str(logs), "RESULTS_DIR": str(tmp_path / "results"), "LAUNCHER": "false"}
    proc = _run("eval_efficiency.sh", tmp_path, METHODS="none,vidcom2", RETENTIONS="0.25", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("already has results") == 2 and "bench.csv exists - bench skipped" in proc.stdout
    rows = _csv(tmp_path / "results" / "llava_ov_efficiency.csv")
    assert [(r["source"], r["method"]) for r in rows] == [
        ("lmms-eval mvbench", "none"),
        ("lmms-eval mvbench", "vidcom2"),
        ("vidcom2 bench", "none"),
        ("vidcom2 bench", "vidcom2"),
    ]
    assert float(rows[1]["total_vs_vanilla"]) == 0.75 and float(rows[1]["paper_total_s"]) == 1126.0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval_scripts")
    make_videos(root / "videos", seed=3)
    return {
        "root": root,
        "model": write_tiny_llava(root / "tiny_ov", arch="llava_ov", seed=2),
        "clean": write_mini_benchmarks(root / "hf_clean", root / "videos"),
        "broken": write_mini_benchmarks(root / "hf_broken", root / "videos", broken=True),
        "synth": build_task(root / "synth_task", root / "videos", broken=True),
    }


def _out(tmp_path: Path) -> dict[str, str]:
    return {"OUTPUT_DIR": str(tmp_path / "logs"), "RESULTS_DIR": str(tmp_path / "results")}


def test_real_tasks_tiny_checkpoint_one_process(data, tmp_path):
    """Baseline and VidCom2 R = 0.25 on the four benchmarks' own task code (two MVBench subtasks, for time)."""
    tasks = "videomme,mlvu_dev,longvideobench_val_v,mvbench_action_count,mvbench_moving_count"
    env = {
        **_out(tmp_path),
        "LAUNCHER": f"{sys.executable} -m",
        "MODEL": str(data["model"]),
        "HF_HOME": str(data["clean"].hf_home),
        "TASKS": tasks,
        "METHODS": "none vidcom2",
        "RETENTIONS": "0.25",
        "EXTRA_MODEL_ARGS": CPU_ARGS,
        "GEN_KWARGS": "max_new_tokens=3",  # over the tasks' 16-32: the random model never stops early
        "PAPER_MODEL": "LLaVA-OV-7B",
    }
    proc = _run("eval_llava_ov.sh", tmp_path, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--gen_kwargs max_new_tokens=3" in proc.stdout
    results = tmp_path / "results"
    summary = {r["method"]: r for r in _csv(results / "llava_ov_summary.csv")}
    assert set(summary) == {"none", "vidcom2"}
    answers = data["clean"].answers
    n = sum(len(answers[t]) for t in tasks.split(","))
    for row in summary.values():
        assert (int(row["samples"]), int(row["failed_samples"]), row["frames"]) == (n, 0, "32")
        assert row["paper_model_match"] == "PAPER_MODEL override" and row["avg_4bench"] != ""
    assert float(summary["none"]["achieved_retention"]) == 1.0
    assert 0.2 <= float(summary["vidcom2"]["achieved_retention"]) <= 0.4
    bench = _csv(results / "llava_ov_benchmarks.csv")
    assert len(bench) == 2 * 7
    assert all(r["score"] == r["lmms_eval_score"] and r["paper_score"] for r in bench)  # no failure: same score
    vs = _csv(results / "llava_ov_vs_paper.csv")
    assert {(r["method"], float(r["retention"])) for r in vs} == {("none", 1.0), ("vidcom2", 0.25)} and len(vs) == 18
    launch = json.loads(next((tmp_path / "logs" / "vidcom2_r0.25_f32").rglob("vidcom2_launch.json")).read_text())
    assert launch["wall_seconds"] > 0
    # a second call finds both runs finished and only re-collects; without PAPER_MODEL the local
    # checkpoint matches no paper model, which is an error, not an empty comparison
    env.pop("PAPER_MODEL")
    again = _run("eval_llava_ov.sh", tmp_path, **env)
    assert again.stdout.count("already has results") == 2
    assert again.returncode == 1 and "no run matches a row of" in again.stderr and "PAPER_MODEL=" in again.stderr
    assert not (results / "llava_ov_vs_paper.csv").exists()


def _expected(answers: list[str], missing: list[int]) -> list[bool]:
    """The fake model's verdicts: it answers "A"; a sample without its video is wrong."""
    return [a == "A" and i not in missing for i, a in enumerate(answers)]


def test_four_benchmarks_two_processes_failed_samples_count_wrong(data, tmp_path):
    mini = data["broken"]
    env = {
        **_out(tmp_path),
        "LAUNCHER": f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 {FAKE_RUNNER}",
        "MODEL": "fake",
        "HF_HOME": str(mini.hf_home),
        "TASKS": "videomme,mlvu_dev,longvideobench_val_v,mvbench,vidcom2_synth_mc",
        "INCLUDE_PATH": str(data["synth"]),  # its last two docs: a missing and a corrupt video
        "METHODS": "none",
        "EXTRA_MODEL_ARGS": f"{CPU_ARGS},on_video_error=record",
        "PAPER_MODEL": "LLaVA-OV-7B",
    }
    proc = _run("eval_llava_ov.sh", tmp_path, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = {r["benchmark"]: r for r in _csv(tmp_path / "results" / "llava_ov_benchmarks.csv")}
    verdicts = {t: _expected(mini.answers[t], mini.missing[t]) for t in mini.answers}
    mvbench = [v for t, vs in verdicts.items() if t.startswith("mvbench_") for v in vs]
    mlvu = dict(zip(MLVU_TASK_TYPES, verdicts["mlvu_dev"], strict=True))  # one doc per type
    expected = {
        "videomme": 100 * sum(verdicts["videomme"]) / 4,
        "mlvu_dev": 100 * sum(mlvu.values()) / 7,
        "longvideobench_val_v": 100 * sum(verdicts["longvideobench_val_v"]) / 4,
        "mvbench": 100 * sum(mvbench) / len(mvbench),
    }
    for name, score in expected.items():
        assert float(bench[name]["score"]) == pytest.approx(score, abs=1e-4), name
        assert bench[name]["failed_samples"] == "1", name

    # lmms-eval's MVBench aggregation drops failed samples (empty answers) from each subtask's denominator:
    # mvbench_action_count (one right, one missing) reports 100%
    def task_rule(answers: list[str], missing: list[int]) -> float:
        answered = [a for i, a in enumerate(answers) if i not in missing]
        return 100.0 * sum(a == "A" for a in answered) / len(answered)

    subtasks = [t for t in mini.answers if t.startswith("mvbench_")]
    reported = sum(task_rule(mini.answers[t], mini.missing[t]) * len(mini.answers[t]) for t in subtasks)
    assert float(bench["mvbench"]["lmms_eval_score"]) == pytest.approx(reported / len(mvbench), abs=1e-4)
    assert float(bench["mvbench"]["lmms_eval_score"]) > float(bench["mvbench"]["score"])
    synth_docs = [json.loads(line) for line in (data["synth"] / "docs.jsonl").read_text().splitlines()]
    synth_right = sum(d["answer"] == "A" for d in synth_docs[:-2])
    assert float(bench["vidcom2_synth_mc"]["score"]) == pytest.approx(100 * synth_right / len(synth_docs), abs=1e-4)
    assert bench["vidcom2_synth_mc"]["failed_samples"] == "2"
    summary = _csv(tmp_path / "results" / "llava_ov_summary.csv")[0]
    n = sum(len(a) for a in mini.answers.values()) + len(synth_docs)
    assert (summary["world_size"], int(summary["samples"]), int(summary["failed_samples"])) == ("2", n, 6)
    meter = json.loads(Path(summary["meter_file"]).read_text())
    per_rank = meter["overall"]["samples_per_rank"]
    assert sum(per_rank.values()) == n and set(per_rank) == {"0", "1"}


def test_missing_video_without_record_fails_naming_task_doc_and_path(data, tmp_path):
    """lmms-eval's videomme calls sys.exit on a missing file; the run must fail with a useful message."""
    env = {
        **_out(tmp_path),
        "LAUNCHER": f"{sys.executable} {FAKE_RUNNER}",
        "MODEL": "fake",
        "HF_HOME": str(data["broken"].hf_home),
        "TASKS": "videomme",
        "METHODS": "none",
        "EXTRA_MODEL_ARGS": CPU_ARGS,
    }
    proc = _run("eval_llava_ov.sh", tmp_path, **env)
    assert proc.returncode == 1
    assert "videomme doc_id=1: the task's doc_to_visual exited (sys.exit)" in proc.stdout
    assert f"{data['broken'].hf_home}/videomme/data/mini001.mp4 does not exist" in proc.stdout
    assert "on_video_error=record counts it as a failed sample" in proc.stdout
    assert "FAILED - lmms-eval wrote no results for none_f32" in proc.stderr


LAUNCHING = ("eval_common.sh", "bench_stream.sh", "bench_efficiency.sh", "run_default.sh")


def test_every_launching_script_turns_nvlink_multicast_off():
    """Each script that starts model processes sources no_multicast.sh (the table scripts through
    eval_common.sh), and no_multicast.sh forces the three variables of llava.placement.NO_MULTICAST."""
    from llava.placement import NO_MULTICAST

    body = (SCRIPTS / "no_multicast.sh").read_text()
    for key, value in NO_MULTICAST.items():
        assert f"{key}={value}" in body and "export" in body
    for name in LAUNCHING:
        assert re.search(r"^source .*no_multicast\.sh\"?$", (SCRIPTS / name).read_text(), re.M), name
    for table in sorted(PLANS):
        assert re.search(r"^source .*eval_common\.sh\"?$", (SCRIPTS / table).read_text(), re.M), table
    others = {p.name for p in SCRIPTS.glob("*.sh")} - set(LAUNCHING) - set(PLANS) - {"no_multicast.sh"}
    assert others == {"bootstrap.sh", "run_tests.sh"}  # a new launcher must be added above


def test_launched_processes_see_multicast_off_even_if_the_caller_turned_it_on(tmp_path):
    """The table script's launcher inherits NCCL_NVLS_ENABLE=0 etc. whatever the caller exported."""
    dump = tmp_path / "env.json"
    launcher = tmp_path / "launcher.py"
    launcher.write_text(f"import json, os, sys\njson.dump(dict(os.environ), open({str(dump)!r}, 'w'))\nsys.exit(3)\n")
    env = {**_out(tmp_path), "LAUNCHER": f"{sys.executable} {launcher}", "METHODS": "none", "MODEL": "x",
           "NCCL_NVLS_ENABLE": "1", "NVSHMEM_DISABLE_NVLS": "0"}  # fmt: skip
    proc = _run("eval_llava_ov.sh", tmp_path, **env)
    assert proc.returncode == 1 and "lmms-eval exited with an error for none_f32" in proc.stderr
    seen = json.loads(dump.read_text())
    assert (seen["NCCL_NVLS_ENABLE"], seen["TORCH_SYMM_MEM_DISABLE_MULTICAST"], seen["NVSHMEM_DISABLE_NVLS"]) == (
        "0", "1", "1",
    )


def test_keep_multicast_off_sets_the_variables_and_refuses_a_conflict():
    from llava.placement import keep_multicast_off

    env: dict[str, str] = {}
    keep_multicast_off(env)
    assert env == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    with pytest.raises(ValueError, match="NCCL_NVLS_ENABLE=1 turns NVLink multicast on; it must be 0"):
        keep_multicast_off({"NCCL_NVLS_ENABLE": "1"})


def test_table_script_two_cpu_processes_tiny_checkpoint_synthetic_task(data, tmp_path):
    """``eval_llava_ov.sh`` unchanged with two CPU processes (torchrun, gloo) of a real tiny checkpoint on the
    synthetic task, uncompressed and VidCom2 R = 0.25, collector included: every doc answered exactly once
    across the ranks, the collected sample count equals the task size, and one meter covers both ranks."""
    task = build_task(tmp_path / "synth", data["root"] / "videos")
    docs = [json.loads(line)["doc_id"] for line in (task / "docs.jsonl").read_text().splitlines()]
    env = {
        **_out(tmp_path),
        "LAUNCHER": f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 -m",
        "MODEL": str(data["model"]),
        "TASKS": "vidcom2_synth_mc",
        "INCLUDE_PATH": str(task),
        "METHODS": "none vidcom2",
        "RETENTIONS": "0.25",
        "EXTRA_MODEL_ARGS": CPU_ARGS,
        "GEN_KWARGS": "max_new_tokens=2",
        "PAPER_MODEL": "LLaVA-OV-7B",
    }
    proc = _run("eval_llava_ov.sh", tmp_path, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = {r["method"]: r for r in _csv(tmp_path / "results" / "llava_ov_summary.csv")}
    assert set(summary) == {"none", "vidcom2"}
    for method, row in summary.items():
        assert (row["world_size"], int(row["samples"]), int(row["failed_samples"])) == ("2", len(docs), 0), method
        run_dir = Path(row["results_file"]).parent
        answered = [json.loads(line)["doc_id"] for line in next(run_dir.glob("*_samples_vidcom2_synth_mc.jsonl"))
                    .read_text().splitlines()]  # fmt: skip
        assert sorted(answered) == docs, method  # each doc once: no rank padding counted, none lost
        meter = json.loads(Path(row["meter_file"]).read_text())["overall"]
        assert meter["samples"] == len(docs) and set(meter["samples_per_rank"]) == {"0", "1"}
        assert sum(meter["samples_per_rank"].values()) == len(docs)
        records = Path(row["meter_file"]).with_name(Path(row["meter_file"]).stem + "_samples.jsonl")
        metered = [(r["doc_id"], r["rank"]) for r in map(json.loads, records.read_text().splitlines())]
        assert sorted(d for d, _ in metered) == docs and {r for _, r in metered} == {0, 1}
    assert 0.2 <= float(summary["vidcom2"]["achieved_retention"]) <= 0.35
    bench = {(r["method"], r["benchmark"]) for r in _csv(tmp_path / "results" / "llava_ov_benchmarks.csv")}
    assert {("none", "vidcom2_synth_mc"), ("vidcom2", "vidcom2_synth_mc")} <= bench


def test_eval_scaling_cpu_smoke_writes_one_row_per_finished_run(data, tmp_path):
    """scripts/eval_scaling.py with one and two CPU processes: a row per run that ran, with the meter's sample
    count (the task size), per-rank loads that add up, and the command; CPU rows never go into *_h200.csv."""
    task = build_task(tmp_path / "synth", data["root"] / "videos")
    n = len((task / "docs.jsonl").read_text().splitlines())
    out = tmp_path / "scaling_cpu.csv"
    args = [sys.executable, str(SCRIPTS / "eval_scaling.py"), "--cpu", "--gpus", "1,2", "--compressors", "vidcom2",
            "--model-args", f"pretrained={data['model']},{CPU_ARGS},max_frames_num=8", "--tasks", "vidcom2_synth_mc",
            "--include-path", str(task), "--gen-kwargs", "max_new_tokens=2", "--work-dir", str(tmp_path / "w")]
    proc = subprocess.run([*args, "--out", str(out)], env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _csv(out)
    assert [(r["gpus"], r["compressor"], r["retention"], r["device"]) for r in rows] == [
        ("1", "vidcom2", "0.25", "cpu"), ("2", "vidcom2", "0.25", "cpu"),
    ]  # fmt: skip
    for row in rows:
        per_rank = [int(x) for x in row["rank_samples"].split("/")]
        assert int(row["samples"]) == n == sum(per_rank) and len(per_rank) == int(row["gpus"])
        assert float(row["samples_per_s"]) > 0 and 0 < float(row["balance"]) <= 1
        assert f"--nproc_per_node {row['gpus']} -m lmms_eval" in row["command"] and row["commit"] != "unknown"
    refused = subprocess.run([*args, "--out", str(tmp_path / "eval_scaling_h200.csv")], env=_env(), cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "is named for H200 rows; these run on cpu" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "eval_scaling_h200.csv").exists()
