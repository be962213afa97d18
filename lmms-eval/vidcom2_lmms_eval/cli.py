"""``vidcom2 eval-default`` and ``vidcom2 collect``: registered into the project's console script.

llava.cli imports this module lazily (EXTENSION_MODULES), so the core CLI never imports lmms-eval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.cli import register_subcommand


def _add_default(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", default="work/eval_default", help="where videos, runs, CSVs and the picture go")
    p.add_argument(
        "--model", default=None, help="checkpoint directory (default: train the tiny one into the work dir)"
    )
    p.add_argument("--methods", default=None, help="comma list of methods (default: every registered method)")
    p.add_argument("--retentions", default="0.25,0.1", help="comma list of R for every method besides `none`")
    p.add_argument("--videos", type=int, default=48, help="brief-event videos (one question each)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun on CPU) per lmms-eval run")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument(
        "--results-dir", default=None, help="CSV folder (default <work-dir>/results; never results/ unless given)"
    )
    p.add_argument(
        "--model-args",
        default="",
        help="extra --model_args for every lmms-eval run (runtime settings, e.g. attn_implementation=eager; the "
        "event-token replay does not see them)",
    )
    p.add_argument("--fresh", action="store_true", help="delete the work dir first")


def _run_default(args: argparse.Namespace) -> int:
    from vidcom2_lmms_eval.default_job import run_default

    retentions = tuple(float(r) for r in args.retentions.split(",") if r.strip())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    written = run_default(
        args.work_dir,
        model=args.model,
        methods=methods,
        retentions=retentions,
        videos=args.videos,
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
    "eval-default", _add_default, _run_default, help="the brief-event task through lmms-eval: every method, one table"
)
register_subcommand("collect", _add_collect, _run_collect, help="lmms-eval outputs -> results CSVs")
