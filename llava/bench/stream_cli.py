"""The options of `vidcom2 bench --stream N` (llava.bench.stream runs it); no torch import here, so
`vidcom2 --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_WORKERS = 3
STREAM_DEFAULTS = {
    "decode_mode": "auto",
    "compressors": "none,vidcom2",
    "retentions": [0.25, 0.15],
    "frames": [32],
    "batch_sizes": [1],
    "out": Path("results/throughput_h200.csv"),
}


def compiles_decode(args: argparse.Namespace) -> bool:
    """Whether the first run of a shape compiles its decode step (compiled, or auto on a GPU), so a warm-up
    run must absorb it."""
    return args.decode_mode == "compiled" or (args.decode_mode == "auto" and not str(args.device).startswith("cpu"))


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stream (--stream N)")
    g.add_argument(
        "--stream",
        default=None,
        metavar="N[,N...]",
        help="measure samples/s of N-sample evaluation streams instead of single requests; one N per "
        "--answer-tokens value, or one for all",
    )
    g.add_argument("--answer-tokens", default="1,32", help="answer lengths (max_new_tokens, EOS ignored)")
    g.add_argument("--prefetch-workers", type=int, default=DEFAULT_WORKERS, help="reader threads (>= 1)")
    g.add_argument("--prefetch-depth", type=int, default=None, help="batches read ahead (default 2 x workers)")
    g.add_argument(
        "--serial-baseline",
        action="store_true",
        help="also the uncompressed stream without prefetching (answer_batch on paths)",
    )
    g.add_argument("--distinct-videos", type=int, default=8, help="different mp4 files the samples cycle over")
    g.add_argument("--video-frames", type=int, default=None, help="frames per file (default: the sampled count)")
    g.add_argument("--video-size", type=int, default=384, help="width = height of the files, even")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None


def check_stream_arguments(args: argparse.Namespace) -> dict[int, int]:
    """{answer length: samples}; every stream option checked before any model is built."""
    counts = _int_list("--stream", args.stream)
    answer_tokens = _int_list("--answer-tokens", args.answer_tokens)
    if not counts or min(counts) < 1:
        raise ValueError(f"--stream must be >= 1 sample, got {args.stream}")
    if not answer_tokens or min(answer_tokens) < 1:
        raise ValueError(f"--answer-tokens must be >= 1, got {args.answer_tokens}")
    if len(counts) not in (1, len(answer_tokens)):
        raise ValueError(f"--stream {args.stream}: give one sample count, or one per --answer-tokens value")
    if args.prefetch_workers < 1:
        raise ValueError(
            f"--prefetch-workers must be >= 1 (--serial-baseline adds the serial stream), got {args.prefetch_workers}"
        )
    if args.prefetch_depth is not None and args.prefetch_depth < 1:
        raise ValueError(f"--prefetch-depth must be >= 1, got {args.prefetch_depth}")
    if args.distinct_videos < 1:
        raise ValueError(f"--distinct-videos must be >= 1, got {args.distinct_videos}")
    if args.video_size < 16 or args.video_size % 2:
        raise ValueError(f"--video-size must be an even number >= 16, got {args.video_size}")
    if args.video_frames is not None and args.video_frames < 1:
        raise ValueError(f"--video-frames must be >= 1, got {args.video_frames}")
    if compiles_decode(args) and args.warmup < 1:
        raise ValueError(f"--decode-mode {args.decode_mode} needs --warmup >= 1 (the first batch compiles)")
    return dict(zip(answer_tokens, counts * len(answer_tokens) if len(counts) == 1 else counts, strict=True))
