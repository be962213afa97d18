"""The embedded default main job: tiny checkpoint + synthetic videos -> real lmms-eval CLI -> CSVs.

Why: a fresh machine (no weights, no datasets, no GPU) must still run the whole evaluation path and
end in the same CSVs as the paper-table scripts. Every step is a real command (``vidcom2 make-tiny``,
``vidcom2 make-videos``, ``python -m lmms_eval`` or ``torchrun ... -m lmms_eval``), and every run is
checked for its results file because lmms-eval exits 0 when an evaluation fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from vidcom2_lmms_eval.collect import CollectError, collect, find_runs
from vidcom2_lmms_eval.synthetic_task import TASK, build_task

ARCH_TO_MODEL_ID = {
    "llava_ov": "llava_onevision",
    "llava_vid": "llava_vid",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
}


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run a command, teeing its output to ``log``; a non-zero exit raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\nlog {log}:\n{tail}")


def lmms_eval_command(
    model_id: str, model_args: str, task_dir: Path, out: Path, nproc: int, launcher: list[str] | None = None
) -> list[str]:
    """The lmms-eval CLI call (torchrun fans out on CPU; accelerate --cpu does not, see spec)."""
    if launcher is None:
        launcher = (
            [sys.executable, "-m"]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m"]
        )
    return [
        *launcher,
        "lmms_eval",
        "--model",
        model_id,
        "--model_args",
        model_args,
        "--tasks",
        TASK,
        "--include_path",
        str(task_dir),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out),
    ]


def check_run(out: Path, log: Path) -> None:
    """lmms-eval exits 0 on evaluation errors: a run counts only if its results file exists."""
    if not find_runs(out):
        tail = "\n".join(log.read_text().splitlines()[-25:]) if log.is_file() else "(no log)"
        raise CollectError(f"lmms-eval wrote no *_results.json under {out}; it exits 0 on errors. Log {log}:\n{tail}")


def run_default(
    work_dir: str | Path,
    *,
    arch: str = "llava_ov",
    retentions: tuple[float, ...] = (1.0, 0.25),
    nproc: int = 1,
    frames: int = 8,
    results_dir: str | Path | None = None,
    extra_model_args: str = "",
    fresh: bool = False,
) -> dict[str, Path]:
    """Run the synthetic task uncompressed and compressed; write CSVs into ``results_dir``
    (default ``<work_dir>/results``). Returns the written CSV paths."""
    work = Path(work_dir).resolve()
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf_home")}
    env.pop("COMPRESSOR", None)  # the job sets compression through model_args only
    env.pop("R_RATIO", None)
    vidcom2 = [sys.executable, "-m", "llava.cli"]
    model_dir, videos = work / f"tiny_{arch}", work / "videos"
    if not (model_dir / "config.json").is_file():
        _run([*vidcom2, "make-tiny", "--arch", arch, "--out", str(model_dir)], work / "logs" / "make_tiny.log", env)
    if not (videos / "manifest.json").is_file():
        _run([*vidcom2, "make-videos", "--out", str(videos)], work / "logs" / "make_videos.log", env)
    task_dir = build_task(work / "task", videos)
    model_id = ARCH_TO_MODEL_ID[arch]
    frames_key = "max_frames_num" if arch.startswith("llava") else "max_num_frames"
    runs_root = work / "runs"
    for r in retentions:
        name = "none" if r >= 1.0 else f"vidcom2_r{r:g}"
        out = runs_root / name
        if find_runs(out):
            continue  # finished earlier; delete the folder (or pass fresh) to redo it
        args = f"pretrained={model_dir},device=cpu,dtype=float32,{frames_key}={frames}"
        if r < 1.0:
            args += f",compressor=vidcom2,retention={r:g}"
        args += f",resume_dir={work / 'resume' / name}"
        if extra_model_args:
            args += f",{extra_model_args}"
        log = work / "logs" / f"lmms_eval_{name}.log"
        _run(lmms_eval_command(model_id, args, task_dir, out, nproc), log, env)
        check_run(out, log)
    target = Path(results_dir) if results_dir is not None else work / "results"
    return collect(runs_root, target, "synthetic", expect_runs=len(retentions))
