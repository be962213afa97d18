"""Where the VidCom2 selection op spends its time on a GPU (issue 2/6 investigation, not a test).

    python scripts/profile_compress_op.py [--frames 32 --tokens 196 --dim 3584]

Prints: eager vs CUDA-graph median ms; a batch of 4 such videos selected together against one by
one; the eager kernels by total GPU time (the floor a graph replay cannot go below); and, for
comparison, torch.compile of the same function (checked for identical masks) - what fusing the ~60
kernels would buy.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from llava.bench.timing import time_call_ms
from llava.model.vidcom2 import VidCom2Config, _mask_from_scores, vidcom2_keep_indices, vidcom2_keep_masks


def median_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_call_ms(fn, "cuda") for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=3584)
    args = parser.parse_args()
    x = torch.randn(args.frames, args.tokens, args.dim, device="cuda").bfloat16()
    batch = x[None]  # the core selects batches of same-shape videos: (B, F, P, D)
    eager_cfg = {"execution": "eager"}
    print(f"eager keep_indices  {median_ms(lambda: vidcom2_keep_indices(x, 0.25, eager_cfg)):.3f} ms")
    print(f"graph keep_indices  {median_ms(lambda: vidcom2_keep_indices(x, 0.25)):.3f} ms")
    four = [torch.randn_like(x) for _ in range(4)]
    together = median_ms(lambda: vidcom2_keep_masks(four, 0.25))
    alone = median_ms(lambda: [vidcom2_keep_masks([v], 0.25) for v in four])
    print(f"graph masks, 4 videos together {together:.3f} ms, one by one {alone:.3f} ms")
    cfg = VidCom2Config()
    print(f"eager mask only     {median_ms(lambda: _mask_from_scores(batch, 0.25, cfg, None)):.3f} ms")

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            _mask_from_scores(batch, 0.25, cfg, None)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / 10
    print(f"GPU kernel time per call (eager): {total / 1e3:.3f} ms over {sum(e.count for e in events) // 10} kernels")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:40]:
        print(f"  {e.device_time_total / 10 / 1e3:7.3f} ms  x{e.count // 10:<3d} {e.key[:90]}")

    reference = _mask_from_scores(batch, 0.25, cfg, None)
    for mode in ("default", "reduce-overhead"):
        try:
            compiled = torch.compile(lambda t: _mask_from_scores(t, 0.25, cfg, None), mode=mode, dynamic=False)
            same = torch.equal(compiled(batch), reference)
            print(f"compile[{mode}] mask  {median_ms(lambda c=compiled: c(batch)):.3f} ms  identical={same}")
        except Exception as exc:  # report, do not hide: this is an experiment
            print(f"compile[{mode}] failed: {type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
