"""``vidcom2 eval-default`` and ``vidcom2 collect``: registered into the project's console script.

llava.cli imports this module lazily (EXTENSION_MODULES), so the core CLI never imports lmms-eval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.cli import register_subcommand


def _add_default(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", default="work/eval_default", help="where checkpoints, videos, runs and CSVs go")
    p.add_argument(
        "--arch", default="llava_ov", help="tiny architecture: llava_ov, llava_vid, qwen2_vl, qwen2_5_vl, qwen3_vl"
    )
    p.add_argument("--retentions", default="1.0,0.25", help="comma list; 1.0 is the uncompressed baseline")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun on CPU) per lmms-eval run")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument(
        "--results-dir", default=None, help="CSV folder (default <work-dir>/results; never results/ unless given)"
    )
    p.add_argument("--model-args", default="", help="extra --model_args, e.g. frame_score=equal,temperature=0.02")
    p.add_argument("--fresh", action="store_true", help="delete the work dir first")


def _run_default(args: argparse.Namespace) -> int:
    from vidcom2_lmms_eval.default_job import run_default

    retentions = tuple(float(r) for r in args.retentions.split(",") if r.strip())
    written = run_default(
        args.work_dir,
        arch=args.arch,
        retentions=retentions,
        nproc=args.nproc,
        frames=args.frames,
        results_dir=args.results_dir,
        extra_model_args=args.model_args,
        fresh=args.fresh,
    )
    print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


def _add_collect(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder holding one lmms-eval output folder per run")
    p.add_argument("--out", default="results", help="CSV folder")
    p.add_argument("--name", required=True, help="CSV file prefix, e.g. llava_ov")
    p.add_argument("--paper", default=None, help="paper numbers CSV (results/paper/paper_accuracy.csv)")
    p.add_argument("--expect-runs", type=int, default=None, help="fail unless exactly this many runs are found")


def _run_collect(args: argparse.Namespace) -> int:
    from vidcom2_lmms_eval.collect import collect

    written = collect(Path(args.root), Path(args.out), args.name, args.paper, args.expect_runs)
    print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


register_subcommand(
    "eval-default", _add_default, _run_default, help="synthetic task through lmms-eval, offline, to CSVs"
)
register_subcommand("collect", _add_collect, _run_collect, help="lmms-eval outputs -> results CSVs")
