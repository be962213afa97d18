"""What execution=compiled costs and changes against the unfused modes (a GPU investigation, not a test).

    python scripts/check_compiled_selection.py [--videos 8]

On random bf16 features of LLaVA-like shapes, prints per shape:
- the first call's seconds (compilation, capture) and the memory the selection keeps between requests,
  for execution=compiled (direct launches: nothing), compiled_graph and cuda_graph;
- how many tokens the compiled selection keeps differently from eager over ``--videos`` random videos,
  and the relative float64 score gap between each such frame's last kept token and its first dropped one
  (a swap at a gap of float32 rounding is a tie broken the other way, not a different method).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from llava.model import vidcom2 as core
from llava.model.vidcom2 import VidCom2Config, similarity_to_centres, token_scores

SHAPES = ((1, 8, 196, 3584), (4, 8, 196, 3584), (1, 32, 196, 3584))


def settled_mib() -> tuple[float, float]:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20


def boundary_gaps(videos: torch.Tensor, eager: torch.Tensor, other: torch.Tensor) -> list[float]:
    """Relative gap between the k-th and (k+1)-th lowest float64 score of each frame where the masks differ."""
    cfg = VidCom2Config()
    v, f, _ = similarity_to_centres(videos.double(), VidCom2Config(score_dtype="model"))
    scores = token_scores(v, f, cfg)
    gaps = []
    for b, t in {(b, t) for b, t, _ in (eager != other).nonzero().tolist()}:
        row = scores[b, t].sort().values
        k = int(eager[b, t].sum())
        gaps.append(float((row[k] - row[k - 1]) / row[k].abs()))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=8, help="random videos (batches) per shape")
    args = parser.parse_args()
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        for execution in ("compiled", "compiled_graph", "cuda_graph"):
            core.release_selection_graphs()
            allocated, reserved = settled_mib()
            start = time.perf_counter()
            core.vidcom2_keep_masks(x, 0.25, {"execution": execution})
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            now_allocated, now_reserved = settled_mib()
            print(f"{shape} {execution:14s} first call {first:5.1f} s; kept between requests: "
                  f"+{now_allocated - allocated:.1f} MiB allocated, +{now_reserved - reserved:.1f} MiB reserved")
        differ = total = 0
        gaps: list[float] = []
        for seed in range(args.videos):
            g = torch.Generator(device="cuda").manual_seed(seed)
            scale = 1 + torch.rand(shape[-1], device="cuda", generator=g)
            videos = (torch.randn(shape, device="cuda", generator=g) * scale).bfloat16()
            eager = core.vidcom2_keep_masks(videos, 0.25, {"execution": "eager"})
            compiled = core.vidcom2_keep_masks(videos, 0.25, {"execution": "compiled"})
            differ += int((compiled != eager).sum())
            total += eager.numel()
            gaps += boundary_gaps(videos, eager, compiled)
        print(f"{shape} compiled vs eager over {args.videos} random videos: {differ} of {total} tokens differ; "
              f"relative score gaps there: {', '.join(f'{g:.1e}' for g in gaps) or '-'}")


if __name__ == "__main__":
    main()
