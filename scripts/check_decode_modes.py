"""Decode modes on a full-size random-weight model: ms per token and agreement with eager (GPU check).

    python scripts/check_decode_modes.py [llava_ov_7b | qwen2_vl_7b | ...] [--tokens 32] [--prompts 24] \
        [--dtypes float32,bfloat16] [--out decode_agreement.csv]

Per dtype and decode_mode (eager, static, compiled): the median decode ms/token over the prompts (the first,
compiling request of each mode untimed), and how the greedy ids of each prompt compare with eager's: how many
prompts give identical ids, and the mean and smallest length of the common prefix. Each prompt is its own
random video with its own question, so the prompts differ in content and length. Random weights give
near-tied logits, so bf16 rounding differences flip more tokens here than trained weights would.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava.bench.models import get_bench_model
from llava.model.compression import CompressionSpec
from llava.runtime import GenerationOptions

MODES = ("eager", "static", "compiled")


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def measure(
    llm: Any,
    mode: str,
    videos: list,
    questions: list[str],
    spec: CompressionSpec,
    sampling: Any,
    tokens: int,
    reference: list[list[int]],
) -> tuple[dict[str, Any], list[list[int]]]:
    """One decode mode over every prompt: its row, and its ids (the reference when it is eager's)."""
    generation = GenerationOptions(max_new_tokens=tokens, ignore_eos=True, decode_mode=mode)

    def ask(i: int) -> Any:
        return llm.answer_batch(
            [videos[i]], [questions[i]], compression=spec, generation=generation, sampling=sampling
        )[0]

    first = ask(0)  # compiles (compiled mode); untimed
    results = [ask(i) for i in range(len(videos))]
    ids = [r.output_ids for r in results]
    reference = reference or ids
    prefixes = [common_prefix(a, b) for a, b in zip(ids, reference, strict=True)]
    row = {
        "decode_mode": mode,
        "compressor": spec.compressor,
        "retention": spec.retention,
        "prompts": len(videos),
        "tokens": tokens,
        "decode_ms_per_token": round(statistics.median(r.timings["decode"] for r in results) * 1e3 / (tokens - 1), 2),
        "first_request_decode_s": round(first.timings["decode"], 2),
        "identical_sequences": sum(p == len(r) for p, r in zip(prefixes, reference, strict=True)),
        "mean_common_prefix": round(statistics.mean(prefixes), 2),
        "min_common_prefix": min(prefixes),
    }
    return row, ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="llava_ov_7b")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compressor", default="vidcom2")
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bench = get_bench_model(args.model)
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (args.frames, 384, 384, 3), dtype=np.uint8) for _ in range(args.prompts)]
    questions = [f"Describe the video, part {i}: {'what happens next? ' * (i % 5)}" for i in range(args.prompts)]
    spec, sampling = CompressionSpec(args.compressor, args.retention), bench.sampling(args.frames)
    rows = []
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        llm = bench.build("cuda", dtype, "sdpa")
        reference: list[list[int]] = []
        for mode in MODES:
            row, ids = measure(llm, mode, videos, questions, spec, sampling, args.tokens, reference)
            reference = reference or ids
            rows.append({"model": args.model, "dtype": dtype, **row})
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
        del llm
        torch.cuda.empty_cache()
    if args.out is not None:
        with args.out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
