"""The one console script of the project, ``vidcom2``, with subcommands.

Built in here: ``infer`` (one question about one video), ``visualize`` (a picture of the tokens each
method keeps), ``methods`` (the registry), ``make-tiny`` (random-init tiny checkpoints for offline work),
``train-tiny`` (a tiny checkpoint trained on the brief-event task) and ``make-videos`` (synthetic
videos). Other parts of the project add theirs with :func:`register_subcommand` from a module listed
in ``EXTENSION_MODULES`` (imported lazily; a missing one is skipped), so this file never has to know
about evaluation or benchmarking.

User errors (bad option values, missing files, unreadable videos) print one line
``vidcom2: error: ...`` on stderr and exit with status 2; ``--traceback`` shows the full trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Modules that call register_subcommand when imported (eval, bench, ...); absent ones are skipped.
EXTENSION_MODULES = ("vidcom2_lmms_eval.cli", "scripts.cli", "llava.bench")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


_SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    *,
    help: str = "",
) -> None:
    """Add ``vidcom2 NAME``: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the
    exit status (None means 0). Raise ValueError/FileNotFoundError for user errors: they are printed
    as one line."""
    if name in _SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    _SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict of strings (compressors parse and validate their own values)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


# ---------------------------------------------------------------- infer


def _add_infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--video", required=True, help="video file or folder of frame images")
    p.add_argument("--question", required=True)
    p.add_argument("--family", default=None, help="model family (default: detected from config.json)")
    g = p.add_argument_group("compression")
    g.add_argument(
        "--compressor",
        default="none",
        help="method name, e.g. none, vidcom2, visionzip, dycoke, fastvid, holitom (`vidcom2 methods` lists all)",
    )
    g.add_argument("--retention", type=float, default=1.0, help="fraction R of video tokens to keep, in (0, 1]")
    g.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="method knob, KEY or METHOD.KEY (repeatable)"
    )
    g = p.add_argument_group("frame sampling (defaults: the family's)")
    g.add_argument("--frames", type=int, default=None, help="uniformly sample exactly N frames")
    g.add_argument("--fps", type=float, default=None, help="sample at this rate, capped by --max-frames")
    g.add_argument("--max-frames", type=int, default=None)
    g.add_argument("--force-sample", action="store_true", help="always take --max-frames uniform frames")
    g.add_argument("--min-pixels", type=int, default=None)
    g.add_argument("--max-pixels", type=int, default=None)
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--decode-mode",
        default="auto",
        help="auto (default: compiled on CUDA where it applies, else eager); eager; static: static KV cache; "
        "compiled: static cache + torch.compile'd step (CUDA graphs on CUDA; the first use of a shape compiles, "
        "seconds to a minute; needs --attn sdpa or eager)",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu")
    g.add_argument(
        "--device-map",
        default=None,
        help="split the model over devices (accelerate): auto (fill devices in order), balanced (even over the "
        "GPUs), a device (no split), or a JSON map / JSON file of module name -> device (cuda:N, N, cpu, disk). "
        "The vision tower and the embedding share the first device; static/compiled decoding is refused "
        "(auto decodes eagerly)",
    )
    g.add_argument(
        "--max-memory", default=None, help="per-device budget for --device-map, e.g. 0=70GiB,1=70GiB,cpu=100GiB"
    )
    g.add_argument("--offload-dir", default=None, help="folder for the weights a --device-map puts on disk")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument(
        "--attn",
        default="sdpa",
        help="attention implementation: sdpa, eager, flash_attention_2, or sdpa_varlen (Qwen: the LM on sdpa, "
        "the vision tower's attention packed into one PyTorch flash call per layer)",
    )
    g = p.add_argument_group("layout (LLaVA families)")
    g.add_argument(
        "--grid-newlines", default=None, help="LLaVA-Video row newlines after compression: frame, rows, all_rows"
    )
    g.add_argument("--positions", default=None, help="positions after compression: contiguous (default) or original")
    g.add_argument(
        "--vision-head",
        default=None,
        metavar="DIR",
        help="SigLIP checkpoint whose attention-pooling head gives FastVID's frame signals (LLaVA checkpoints lack it)",
    )
    g = p.add_argument_group("preprocessing (Qwen families)")
    g.add_argument(
        "--preprocess-device",
        default=None,
        help="run the HF video processor on this device (e.g. cuda); default: the CPU, as the stock pipeline",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (InferenceResult)")


def _run_infer(args: argparse.Namespace) -> int:
    from llava.families_index import load_video_llm
    from llava.model.compression import CompressionSpec
    from llava.runtime import FrameSampling, GenerationOptions

    compression = CompressionSpec(args.compressor, args.retention, parse_options(args.option))
    sampling = FrameSampling(
        num_frames=args.frames,
        fps=args.fps,
        max_frames=args.max_frames,
        force_sample=args.force_sample,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    generation = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=tuple(args.stop or ()),
        seed=args.seed,
        decode_mode=args.decode_mode,
    )
    from llava.model.static_decode import check_attention
    from llava.placement import make_placement

    check_attention(args.attn, generation.decode_mode)
    placement = make_placement(args.device, args.device_map, args.max_memory, args.offload_dir)
    if placement.split and generation.decode_mode in ("static", "compiled"):
        raise ValueError(f"--decode-mode {generation.decode_mode} needs the model on one device; with --device-map "
                         "use --decode-mode eager or auto")  # fmt: skip
    if not Path(args.video).exists():
        raise FileNotFoundError(f"video not found: {args.video}")
    model = load_video_llm(
        args.model, family=args.family, dtype=args.dtype, attn_implementation=args.attn, placement=placement
    )
    for flag, attribute in (
        ("grid_newlines", "grid_newlines"),
        ("positions", "position_mode"),
        ("preprocess_device", "preprocess_device"),
    ):
        value = getattr(args, flag)
        if value is not None:
            if not hasattr(model, attribute):
                raise ValueError(f"--{flag.replace('_', '-')} is not supported by model family {model.family}")
            setattr(model, attribute, value)
    if args.vision_head is not None:
        if not hasattr(model, "load_vision_head"):
            raise ValueError(f"--vision-head is not supported by model family {model.family}")
        model.load_vision_head(args.vision_head)
    result = model.answer(args.video, args.question, compression=compression, generation=generation, sampling=sampling)
    if args.json:
        print(result.to_json())
    else:
        print(result.answer)
        print(
            f"[{model.family}] {compression.describe()}: visual tokens {result.visual_tokens_before} -> "
            f"{result.visual_tokens_after} (achieved retention {result.achieved_retention:.3f})",
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------- make-tiny / make-videos


def _add_make_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="e.g. llava_ov, llava_vid, qwen2_vl, qwen2_5_vl, qwen3_vl")
    p.add_argument("--format", default="lmms-lab", choices=("lmms-lab", "hf"), help="only for LLaVA archs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")


def _run_make_tiny(args: argparse.Namespace) -> int:
    from llava.families_index import tiny_builders

    builders = tiny_builders()
    if args.arch not in builders:
        raise ValueError(f"unknown --arch {args.arch!r}; valid: {', '.join(builders)}")
    out = builders[args.arch](Path(args.out), seed=args.seed, fmt=args.format)
    print(out)
    return 0


def _add_train_tiny_arguments(p: argparse.ArgumentParser) -> None:
    from llava.train_tiny import TrainConfig

    defaults = TrainConfig()
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--arch", default=defaults.arch, help="llava_ov or llava_vid")
    for name in ("steps", "batch_size", "train_videos", "eval_videos", "frames", "image_size", "lm_layers", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=defaults.lr)


def _run_train_tiny(args: argparse.Namespace) -> int:
    from llava.train_tiny import TrainConfig, train_tiny

    config = TrainConfig(
        arch=args.arch,
        steps=args.steps,
        batch_size=args.batch_size,
        train_videos=args.train_videos,
        eval_videos=args.eval_videos,
        frames=args.frames,
        image_size=args.image_size,
        lm_layers=args.lm_layers,
        seed=args.seed,
        lr=args.lr,
    )
    train_tiny(args.out, config, log=lambda line: print(line, file=sys.stderr))
    print(args.out)
    return 0


def _add_make_videos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task",
        default="plumbing",
        choices=("plumbing", "event"),
        help="plumbing: five videos with scene cuts and static stretches; event: the brief-event task's videos",
    )
    p.add_argument("--count", type=int, default=48, help="number of event videos (--task event)")


def _run_make_videos(args: argparse.Namespace) -> int:
    from llava.synthetic_videos import MANIFEST, make_videos

    if args.task == "event":
        from llava.event_task import make_event_videos

        manifest = make_event_videos(args.out, count=args.count, seed=args.seed)
    else:
        manifest = make_videos(args.out, seed=args.seed)
    for entry in manifest["videos"]:
        print(Path(args.out) / entry["path"])
    print(Path(args.out) / MANIFEST)
    return 0


def _add_methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")


def _run_methods(args: argparse.Namespace) -> int:
    import json

    from llava.model.compression import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    for row in rows:
        kind = "merge" if row["merges"] else "select"
        signals = ", ".join(row["signals"]) or "-"
        print(f"{row['name']:10} {'/'.join(row['stages']):8} {kind:6} signals: {signals}")
        if row["summary"]:
            print(f"{'':10} {row['summary']}")
        knobs = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        print(f"{'':10} options: {knobs or '-'}")
    return 0


# ---------------------------------------------------------------- visualize


def _add_visualize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--video", required=True, help="video file or folder of frame images")
    p.add_argument("--out", required=True, help="PNG to write")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--compressor", help="one method (`vidcom2 methods` lists them)")
    which.add_argument("--compressors", help="comma-separated methods: one row each, e.g. none,vidcom2,random")
    p.add_argument("--retention", type=float, default=0.25, help="fraction R of video tokens to keep (default 0.25)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method knob, METHOD.KEY=VALUE (repeatable)")
    p.add_argument("--frames", type=int, default=8, help="uniformly sampled frames (default 8)")
    p.add_argument("--family", default=None, help="model family (default: detected from config.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--vision-head", default=None, metavar="DIR", help="SigLIP head for FastVID on LLaVA (see infer)")


def _run_visualize(args: argparse.Namespace) -> int:
    from llava.families_index import load_video_llm
    from llava.model.compression import CompressionSpec
    from llava.runtime import FrameSampling
    from llava.visualize import visualize

    names = [args.compressor] if args.compressor else [n.strip() for n in args.compressors.split(",") if n.strip()]
    options = parse_options(args.option)
    specs = [CompressionSpec(name, args.retention, _options_of(name, options)) for name in names]
    if not Path(args.video).exists():
        raise FileNotFoundError(f"video not found: {args.video}")
    model = load_video_llm(args.model, family=args.family, device=args.device, dtype=args.dtype)
    if args.vision_head is not None:
        if not hasattr(model, "load_vision_head"):
            raise ValueError(f"--vision-head is not supported by model family {model.family}")
        model.load_vision_head(args.vision_head)
    path, rows = visualize(model, args.video, specs, args.out, FrameSampling(num_frames=args.frames))
    for row in rows:
        status = f"cannot run: {row.error}" if row.error else f"achieved retention {row.achieved_retention:.3f}"
        status = row.unavailable or status
        print(f"{row.method:10} R={row.retention:g}  {status}", file=sys.stderr)
    print(path)
    if len(rows) == 1 and rows[0].error:
        raise ValueError(rows[0].error)
    return 0


def _options_of(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The knobs for method ``name`` in a grid: its own ``name.key`` entries and every bare key (a bare
    key another method lacks fails, naming it: prefix knobs when several methods are drawn)."""
    from llava.model.compression import is_method_option

    return {k: v for k, v in options.items() if k.partition(".")[0] == name or not is_method_option(k)}


register_subcommand("methods", _add_methods_arguments, _run_methods, help="list the compression methods, their knobs")
register_subcommand("infer", _add_infer_arguments, _run_infer, help="answer one question about one video")
register_subcommand(
    "visualize", _add_visualize_arguments, _run_visualize, help="draw the tokens each method keeps on the frames"
)
register_subcommand("make-tiny", _add_make_tiny_arguments, _run_make_tiny, help="write a random-init tiny checkpoint")
register_subcommand(
    "train-tiny", _add_train_tiny_arguments, _run_train_tiny, help="train a tiny checkpoint on the brief-event task"
)
register_subcommand("make-videos", _add_make_videos_arguments, _run_make_videos, help="write synthetic test videos")


def _load_extensions() -> None:
    for module in EXTENSION_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise  # the extension exists but one of its own imports is missing: show it


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    parser = argparse.ArgumentParser(prog="vidcom2", description="Training-free video token compression for Video LLMs")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _SUBCOMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vidcom2`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = _SUBCOMMANDS[args.command].run(args)
    except USER_ERRORS as exc:
        if args.traceback:
            raise
        print(f"vidcom2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    # `python -m llava.cli`: extensions register into the imported module llava.cli, not into this
    # __main__ copy of it, so run that module's main.
    from llava.cli import main as package_main

    sys.exit(package_main())
