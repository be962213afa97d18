"""Where the VidCom2 selection op spends its time on a GPU (a GPU investigation, not a test).

    python scripts/profile_compress_op.py [--frames 32 --tokens 196 --dim 3584]

Prints, per execution mode (compiled = the default, compiled_graph, cuda_graph, eager): the median ms of
``vidcom2_keep_indices`` and of a batch of 4 such videos selected together against one by one; then the
kernels of the unfused and of the compiled selection by GPU time (the floor a graph replay cannot go
below), and whether the compiled masks equal the eager ones. Timings are of the op alone on an idle
GPU, so a mode that launches many kernels pays its host time here; in the pipelines the op is queued
behind the vision tower, which hides that (see the README).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from llava.bench.timing import time_call_ms
from llava.model.vidcom2 import (
    EXECUTIONS,
    VidCom2Config,
    _mask_from_scores,
    _selection,
    vidcom2_keep_indices,
    vidcom2_keep_masks,
)


def median_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_call_ms(fn, "cuda") for _ in range(repeats))


def kernel_table(label: str, fn) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / 10
    print(f"GPU kernel time per call ({label}): {total / 1e3:.3f} ms over {sum(e.count for e in events) // 10} kernels")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:40]:
        print(f"  {e.device_time_total / 10 / 1e3:7.3f} ms  x{e.count // 10:<3d} {e.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=3584)
    args = parser.parse_args()
    x = torch.randn(args.frames, args.tokens, args.dim, device="cuda").bfloat16()
    batch = x[None]  # the core selects batches of same-shape videos: (B, F, P, D)
    four = [torch.randn_like(x) for _ in range(4)]
    for execution in EXECUTIONS:
        opts = {"execution": execution}
        single = median_ms(lambda o=opts: vidcom2_keep_indices(x, 0.25, o))
        together = median_ms(lambda o=opts: vidcom2_keep_masks(four, 0.25, o))
        alone = median_ms(lambda o=opts: [vidcom2_keep_masks([v], 0.25, o) for v in four])
        print(f"{execution:14s} keep_indices {single:.3f} ms; 4 videos together {together:.3f} ms, "
              f"one by one {alone:.3f} ms")

    retention = torch.full((), 0.25, dtype=torch.float64, device="cuda")
    cfg = VidCom2Config(execution="eager")
    kernel_table("unfused", lambda: _mask_from_scores(batch, retention, cfg, None))
    compiled = _selection(VidCom2Config(execution="compiled"))
    kernel_table("compiled", lambda: compiled(batch, retention))
    same = torch.equal(compiled(batch, retention), _mask_from_scores(batch, retention, cfg, None))
    print(f"compiled mask identical to eager: {same}")


if __name__ == "__main__":
    main()
