"""``vidcom2 eval-default``, ``collect`` and ``collect-efficiency``: subcommands of the project's console script.

llava.cli imports this module lazily (EXTENSION_MODULES), so the core CLI never imports lmms-eval.
"""

from __future__ import annotations

import argparse
import json

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
    from vidcom2_lmms_eval.collect import add_arguments

    add_arguments(p)


def _run_collect(args: argparse.Namespace) -> int:
    from vidcom2_lmms_eval.collect import run_cli

    return run_cli(args)


def _add_collect_efficiency(p: argparse.ArgumentParser) -> None:
    from vidcom2_lmms_eval.efficiency_table import add_arguments

    add_arguments(p)


def _run_collect_efficiency(args: argparse.Namespace) -> int:
    from vidcom2_lmms_eval.efficiency_table import run_cli

    return run_cli(args)


register_subcommand(
    "eval-default", _add_default, _run_default, help="the brief-event task through lmms-eval: every method, one table"
)
register_subcommand("collect", _add_collect, _run_collect, help="lmms-eval outputs -> results CSVs")
register_subcommand(
    "collect-efficiency", _add_collect_efficiency, _run_collect_efficiency, help="MVBench runs -> the efficiency table"
)
