"""HoliTom's selection after the DP as ONE function of static shapes: what ``execution="compiled"`` compiles.

Why: after its one host synchronisation HoliTom knows every window and budget, but the loop-free eager
build still launches 60-160 small kernels whose shapes follow the plan (the sets' sizes, the windows'
lengths), so torch.compile would recompile for every video. Here every shape depends only on the video's
(F, P, D), the knobs and R; the plan travels as data:

- per frame (F,): its window's first frame, the run length its static positions have (F: none), its
  dominant count, its contextual count, and its static set slot (S: none);
- per static set slot (S = F // 2, the most windows of >= 2 frames; 0 when ``max_window`` is 1): the
  window's first frame, its length - 1 and its cluster count (0: an unused slot);
- with ``seed``: the sets' density noise, the i-th value of a set for its i-th member.

Token sets keep their P positions with a validity mask (members in position order, as the eager
path lists them): S static sets (the window means at every position, members = its static positions)
and, with ``contextual_ratio`` > 0, F contextual sets (a frame's tokens, members = its dynamic tokens
that are not dominant). The output is padded to a static length (R * N + F + S + 2 at most; N = F * P)
with the kept sources ascending first; the caller knows the true count from the plan and slices.

Arithmetic (against the eager build of :mod:`llava.model.holitom`): products of bf16 / fp16 tokens go
through :func:`llava.model.float32_products.float32_matmul` (exact products, float32 sums), and so do
those of float32 tokens on CUDA (the float32 window means, the default) after an exact split into three
bf16 parts (:func:`split_bf16`; float32 GEMMs would take most of the time otherwise). DPC distances are
sqrt(max(|x|^2 + |y|^2 - 2 x.y, 0)) / sqrt(D) for every set (the squares from the Gram's diagonal), the
form torch.cdist takes above 25 rows, so a set of at most 25 tokens, which the eager build measures pair
by pair, rounds differently here; a token's distance to itself is 0 exactly (the matmul form leaves
rounding noise there, which would decide the densities when k = 1). Window means are one matmul with the
0/1 window masks (float32 sums of the exact values, then / L). Merge sums are one-hot matmuls
(deterministic, in float32; the eager build adds in the merge dtype with scatter_add_, atomic on CUDA).
All of these equal the eager values up to the order of float32 sums (and, with ``score_dtype="model"``,
the merge rounds to the model dtype once where the eager build rounds every step), so a near tie may go
another way.
"""

from __future__ import annotations

import torch

from llava.model.float32_products import float32_matmul


def static_slots(n_frames: int, max_window: int) -> int:
    """S: the static set slots, one per possible window of >= 2 frames (F // 2; none when windows are single)."""
    return n_frames // 2 if min(n_frames, max_window) >= 2 else 0


def output_length(n_frames: int, per_frame: int, retention: float) -> int:
    """The padded output length: an upper bound of K = sum over windows of L * ceil(n_d r') + round(n_s r').

    r' (N - total_reduced) = min(R N, N - total_reduced), so K < R N + F (the ceils) + S / 2 (the rounds);
    2 more absorb the float rounding of r'."""
    total = n_frames * per_frame
    return min(total, int(retention * total) + n_frames + static_slots(n_frames, n_frames) + 2)


def packed_length(n_frames: int, per_frame: int, n_slots: int, seeded: bool) -> int:
    """Length of the packed plan: 5 per-frame rows, 3 per-slot rows, and the noise rows when seeded."""
    return 5 * n_frames + 3 * n_slots + ((n_slots + n_frames) * per_frame if seeded else 0)


def splits(x: torch.Tensor) -> bool:
    """Whether products of ``x`` go through its three-bf16 split: float32 on CUDA (see :func:`split_bf16`)."""
    return x.dtype == torch.float32 and x.is_cuda


def _bf16_part(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float32 values rounded to bf16 (nearest even), by bit arithmetic: torch.compile elides a
    float32 -> bf16 -> float32 cast pair inside a fused kernel, which would leave the value unrounded."""
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536: the int32 mask 0xFFFF0000
    return bits.view(torch.float32)


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) float32 -> (B, 3N, D) bf16 [hi; mid; lo] per batch, hi + mid + lo == x exactly.

    Why: a float32 value has 24 significant bits, bf16 8, and each remainder is exact in float32, so three
    bf16 parts hold it exactly (for finite values away from float32's overflow). Products of the parts
    through a bf16 GEMM with float32 output are exact, so a float32 product of such tensors costs a few
    tensor-core GEMMs instead of one float32 GEMM (H200: ~15x slower per GEMM, and its small batched
    shapes here occupy half the SMs). The parts are rounded by :func:`_bf16_part`, so the final casts
    are exact.
    """
    hi = _bf16_part(x)
    rest = x - hi
    mid = _bf16_part(rest)
    return torch.cat([hi, mid, rest - mid], dim=1).to(torch.bfloat16)


def _gram(x: torch.Tensor, parts: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) float32 x_i . x_j: one GEMM, or from the split ``parts`` of a float32 x.

    Split: hi.hi + (hi.mid + mid.hi) + (hi.lo + lo.hi + mid.mid), the terms down to 2^-16 of the product
    (the dropped mid.lo, lo.mid, lo.lo are below 2^-24 of it, float32's own rounding), small ones first."""
    if parts is None:
        return float32_matmul(x, x.transpose(1, 2))  # exact products of half inputs
    n = x.shape[1]
    hi, mid, lo = parts[:, :n], parts[:, n : 2 * n], parts[:, 2 * n :]
    cross = float32_matmul(hi, mid.transpose(1, 2))
    low = float32_matmul(hi, lo.transpose(1, 2))
    small = (low + low.transpose(1, 2)) + float32_matmul(mid, mid.transpose(1, 2))
    return float32_matmul(hi, hi.transpose(1, 2)) + ((cross + cross.transpose(1, 2)) + small)


def _distances(x: torch.Tensor, parts: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) float32 |x_i - x_j| / sqrt(D) by the matmul form, 0 on the diagonal.

    The squared norms are the Gram's diagonal, so both terms come from the same stored operands (fused
    code could otherwise square values that were never rounded to the half dtype the GEMM reads)."""
    n, dim = x.shape[1], x.shape[2]
    gram = _gram(x, parts)
    square = gram.diagonal(dim1=1, dim2=2)  # (B, N)
    dist = (square[:, :, None] + square[:, None, :] - 2.0 * gram).clamp_min(0.0).sqrt() / (dim**0.5)
    return dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)


def ahead(values: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (..., N, N) bool: [..., i, j] = value j comes before value i in a stable descending sort
    (larger, or equal at a lower index). Why: ranks as comparisons, one fused reduction instead of a sort
    and a scatter, and "denser than" directly."""
    index = torch.arange(values.shape[-1], device=values.device)
    before, after = values[..., None, :], values[..., :, None]
    return (before > after) | ((before == after) & (index[None, :] < index[:, None]))


def top(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(..., N) values, (...) counts -> (..., N) bool: the count first of a stable descending sort (ties: the
    lower index), as torch.sort(values, descending=True, stable=True).indices[..., :count] would list."""
    return ahead(values).sum(dim=-1) < count[..., None]


def cluster_masked(
    x: torch.Tensor,
    valid: torch.Tensor,
    count: torch.Tensor,
    knn: int,
    beta: float,
    dtype: torch.dtype,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN and merge of B masked sets: (B, N, D) tokens -> (B, N) centre masks, (B, N, D) merged values.

    valid (B, N): the members of each set (in position order; a set with count 0 takes no part);
    count (B,) int64: its centres; k = min(knn, count); noise (B, N) float32: set b's i-th value goes to
    its i-th member (upstream's density noise is 1e-6 times it). The rule of
    :func:`llava.model.holitom._dpc_centres` and :func:`llava.model.holitom._merge`: density ties and
    score ties go to the lower index, a member joins its nearest centre (ties: the lower index), a centre
    with members becomes beta * centre + (1 - beta) * mean(members) in ``dtype``. Rows that are not
    centres hold garbage.
    """
    batch, n, _ = x.shape
    positions = torch.arange(n, device=x.device)
    valid = valid & (count > 0)[:, None]
    parts = split_bf16(x) if splits(x) else None
    dist = _distances(x, parts)
    pairs = valid[:, :, None] & valid[:, None, :]
    widest = min(knn, n)
    nearest = torch.topk(torch.where(pairs, dist, torch.inf), k=widest, dim=-1, largest=False).values
    ks = count.clamp(max=knn)
    density = torch.zeros(batch, n, device=x.device)
    for k in range(1, widest + 1):  # one pass per possible k (a set with fewer centres than knn has k < knn)
        rho = torch.exp(-(nearest[..., :k] ** 2).mean(dim=-1))
        density = torch.where(ks[:, None] == k, rho, density)
    if noise is not None:
        member = (valid.long().cumsum(dim=1) - 1).clamp_min(0)  # the i-th member of its set
        density = density + torch.gather(noise, 1, member) * 1e-6
    density = torch.where(valid, density, -1.0)
    # equal densities rank by index, so "denser" is a strict total order
    denser = ahead(density)  # denser[b, i, j]: j is denser than i
    far = torch.where(pairs, dist, 0.0).amax(dim=(1, 2))
    delta = torch.where(denser, dist, far[:, None, None]).min(dim=-1).values
    centre = top(torch.where(valid, density * delta, -torch.inf), count)
    # every other member joins the nearest centre: one-hot (B, N members, N centres), sums by matmul
    target = torch.where(centre[:, None, :], dist, torch.inf).argmin(dim=-1)  # (B, N), first minimum
    joins = valid & ~centre
    onehot = (target[:, :, None] == positions) & joins[:, :, None]
    pick = onehot.transpose(1, 2)  # (B, N centres, N members), 0 / 1: exact in any dtype
    if parts is None:
        sums = float32_matmul(pick.to(x.dtype), x)
    else:  # the three parts summed in one float32 accumulator
        sums = float32_matmul(pick.to(torch.bfloat16).repeat(1, 1, 3), parts)
    sums = sums.to(dtype)  # (B, N, D)
    members = onehot.sum(dim=1)[:, :, None].to(dtype)
    values = x.to(dtype)
    merged = beta * values + (1.0 - beta) * (sums / members.clamp(min=1))
    return centre, torch.where(members > 0, merged, values)


def static_selection(
    features: torch.Tensor,
    importance: torch.Tensor,
    run: torch.Tensor,
    packed: torch.Tensor,
    n_slots: int,
    out_length: int,
    knn: int,
    beta: float,
    contextual: bool,
    seeded: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection from the packed plan: (out_length,) sources, ascending first, and (out_length, D) values.

    features (F, P, D); importance (F, P); run (F-1, P) int64 run lengths (see
    :func:`llava.model.holitom.static_run_lengths`); packed: float64 (see :func:`packed_length`; integers
    exact), in the layout of the module docstring. Python arguments are compile constants and depend only
    on the shapes and knobs: S = ``n_slots``, ``out_length``, knn, beta, whether contextual sets exist and
    whether noise is packed, the merge ``dtype``. The first K outputs are the selection (K from the plan).
    """
    n_frames, per_frame, dim = features.shape
    device = features.device
    total = n_frames * per_frame
    positions = torch.arange(total, device=device)
    ints = packed[: 5 * n_frames + 3 * n_slots].long()
    frame_start, frame_need, frame_dominant, frame_contextual, frame_slot = ints[: 5 * n_frames].view(5, n_frames)
    slot_start, slot_need, slot_count = ints[5 * n_frames :].view(3, n_slots)
    noise = packed[5 * n_frames + 3 * n_slots :].float().view(n_slots + n_frames, per_frame) if seeded else None
    run = torch.cat([run, run.new_zeros(1, per_frame)])  # (F, P): a last row no position is static in

    # each frame's static positions (its window's) and dominant tokens (top importance among the dynamic ones)
    static = run.index_select(0, frame_start) >= frame_need[:, None]  # (F, P)
    dominant = top(torch.where(static, -torch.inf, importance.float()), frame_dominant)  # ties: the lower index
    keep = dominant
    flat = features.reshape(total, dim)
    static_centre = contextual_centre = static_merged = contextual_merged = None
    if n_slots:
        # slot j: the means of its window's frames at every position, members = its static positions
        members = run.index_select(0, slot_start) >= slot_need[:, None]  # (S, P)
        frames = torch.arange(n_frames, device=device)[None]
        window = (frames >= slot_start[:, None]) & (frames <= (slot_start + slot_need)[:, None])  # (S, F)
        sums = float32_matmul(window.to(features.dtype), features.reshape(n_frames, per_frame * dim))
        means = (sums / (slot_need + 1).float()[:, None]).to(dtype).view(n_slots, per_frame, dim)
        slot_noise = None if noise is None else noise[:n_slots]
        centre, static_merged = cluster_masked(means, members, slot_count, knn, beta, dtype, slot_noise)
        static_centre = torch.cat([centre, centre.new_zeros(1, per_frame)]).index_select(0, frame_slot)  # (F, P)
        keep = keep | static_centre
    if contextual:
        # frame t: its dynamic tokens that are not dominant, clustered into its contextual count
        rest = ~(static | dominant)
        frame_noise = None if noise is None else noise[n_slots:]
        contextual_centre, contextual_merged = cluster_masked(
            features, rest, frame_contextual, knn, beta, dtype, frame_noise
        )
        keep = keep | contextual_centre

    # compaction: the j-th kept token (ascending) goes to slot j + 1, everything else to slot 0, a sink
    marks = keep.reshape(-1).long()
    slot = marks.cumsum(0) * marks
    source = torch.zeros(out_length + 1, dtype=torch.int64, device=device).scatter_(0, slot, positions)[1:]
    values = flat.index_select(0, source).to(dtype)
    if static_merged is not None:
        row = frame_slot.index_select(0, source // per_frame).clamp(max=n_slots - 1) * per_frame + source % per_frame
        is_centre = static_centre.reshape(-1).index_select(0, source)
        picked = static_merged.reshape(n_slots * per_frame, dim).index_select(0, row)
        values = torch.where(is_centre[:, None], picked, values)
    if contextual_merged is not None:
        is_centre = contextual_centre.reshape(-1).index_select(0, source)
        picked = contextual_merged.reshape(total, dim).index_select(0, source)
        values = torch.where(is_centre[:, None], picked, values)
    return source, values
