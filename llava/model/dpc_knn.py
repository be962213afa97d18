"""DPC-kNN cluster centres (density peaks over k nearest neighbours), shared by FastVID and HoliTom.

For tokens x (N, D): d_ij = |x_i - x_j| / sqrt(D) (float32); density rho_i = exp(-mean of d^2 over the
k nearest, self included); delta_i = distance to the nearest token of higher density (the densest
token: the largest distance of all); centres = the ``count`` tokens of highest rho * delta.

Upstream breaks density ties with uniform noise U(0, 1e-6) from an unseeded generator, so its centres
change from run to run. Ours, by default, ranks equal densities by index (lower index = denser) and
equal scores by index, deterministically; pass ``generator`` to add upstream's noise from a seeded one.
The noise is below float32 resolution near rho = 1, so it decides only near-ties either way.
"""

from __future__ import annotations

import torch

from llava.model.float32_products import float32_matmul


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) or batched (B, N, D) -> (N, N) / (B, N, N) float32 Euclidean distances / sqrt(D).

    Each token's distance to itself is exactly 0: above 25 rows torch.cdist takes a matmul form whose
    rounding leaves ~1e-4 there, which alone would rank the densities at k = 1."""
    x = x.float()
    dist = torch.cdist(x, x) if x.dim() == 3 else torch.cdist(x[None], x[None])[0]
    return (dist / (x.shape[-1] ** 0.5)).masked_fill(torch.eye(x.shape[-2], dtype=torch.bool, device=x.device), 0.0)


def gram_distances(x: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) float32 |x_i - x_j| / sqrt(D) from |x_i|^2 + |x_j|^2 - 2 x_i . x_j.

    torch.cdist's matmul form (the one it takes above 25 rows), with the product in float32 from the
    input dtype (:func:`float32_matmul`), and each token's distance to itself exactly 0, as the pair-by-pair
    form gives (the matmul form leaves rounding there, which alone would rank densities at k = 1).
    ``gram``: the (B, N, N) products computed by the caller; the squared norms are then its diagonal."""
    if gram is None:
        square, gram = x.float().square().sum(dim=-1), float32_matmul(x, x.mT)
    else:
        square = gram.diagonal(dim1=1, dim2=2)
    dist = (square[:, :, None] + square[:, None, :] - 2 * gram).clamp_min(0).sqrt() / (x.shape[-1] ** 0.5)
    self_pair = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return dist.masked_fill(self_pair, 0.0)


def k_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """(..., M) -> (..., k) the k smallest along the last axis, ascending, with multiplicity (= topk's)."""
    steps = torch.arange(values.shape[-1], device=values.device)
    taken = torch.zeros_like(values, dtype=torch.bool)
    out = []
    for _ in range(k):  # k is small (4 upstream): one masked minimum per neighbour
        left = values.masked_fill(taken, torch.inf)
        out.append(left.amin(dim=-1))
        taken = taken | (steps == left.argmin(dim=-1, keepdim=True))
    return torch.stack(out, dim=-1)


def stable_top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest values along the last axis, ties to the lower index, in rank order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :count]


def dpc_scores(
    x: torch.Tensor, k: int, *, distances: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, D) tokens -> (N,) float32 rho * delta (higher = better centre). ``k`` is clamped to N."""
    n = x.shape[0]
    dist = pairwise_distances(x) if distances is None else distances
    k = max(1, min(int(k), n))
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    if generator is not None:
        density = density + torch.rand(n, generator=generator).to(density.device) * 1e-6
    # rank 0 = densest; equal densities rank by index, so "higher density" is a strict total order
    order = stable_top(density, n)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
    denser = rank[None, :] < rank[:, None]  # denser[i, j]: j is denser than i
    far = dist.max()
    delta = torch.where(denser, dist, far).min(dim=-1).values
    return density * delta


def dpc_centres(
    x: torch.Tensor,
    k: int,
    count: int,
    *,
    distances: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, D) -> (count,) indices of the DPC-kNN centres, in decreasing score (ties: lower index first)."""
    if not 0 <= count <= x.shape[0]:
        raise ValueError(f"dpc_centres: asked for {count} centres among {x.shape[0]} tokens")
    return stable_top(dpc_scores(x, k, distances=distances, generator=generator), count)
