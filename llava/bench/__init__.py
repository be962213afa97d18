"""`vidcom2 bench`: GPU efficiency of full-size models with random weights (see efficiency.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from llava.bench.stream_cli import STREAM_DEFAULTS, add_stream_arguments, compiles_decode
from llava.cli import register_subcommand


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", default="llava_ov_7b", help="comma list of: " + ", ".join(_model_names()) + " (--stream: also "
        "tiny_<arch>, a random tiny checkpoint on the CPU)"
    )
    p.add_argument("--compressors", default=None, help="default none,vidcom2,random,uniform (--stream: none,vidcom2)")
    p.add_argument("--retentions", type=_floats, help="default 1.0,0.5,0.25,0.15,0.10 (--stream: 0.25,0.15)")
    p.add_argument("--frames", type=_ints, help="the first is the main sweep's; default 32,8,64,128 (--stream: 32)")
    p.add_argument("--batch-sizes", type=_ints, help="the first is the main sweep's; default 1,4,8 (--stream: 1)")
    p.add_argument("--full", action="store_true", help="the whole cross product instead of the three sweeps")
    p.add_argument("--decode-tokens", type=int, default=16, help="fixed number of generated tokens (EOS ignored)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--device-map", default=None,
        help="split the model over devices: auto, balanced, or a JSON map / file (module -> device); the "
        "model is built on the CPU first, then dispatched (llava.placement)",
    )  # fmt: skip
    p.add_argument("--max-memory", default=None, help="per-device budget for --device-map, e.g. 0=70GiB,1=70GiB")
    p.add_argument("--offload-dir", default=None, help="folder for modules a --device-map puts on disk")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--attn",
        default=None,
        help="default: flash_attention_2 when installed, else sdpa (always sdpa with --decode-mode static/compiled); "
        "sdpa_varlen: Qwen vision towers on PyTorch's packed flash kernel, LM on sdpa",
    )
    p.add_argument(
        "--decode-mode",
        default=None,
        help="eager (default; --stream: auto, as the wrappers), auto (compiled where it applies, else eager), "
        "static (static KV cache) or compiled (static cache + CUDA graphs; warm-up runs absorb the compile)",
    )
    p.add_argument(
        "--vidcom2-option", action="append", default=[], metavar="KEY=VALUE",
        help="VidCom2Config field for the vidcom2 cases, e.g. execution=compiled_graph (repeatable)",
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="a knob of one method for its cases, e.g. visionzip.dominant_ratio=0.6 (repeatable)",
    )
    p.add_argument(
        "--preprocess-device",
        default=None,
        help="Qwen models: run the HF video processor there (e.g. cuda) instead of on the CPU, as the "
        "adapters' preprocess_device does",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="default results/efficiency_h200.csv (--stream: results/throughput_h200.csv)")
    p.add_argument("--append", action="store_true", help="append rows to --out instead of replacing it")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG of TTFT and peak memory vs retention")
    add_stream_arguments(p)


BENCH_DEFAULTS = {
    "compressors": "none,vidcom2,random,uniform",
    "retentions": [1.0, 0.5, 0.25, 0.15, 0.10],
    "frames": [32, 8, 64, 128],
    "batch_sizes": [1, 4, 8],
    "out": Path("results/efficiency_h200.csv"),
    "decode_mode": "eager",  # the efficiency rows' decode column: the launch-bound eager loop, every method alike
}


def _fill_defaults(args: argparse.Namespace) -> None:
    """Options left out take the single-request bench's defaults, or the stream's with --stream."""
    defaults = {**BENCH_DEFAULTS, **(STREAM_DEFAULTS if args.stream is not None else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--vidcom2-option expects KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def _model_names() -> list[str]:
    from llava.bench.models import BENCH_MODELS

    return list(BENCH_MODELS)


def source_commit() -> str:
    """The commit the bench runs from: VIDCOM2_COMMIT (set by whoever copies the tree to a GPU machine
    without its .git), else ``git rev-parse --short HEAD``, else "unknown"."""
    import os
    import subprocess

    if os.environ.get("VIDCOM2_COMMIT"):
        return os.environ["VIDCOM2_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]  # the checkout's, wherever the command runs from
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, cwd=root
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _default_attn() -> str:
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def _run(args: argparse.Namespace) -> int:
    from llava.bench.efficiency import bench_model, sweep_cases, write_rows
    from llava.bench.models import get_bench_model
    from llava.bench.stream import stream_model
    from llava.model.compression import CompressionSpec, get_method, is_method_option, options_for
    from llava.model.vidcom2 import VidCom2Config

    _fill_defaults(args)
    from llava.placement import keep_multicast_off, make_placement

    placement = make_placement(args.device, args.device_map, args.max_memory, args.offload_dir)
    if torch_gpus() > 1:
        keep_multicast_off()
    args.placement = placement
    resolve = get_bench_model if args.stream is None else stream_model  # the stream also runs tiny_<arch>
    models = [resolve(name) for name in args.models.split(",") if name]
    compressors = [c for c in args.compressors.split(",") if c]
    for name in compressors:
        get_method(name)
    if any(not 0 < r <= 1 for r in args.retentions):
        raise ValueError(f"--retentions must lie in (0, 1], got {args.retentions}")
    if args.decode_tokens < 2:
        raise ValueError("--decode-tokens must be >= 2 (the first token comes from prefill)")
    from llava.runtime import DECODE_MODES

    if args.decode_mode not in DECODE_MODES:
        raise ValueError(f"--decode-mode must be one of {', '.join(DECODE_MODES)}, got {args.decode_mode!r}")
    if compiles_decode(args) and args.warmup < 1:
        raise ValueError(f"--decode-mode {args.decode_mode} needs --warmup >= 1 (the first run compiles)")
    vidcom2_options = dict(_key_value(item) for item in args.vidcom2_option)
    VidCom2Config.from_options(vidcom2_options)  # a typo fails before any model is built
    method_options = dict(_key_value(item) for item in args.option)
    for key in method_options:
        if not is_method_option(key):
            raise ValueError(f"--option {key}=...: expected METHOD.KEY with METHOD one of the registered methods")
    for name in compressors:  # each method's knobs parsed once, before any model is built
        CompressionSpec(name, 0.5, options_for(name, method_options))
    command = "vidcom2 bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    label = {"commit": source_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    attn = args.attn or ("sdpa" if args.decode_mode != "eager" else _default_attn())
    from llava.model.static_decode import check_attention

    check_attention(attn, args.decode_mode)
    if args.stream is not None:
        from llava.bench.stream import run_stream_command

        run_stream_command(
            args, models=models, compressors=compressors, attn=attn, label=label, command=command,
            vidcom2_options=vidcom2_options, method_options=method_options,
        )
        print(f"wrote {args.out}")
        return 0
    cases = sweep_cases(compressors, args.retentions, args.frames, args.batch_sizes, full=args.full)
    append = [args.append]

    def write_now(row: dict) -> None:  # each row as soon as it is measured; later rows append
        write_rows([{**row, **label}], args.out, append=append[0])
        append[0] = True

    with tempfile.TemporaryDirectory() as work:
        for model in models:
            bench_model(
                model, cases, device=args.device, dtype=args.dtype, attn=attn, decode_tokens=args.decode_tokens,
                repeats=args.repeats, warmup=args.warmup, work_dir=Path(work), command=command,
                decode_mode=args.decode_mode, vidcom2_options=vidcom2_options, method_options=method_options,
                on_row=write_now, preprocess_device=args.preprocess_device, placement=placement,
            )
    if args.plot is not None:
        from llava.bench.plot import plot_efficiency

        plot_efficiency(args.out, args.plot)
    print(f"wrote {args.out}")
    return 0


def torch_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


register_subcommand("bench", _add_arguments, _run, help="GPU efficiency benchmark of full-size random-weight models")
