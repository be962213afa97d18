"""Vectorised selection helpers the in-LLM methods share (FastV, PDrop, SparseVLM, HoliTom's inner merge)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

POSITION_RULES = ("auto", "compact", "inherit")  # auto: compact on 1-D positions, inherit on M-RoPE
ATTENTION_MODES = ("rows", "eager")  # rows from the layer's own q / k, or the authors' whole map


def top_visual(scores: torch.Tensor, visual: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(B, L) float32 scores, (B, L) bool video tokens, per-row counts -> (B, L) bool: each row's
    ``counts[b]`` highest-scoring video tokens (ties: the lower index, whatever the device)."""
    batch, length = scores.shape
    k = max(counts) if len(counts) else 0
    keep = torch.zeros_like(visual)
    if k == 0:
        return keep
    ranked = scores.masked_fill(~visual, float("-inf"))
    # a stable descending sort breaks ties by index on every device (topk does not promise it)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
    wanted = torch.arange(k, device=scores.device)[None] < torch.tensor(list(counts), device=scores.device)[:, None]
    return keep.scatter(1, order, wanted) & visual


def cap_counts(counts: Sequence[int], available: Sequence[int]) -> tuple[int, ...]:
    """Counts capped at what each row still has (a schedule never keeps more than is there)."""
    return tuple(min(int(c), int(a)) for c, a in zip(counts, available, strict=True))
