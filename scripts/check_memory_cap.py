"""Does a compressed request fit in the memory of the uncompressed one? (the target: peak memory never above)

    python scripts/check_memory_cap.py --model qwen2_vl_7b --frames 32 --attn sdpa_varlen --preprocess-device cuda \
        --compressors vidcom2,random,uniform --out results/memory_cap_h100.csv

Peak *reserved* memory counts the caching allocator's free cached blocks too, so it can exceed the uncompressed
run's by a segment the allocator opened while still holding free ones (see scripts/trace_reserved_memory.py)
without the request needing that memory. This script asks the question directly. It runs the uncompressed
case, takes its peak reserved memory as a hard limit on this process's GPU memory
(`torch.cuda.set_per_process_memory_fraction`: at the limit the allocator first releases its free cached
blocks, then raises OutOfMemoryError), runs each compressed case and the uncompressed one again under that
limit, and writes one row per case: whether it completed, its peak memory and times with and without the
limit. Timings are `vidcom2 bench`'s (CUDA events per stage, median of the repeats after warm-up).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from llava.bench.efficiency import STAGES, Case, build_bench_llm, run_case, ttft_seconds, write_bench_video
from llava.bench.models import get_bench_model
from llava.model.vidcom2 import release_selection_graphs

FIELDS = (
    "model", "compressor", "retention", "frames", "batch", "cap_mib", "completed", "error",
    "peak_allocated_mib", "peak_reserved_mib", "uncapped_peak_allocated_mib", "uncapped_peak_reserved_mib",
    "ttft_ms", "uncapped_ttft_ms", "end_to_end_ms", "uncapped_end_to_end_ms", "visual_tokens_after",
    "gpu", "torch", "transformers", "attn_implementation", "dtype", "preprocess_device", "cuda_alloc_conf",
    "command",
)  # fmt: skip


def _ttft_ms(stages: dict[str, float]) -> float:
    return 1e3 * ttft_seconds(stages)


def _total_ms(stages: dict[str, float]) -> float:
    return 1e3 * sum(stages[s] for s in STAGES)


def capped(cap_mib: float, device: torch.device) -> float:
    """The per-process memory fraction that limits reserved memory to ``cap_mib``."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = cap_mib * 2**20 / total
    if not 0 < fraction <= 1:
        raise ValueError(f"cap {cap_mib:.0f} MiB is not within the GPU's {total / 2**20:.0f} MiB")
    return fraction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2_vl_7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--compressors", default="vidcom2,random,uniform")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--preprocess-device", default=None, help="Qwen only: where the HF video processor runs")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_memory_cap.py needs a CUDA GPU (it limits the CUDA caching allocator)")

    model = get_bench_model(args.model)
    llm, env = build_bench_llm(model, "cuda", args.dtype, args.attn, preprocess_device=args.preprocess_device)
    device = torch.device(llm.device)
    video = write_bench_video(Path(tempfile.mkdtemp()) / f"bench_{args.frames}f.mp4", args.frames)
    command = "python scripts/check_memory_cap.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    def run(name: str) -> tuple[dict[str, float], Any, float, float]:
        case = Case(name, 1.0 if name == "none" else args.retention, args.frames, args.batch)
        try:
            stages, result, alloc, reserved, _ = run_case(
                llm, model, video, case, decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=1
            )
        finally:
            release_selection_graphs()
        return stages, result, alloc, reserved

    base_stages, _, base_alloc, cap_mib = run("none")
    print(f"uncompressed: peak reserved {cap_mib:.0f} MiB, allocated {base_alloc:.0f} MiB -> the cap", flush=True)
    rows = []
    for name in ["none", *[c for c in args.compressors.split(",") if c != "none"]]:
        stages, result, alloc, reserved = (base_stages, None, base_alloc, cap_mib) if name == "none" else run(name)
        row: dict[str, Any] = {
            "model": model.name, "compressor": name, "retention": 1.0 if name == "none" else args.retention,
            "frames": args.frames, "batch": args.batch, "cap_mib": round(cap_mib, 1),
            "uncapped_peak_allocated_mib": round(alloc, 1), "uncapped_peak_reserved_mib": round(reserved, 1),
            "uncapped_ttft_ms": round(_ttft_ms(stages), 3), "uncapped_end_to_end_ms": round(_total_ms(stages), 3),
            **env, "command": command,
        }  # fmt: skip
        torch.cuda.set_per_process_memory_fraction(capped(cap_mib, device), device)
        try:
            stages, result, alloc, reserved = run(name)
            row |= {
                "completed": True, "error": "", "peak_allocated_mib": round(alloc, 1),
                "peak_reserved_mib": round(reserved, 1), "ttft_ms": round(_ttft_ms(stages), 3),
                "end_to_end_ms": round(_total_ms(stages), 3), "visual_tokens_after": result.visual_tokens_after,
            }  # fmt: skip
        except torch.OutOfMemoryError as error:
            row |= {"completed": False, "error": str(error).splitlines()[0][:200]}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        print({k: row.get(k, "") for k in FIELDS[:16]}, flush=True)
        rows.append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
