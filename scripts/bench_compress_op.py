"""Micro-benchmark of the VidCom2 selection op alone (no model): median ms per video.

    python scripts/bench_compress_op.py --device cuda --out results/compress_op_h100.csv
    python scripts/bench_compress_op.py --device cpu --repeats 5 --out results/compress_op_cpu.csv

Times ``vidcom2_keep_indices`` end to end (including its one host sync) on random bf16/fp32
features shaped like real ones, after warm-up; CUDA events on GPU, perf_counter on CPU. Inputs
rotate among several buffers so that repeated runs do not measure a warm cache.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers

from llava.bench.timing import time_call_ms
from llava.model.compression import CompressionSpec

SHAPES = ((32, 196, 3584), (16, 600, 3584), (128, 196, 3584), (8, 196, 3584))


def bench(shape, dtype, device, compressor, retention, repeats, warmup, options=None, buffers=4) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(buffers)]
    spec = CompressionSpec(compressor, retention, dict(options or {}))
    for i in range(warmup):
        spec.keep_indices(inputs[i % buffers])
    times = [time_call_ms(lambda x=inputs[i % buffers]: spec.keep_indices(x), device) for i in range(repeats)]
    kept = spec.keep_indices(inputs[0]).numel()
    return {
        "compressor": compressor,
        "options": ";".join(f"{k}={v}" for k, v in sorted((options or {}).items())),
        "frames": shape[0],
        "tokens_per_frame": shape[1],
        "dim": shape[2],
        "dtype": str(dtype).replace("torch.", ""),
        "retention": retention,
        "kept": kept,
        "median_ms": round(statistics.median(times), 4),
        "min_ms": round(min(times), 4),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--compressors", default="vidcom2")
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="compressor option, e.g. execution=compiled_graph (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true", help="add rows to --out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    options = dict(pair.split("=", 1) for pair in args.option)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for compressor in args.compressors.split(","):
        for dtype_name in args.dtypes.split(","):
            for shape in SHAPES:
                row = bench(shape, getattr(torch, dtype_name), device, compressor, args.retention,
                            args.repeats, args.warmup, options)
                row.update(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                           command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]))
                rows.append(row)
                print(f"{compressor:8s} {dtype_name:9s} {shape}: {row['median_ms']:.3f} ms (kept {row['kept']})",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append = args.append and args.out.exists()
    with args.out.open("a" if append else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if not append:
            writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
