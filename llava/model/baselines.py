"""Reference compressors with the registry's signature: keep all, random and uniform per frame.

Both baselines give every frame the same budget k = max(1, round_half_even(R * P)), so they match
VidCom2's total on average and differ only in which tokens they keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.model.method_api import Method, NoOptions, selecting
from llava.model.vidcom2 import check_video_features


@dataclass(frozen=True)
class RandomOptions:
    """seed: of the CPU generator the draw comes from (the same tokens on every device)."""

    seed: int = 0


def uniform_budget(retention: float, tokens_per_frame: int) -> int:
    """k = max(1, round_half_even(R * P)) tokens per frame."""
    return max(1, min(tokens_per_frame, round(retention * tokens_per_frame)))  # round() is half-even


def _mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def keep_all_indices(features: torch.Tensor, retention: float, options: NoOptions | None = None) -> torch.Tensor:
    """Every token: arange(F*P). Retention is checked but ignored."""
    check_video_features(features, retention)
    n_frames, per_frame, _ = features.shape
    return torch.arange(n_frames * per_frame, device=features.device)


def random_keep_indices(features: torch.Tensor, retention: float, options: RandomOptions | None = None) -> torch.Tensor:
    """k random tokens of every frame, drawn from a CPU generator seeded by ``options.seed`` (0).

    The draw happens on the CPU so that a seed gives the same tokens on every device.
    """
    check_video_features(features, retention)
    n_frames, per_frame, _ = features.shape
    k = uniform_budget(retention, per_frame)
    generator = torch.Generator().manual_seed((options or RandomOptions()).seed)
    noise = torch.rand(n_frames, per_frame, generator=generator)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    indices = _mask_to_indices(ranks < k)
    if features.is_cuda:  # an asynchronous copy from pinned memory: no stall of the GPU stream
        return indices.pin_memory().to(features.device, non_blocking=True)
    return indices.to(features.device)


def uniform_keep_indices(features: torch.Tensor, retention: float, options: NoOptions | None = None) -> torch.Tensor:
    """k evenly spaced tokens of every frame: positions floor((j + 1/2) * P / k), j < k."""
    check_video_features(features, retention)
    n_frames, per_frame, _ = features.shape
    k = uniform_budget(retention, per_frame)
    device = features.device  # built where the features are: no host-to-device copy
    cols = ((torch.arange(k, dtype=torch.float64, device=device) + 0.5) * per_frame / k).floor().to(torch.int64)
    rows = torch.arange(n_frames, dtype=torch.int64, device=device)[:, None] * per_frame
    return (rows + cols[None, :]).reshape(-1)



NONE = Method("none", NoOptions, select=selecting(keep_all_indices), summary="keep every token")
RANDOM = Method("random", RandomOptions, select=selecting(random_keep_indices), summary="k random tokens per frame")
UNIFORM = Method(
    "uniform", NoOptions, select=selecting(uniform_keep_indices), summary="k evenly spaced tokens per frame"
)
