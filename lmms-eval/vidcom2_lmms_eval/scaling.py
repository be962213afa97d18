"""One evaluation stream at 1, 2, 4, 8 processes: samples per second and how evenly the ranks were loaded.

Why: the paper tables run ``accelerate launch --num_processes=8`` (one GPU per process, lmms-eval deals the
docs out round-robin); whether eight GPUs serve eight times the samples depends on the per-rank balance
(videos differ in length, a rank that draws the long ones finishes last) and on what each process shares
on the host (video decoding, the CPU processor). Each row here is one finished lmms-eval run of the same
task and model args at one process count; rows are written only for runs that ran to their results file.

Columns: model, compressor, retention, gpus (processes), samples (the meter's, all ranks), elapsed_s (model
loaded to the last rank's last answer, the meter's ``elapsed_seconds``), samples_per_s (samples / elapsed_s),
launch_wall_s (the whole launch, loading included), rank_samples / rank_busy_s (per rank, ``/``-joined),
balance (least over most busy rank: 1.0 = even), device, command, commit, date.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava.placement import keep_multicast_off

COLUMNS = (
    "model", "compressor", "retention", "gpus", "samples", "elapsed_s", "samples_per_s", "launch_wall_s",
    "rank_samples", "rank_busy_s", "balance", "device", "command", "commit", "date",
)  # fmt: skip


@dataclass(frozen=True)
class ScalingRun:
    """One planned lmms-eval run: the stream's settings at one process count."""

    model_id: str
    model_args: str
    tasks: str
    compressor: str
    retention: float
    processes: int
    cpu: bool
    include_path: str | None = None
    gen_kwargs: str | None = None

    def command(self, output: Path) -> list[str]:
        """The launch: accelerate on GPUs (one per process), torchrun with gloo on the CPU (accelerate's
        --cpu starts one process whatever --num_processes says)."""
        if self.cpu:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.processes), "-m"]
        else:
            launch = ["accelerate", "launch", f"--num_processes={self.processes}", "-m"]
        args = self.model_args
        if self.compressor != "none":
            args += f",compressor={self.compressor},retention={self.retention:g}"
        cmd = [*launch, "lmms_eval", "--model", self.model_id, "--model_args", args, "--tasks", self.tasks,
               "--batch_size", "1", "--log_samples", "--output_path", str(output)]  # fmt: skip
        if self.include_path:
            cmd += ["--include_path", self.include_path]
        if self.gen_kwargs:
            cmd += ["--gen_kwargs", self.gen_kwargs]
        return cmd


def rank_load(meter_file: Path) -> tuple[dict[int, int], dict[int, float]]:
    """Per rank: samples and busy seconds (the sum of its samples' wall time), from the meter's records."""
    records = meter_file.with_name(meter_file.stem + "_samples.jsonl")
    samples: dict[int, int] = defaultdict(int)
    busy: dict[int, float] = defaultdict(float)
    for line in records.read_text().splitlines():
        record = json.loads(line)
        samples[int(record["rank"])] += 1
        busy[int(record["rank"])] += float(record["wall_s"])
    return dict(sorted(samples.items())), dict(sorted(busy.items()))


def row_of(run: ScalingRun, output: Path, launch_wall_s: float, command: list[str], label: dict[str, str]) -> dict:
    """The CSV row of a finished run (its meter file is the proof it finished)."""
    meters = sorted(output.rglob("*_vidcom2_meter.json"))
    if len(meters) != 1:
        raise RuntimeError(f"expected one efficiency meter under {output}, found {len(meters)}")
    meter = json.loads(meters[0].read_text())
    samples, elapsed = int(meter["overall"]["samples"]), float(meter["run"]["elapsed_seconds"])
    per_rank, busy = rank_load(meters[0])
    if sum(per_rank.values()) != samples:
        raise RuntimeError(f"{meters[0]}: ranks hold {sum(per_rank.values())} records for {samples} samples")
    return {
        "model": run.model_id,
        "compressor": run.compressor,
        "retention": f"{run.retention:g}" if run.compressor != "none" else "1",
        "gpus": run.processes,
        "samples": samples,
        "elapsed_s": f"{elapsed:.3f}",
        "samples_per_s": f"{samples / elapsed:.3f}" if elapsed > 0 else "",
        "launch_wall_s": f"{launch_wall_s:.3f}",
        "rank_samples": "/".join(str(per_rank.get(r, 0)) for r in range(run.processes)),
        "rank_busy_s": "/".join(f"{busy.get(r, 0.0):.3f}" for r in range(run.processes)),
        "balance": f"{min(busy.values()) / max(busy.values()):.3f}" if busy and max(busy.values()) > 0 else "",
        "device": label["device"],
        "command": shlex.join(command),
        "commit": label["commit"],
        "date": label["date"],
    }


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row (header first for a new file); a file with other columns is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has other columns than {', '.join(COLUMNS)}; write a new file")
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        if not exists:
            writer.writeheader()
        writer.writerow(row)


def device_label(cpu: bool) -> str:
    """What the rows ran on: the GPU's name, or ``cpu``."""
    if cpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def check_output_name(out: Path, device: str) -> None:
    """A CSV named for a GPU (``*_h200.csv``) takes only rows measured on that GPU: no CPU smoke rows."""
    stem = out.stem.lower()
    for gpu in ("h200", "h100", "a100"):
        if stem.endswith(f"_{gpu}") and gpu not in device.lower():
            raise ValueError(f"--out {out} is named for {gpu.upper()} rows; these run on {device}: use another --out")


def available_processes(cpu: bool) -> int | None:
    """GPUs visible (None on the CPU: any count runs, slowly)."""
    if cpu:
        return None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava_onevision", help="lmms-eval model id of our wrappers")
    p.add_argument("--model-args", required=True, help="--model_args without compressor/retention, e.g. pretrained=...")
    p.add_argument("--tasks", default="mvbench")
    p.add_argument("--compressors", default="none,vidcom2")
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--gpus", default="1,2,4,8", help="process counts; those above the visible GPUs are skipped")
    p.add_argument("--cpu", action="store_true", help="CPU processes (torchrun, gloo): a smoke run, never h200 rows")
    p.add_argument("--include-path", default=None)
    p.add_argument("--gen-kwargs", default=None)
    p.add_argument("--work-dir", type=Path, default=Path("logs/eval_scaling"))
    p.add_argument("--out", type=Path, default=Path("results/eval_scaling_h200.csv"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from llava.bench import source_commit

    args = parse_args(argv)
    device = device_label(args.cpu)
    check_output_name(args.out, device)
    counts = [int(n) for n in args.gpus.split(",") if n]
    if not counts or min(counts) < 1:
        raise ValueError(f"--gpus must list process counts >= 1, got {args.gpus!r}")
    limit = available_processes(args.cpu)
    env = dict(os.environ)
    keep_multicast_off(env)
    label = {"device": device, "commit": source_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    ran = 0
    for compressor in [c for c in args.compressors.split(",") if c]:
        for n in counts:
            if limit is not None and n > limit:
                print(f"eval_scaling: {n} processes skipped: {limit} GPU(s) visible", file=sys.stderr)
                continue
            run = ScalingRun(args.model, args.model_args, args.tasks, compressor, args.retention, n, args.cpu,
                             args.include_path, args.gen_kwargs)  # fmt: skip
            output = args.work_dir / f"{compressor}_p{n}"
            command = run.command(output)
            print(f"eval_scaling: {shlex.join(command)}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(command, env=env)
            wall = time.perf_counter() - start
            if proc.returncode != 0 or not any(output.rglob("*_results.json")):
                raise RuntimeError(f"lmms-eval failed for {asdict(run)} (exit {proc.returncode}); no row written")
            row = row_of(run, output, wall, command, label)
            append_row(args.out, row)
            ran += 1
            print(f"eval_scaling: {compressor} x{n}: {row['samples_per_s']} samples/s, balance {row['balance']}")
    if ran == 0:
        raise ValueError(f"--gpus {args.gpus}: no process count fits the {limit} visible GPU(s); nothing was run")
    return 0
