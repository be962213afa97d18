"""The default job: a trained tiny checkpoint on the brief-event task, every method, one table, one picture.

Why: a newcomer's first command should show the methods working. The tiny LLaVA-OV checkpoint trained
on the event task (llava.train_tiny) answers far above chance uncompressed; each registry method then
runs at each retention through the real lmms-eval CLI (``python -m lmms_eval``, or torchrun for several
processes), and the table beside its accuracy gives the share of the event's tokens the method kept,
replayed in-process on the same frames from the videos' ground truth (llava.kept_tokens). The checkpoint
answers from the event's own token (llava.train_tiny.event_oracle: at chance without it), so a method
that keeps the event keeps the accuracy and one that drops it falls to chance: the two columns agree.
A method the model cannot run at a retention gets a row saying why.

Every run is checked for its results file because lmms-eval exits 0 when an evaluation fails.
Outputs under ``<work_dir>``: ``results/`` (the collected CSVs and ``event_table.csv``), ``kept_tokens.png``,
``runs/``, ``logs/``.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidcom2_lmms_eval.collect import CollectError, collect, find_runs
from vidcom2_lmms_eval.synthetic_task import EVENT_TASK, TASK, build_event_task

ARCH_TO_MODEL_ID = {
    "llava_onevision": "llava_onevision",
    "llava_video": "llava_vid",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
}
DEFAULT_RETENTIONS = (0.25, 0.10)
RETENTION_MEASURES = {False: "LM input", True: "layer average"}  # what a row's achieved retention counts
HEAD_SEED = 3  # the random SigLIP pooling head FastVID reads on LLaVA (LLaVA checkpoints hold none)


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run a command, teeing its output to ``log``; a non-zero exit raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\nlog {log}:\n{tail}")


def lmms_eval_command(
    model_id: str,
    model_args: str,
    task_dir: Path,
    out: Path,
    nproc: int,
    launcher: list[str] | None = None,
    task: str = TASK,
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
        task,
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


@dataclass
class Case:
    """One row of the table: a method at a retention, its run folder and, if it cannot run, why."""

    method: str
    retention: float
    error: str = ""
    note: str = ""
    unavailable: str = ""  # runs, but the replay cannot show what it keeps (inside the LLM)
    event_kept: float | None = None
    in_llm: bool = False  # prunes inside the LM: its achieved retention is the layer average (see table_rows)

    @property
    def name(self) -> str:
        return "none" if self.method == "none" else f"{self.method}_r{self.retention:g}"


def _cases(methods: list[str], retentions: tuple[float, ...]) -> list[Case]:
    return [Case("none", 1.0)] + [Case(m, r) for m in methods if m != "none" for r in retentions]


def _siglip_head(work: Path, model: Any) -> Path:
    """A seeded random SigLIP tower with its attention-pooling head, shaped like the model's tower."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    out = work / "siglip_head"
    if not (out / "config.json").is_file():
        config = model.model.spec.vision_config.to_dict()
        torch.manual_seed(HEAD_SEED)
        SiglipVisionModel(SiglipVisionConfig(**{**config, "vision_use_head": True})).save_pretrained(out)
    return out


def replay(model_dir: Path, videos: Path, cases: list[Case], frames: int, work: Path, picture: Path) -> None:
    """Fill each case's ``error`` / ``note`` / ``event_kept`` from an in-process replay of the selection on
    every video (llava.kept_tokens), and draw the kept-token picture of the first video: the uncompressed
    row and every method at the first retention. Event kept = the event's tokens kept as output sources
    over all the event's tokens (a token merged into a group counts only at the group's source)."""
    import numpy as np

    from llava.event_task import event_token_mask, read_manifest
    from llava.families_index import load_video_llm
    from llava.kept_tokens import KeptTokens, acts_in_llm, check_spec, encode_video, kept_tokens, tower_signals
    from llava.model.compression import CompressionSpec
    from llava.runtime import FrameSampling
    from llava.visualize import render_rows

    model = load_video_llm(model_dir)
    own = set(model.supplied_signals)
    if hasattr(model, "load_vision_head"):
        model.load_vision_head(_siglip_head(work, model))
    specs = [CompressionSpec(c.method, c.retention) for c in cases]
    for case, spec in zip(cases, specs, strict=True):
        case.error = check_spec(model, spec)
        case.in_llm = not case.error and acts_in_llm(model, spec)
        if not case.error and spec.signals - own:
            case.note = "SigLIP pooling head: random (LLaVA checkpoints hold none)"
    signals = set().union(*(tower_signals(s) for s, c in zip(specs, cases, strict=True) if not c.error))
    first = cases[1].retention if len(cases) > 1 else 1.0
    shown = [i for i, c in enumerate(cases) if c.method == "none" or c.retention == first]
    hits, total = np.zeros(len(cases)), 0
    for v, video in enumerate(read_manifest(videos)):
        encoded = encode_video(model, videos / video.path, FrameSampling(num_frames=frames), signals)
        event = event_token_mask(video, encoded.frame_groups, encoded.tokens.grid[1:])
        total += int(event.sum())
        rows = []
        for i, (case, spec) in enumerate(zip(cases, specs, strict=True)):
            if case.error:
                rows.append(KeptTokens(case.method, case.retention, error=case.error))
                continue
            row = kept_tokens(model, encoded, spec, groups=v == 0)  # groups: for the picture only
            case.error, case.unavailable = row.error, row.unavailable
            if v == 0 and row.note:
                case.note = "; ".join(n for n in (case.note, row.note) if n)
            hits[i] += int((row.kept & event).sum()) if row.kept.size else 0
            rows.append(row)
        if v == 0:
            span = f"frames {video.start}-{video.start + video.length - 1}"
            title = f"{video.name} on {encoded.family}: a {video.colour} square in {span} (event cells in magenta)"
            render_rows(encoded, [rows[i] for i in shown], picture, title=title, marked=event)
    for i, case in enumerate(cases):
        case.event_kept = None if case.error or case.unavailable else hits[i] / max(total, 1)


def run_default(
    work_dir: str | Path,
    *,
    model: str | Path | None = None,
    methods: list[str] | None = None,
    retentions: tuple[float, ...] = DEFAULT_RETENTIONS,
    videos: int = 48,
    nproc: int = 1,
    frames: int = 8,
    results_dir: str | Path | None = None,
    extra_model_args: str = "",
    fresh: bool = False,
    log: Any = print,
) -> dict[str, Path]:
    """Evaluate ``model`` (default: train one into the work dir) uncompressed and with each method at each
    retention; write the CSVs, the table and the picture. Returns the written paths."""
    from llava.event_task import make_event_videos
    from llava.families_index import detect_family
    from llava.model.compression import METHODS, get_method

    work = Path(work_dir).resolve()
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf_home")}
    env.pop("COMPRESSOR", None)  # the job sets compression through model_args only
    env.pop("R_RATIO", None)
    methods = list(methods) if methods is not None else [m.name for m in METHODS]  # the registry's order
    for name in methods:
        get_method(name)  # an unknown name fails here, listing the valid ones
    model_dir = Path(model).resolve() if model is not None else work / "tiny_event_llava_ov"
    if not (model_dir / "config.json").is_file():
        if model is not None:
            raise FileNotFoundError(f"no config.json in model directory {model_dir}")
        log(f"training the tiny checkpoint into {model_dir} (vidcom2 train-tiny, a few CPU minutes)")
        train = [sys.executable, "-m", "llava.cli", "train-tiny", "--out", str(model_dir)]
        _run(train, work / "logs" / "train.log", env)
    family = detect_family(model_dir).name
    video_dir = work / "videos"
    if not (video_dir / "manifest.json").is_file():
        make_event_videos(video_dir, count=videos)
    task_dir = build_event_task(work / "task", video_dir)
    cases = _cases(methods, retentions)
    picture = work / "kept_tokens.png"
    replay(model_dir, video_dir, cases, frames, work, picture)
    frames_key = "max_frames_num" if family.startswith("llava") else "max_num_frames"
    runs_root = work / "runs"
    for case in cases:
        out = runs_root / case.name
        if case.error or find_runs(out):
            continue  # cannot run, or finished earlier (delete the folder, or pass fresh, to redo it)
        args = f"pretrained={model_dir},device=cpu,dtype=float32,{frames_key}={frames}"
        if case.method != "none":
            args += f",compressor={case.method},retention={case.retention:g}"
        if case.note:
            args += f",vision_head={work / 'siglip_head'}"
        args += f",resume_dir={work / 'resume' / case.name}"
        if extra_model_args:
            args += f",{extra_model_args}"
        log(f"lmms-eval: {case.name}")
        log_file = work / "logs" / f"lmms_eval_{case.name}.log"
        _run(lmms_eval_command(ARCH_TO_MODEL_ID[family], args, task_dir, out, nproc, task=EVENT_TASK), log_file, env)
        check_run(out, log_file)
    target = Path(results_dir) if results_dir is not None else work / "results"
    ran = [c for c in cases if not c.error]
    written = collect(runs_root, target, "synthetic", expect_runs=len(ran))
    rows = table_rows(cases, written["summary"])
    written["table"] = write_table(rows, target / "event_table.csv")
    written["picture"] = picture
    log(format_table(rows))
    return written


def table_rows(cases: list[Case], summary_csv: Path) -> list[dict[str, Any]]:
    """One row per case: method, R, achieved retention and accuracy (lmms-eval), event tokens kept (replay).

    Achieved retention: video tokens at the LM input over those before for a pre-LLM method; for one that
    prunes inside the LM (``Case.in_llm``) the meter's layer-averaged retention instead, the share it really
    keeps (its LM input is the whole video). ``retention_measure`` says which of the two a row shows.
    """
    summary = {(r["method"], round(float(r["retention"]), 4)): r for r in csv.DictReader(summary_csv.open())}
    rows = []
    for case in cases:
        found = summary.get((case.method, round(case.retention, 4)))
        row = {"method": case.method, "retention": case.retention}
        if case.error:
            row.update(
                achieved_retention="", retention_measure="", accuracy="", event_tokens_kept="",
                note=f"cannot run: {case.error}",
            )  # fmt: skip
        elif found is None:
            raise CollectError(f"no collected run for {case.name} in {summary_csv}")
        else:
            kept = "" if case.event_kept is None else 100.0 * case.event_kept
            column = "layer_average_retention" if case.in_llm else "achieved_retention"
            if not found.get(column):
                raise CollectError(
                    f"{summary_csv}: no {column} for {case.name} (an in-LLM run whose meter predates the field, "
                    "e.g. answered from an older resume cache: delete its run and resume folders and rerun)"
                )
            row.update(
                achieved_retention=float(found[column]),
                retention_measure=RETENTION_MEASURES[case.in_llm],
                accuracy=float(found[EVENT_TASK]),
                event_tokens_kept=kept,
                note="; ".join(n for n in (case.note, case.unavailable) if n),
            )
        rows.append(row)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as text: accuracy and event tokens kept in percent (4 options: chance is 25%)."""
    lines = [f"{'method':10} {'R':>5} {'achieved':>9} {'measured at':13} {'accuracy %':>11} {'event kept %':>13}  note"]
    for r in rows:
        if r["accuracy"] == "":
            lines.append(f"{r['method']:10} {r['retention']:5.2f} {'-':>9} {'-':13} {'-':>11} {'-':>13}  {r['note']}")
            continue
        kept = "-" if r["event_tokens_kept"] == "" else f"{r['event_tokens_kept']:.1f}"
        lines.append(
            f"{r['method']:10} {r['retention']:5.2f} {r['achieved_retention']:9.3f} {r['retention_measure']:13} "
            f"{r['accuracy']:11.1f} {kept:>13}  {r['note']}"
        )
    return "\n".join(lines)
