"""HoliTom's outer-LLM stage ("HoliTom w/o M"): temporal windows by DP, static merging, dynamic selection.

What it does, per video of F frames x P tokens (after projector and pooling):
1. s[t, m] = cosine of token m in frames t and t+1 (L2-normalised inputs).
2. A window [u, v] of frames removes G(u, v) = (v - u) * #{m : s[t, m] > tau for every t in [u, v-1]}
   tokens (each static position keeps one vector instead of v - u + 1). A DP over frames picks the
   partition into windows (at most ``max_window`` frames) that removes the most; total_reduced = its gain.
3. The budget left after that removal is spread as r' = min(R / ((N - total_reduced) / N), 1).
4. Static positions of a window: their vectors averaged over the window's frames, then clustered by
   DPC-kNN into round(n_s * r') centres. Dynamic tokens, per frame: ceil(n_d * r') kept, of which
   round(n_keep * (1 - contextual_ratio)) are the top by importance (ViT received attention) and the
   rest DPC-kNN centres of the other dynamic tokens. A centre becomes beta * centre + (1 - beta) *
   mean(its members), members = the non-centre tokens nearest to it by the DPC distance.
With the defaults (contextual_ratio 0) the dynamic part is pure top-k by attention; only static
tokens are merged. R maps onto the one knob the authors expose (their RETAIN_RATIO); the achieved
retention is close to R but not exact (ceil per frame, round per window), and below R when the static
averaging alone removes more than 1 - R (r' is capped at 1). No retention floor: every R in (0, 1] is
accepted (R = 1 still averages static tokens; the registry treats it as identity), and only a video
with no dynamic token at a tiny R can round to nothing, which raises.

HoliTom's inner merge ("HoliTom M": at LLM layer k, the visual tokens with the lowest last-token
attention are averaged into their most similar kept token) is a separate in-LLM stage, not this module.

Positions (our rule; upstream LLaVA-OV has none beyond the output order): a static token or static
centre at spatial position m of window [u, v] takes the source u * P + m (the window's FIRST frame);
a dynamic token or dynamic centre takes its own flat index. Sources are unique (a position static in a
window is dynamic in none of its frames) and the output is in ascending source order.

Execution (the outputs of a window-by-window loop, bit for bit on the CPU): every size the work needs
is bounded by the shapes alone, so the whole selection is queued without waiting on the device. The DP
runs on the device too: the longest path through the frames (edge weights = the windows' gains) by
max-plus squaring of the (F+1) x (F+1) edge matrix, ties resolved afterwards exactly as the host loop
does (:func:`partition`, kept as the reference), the backtrack by pointer doubling. Budgets, the dominant
top-k of every frame, the static means of every multi-frame window (at most F div 2; a 0/1 window matrix
times the frames, summed in the order torch.mean sums them on the CPU), all static and contextual token
sets in ONE padded DPC-kNN merge (a set of at most 25 tokens keeps torch.cdist's pair-by-pair distances,
as it would alone) and the output (sized R * N + 3F / 2, a bound on the kept count) follow. The kept
count, the finite flag and the windows are copied to the host as soon as the budgets exist
(:class:`llava.model.method_api.HostCopy`) and read after everything else is queued: the one host read
waits for the GPU to reach the copy, not for the clustering behind it. The finite check reads the sum of
the token norms and of the importance; only when that is not finite (NaN / Inf, or huge finite values
overflowing) are the inputs checked element by element (a second read, on that path only). The merge
sums are deterministic on CUDA too (index_put_ with accumulate, which sorts; the CPU's scatter_add_ is
sequential). ``seed`` draws its noise on the CPU in upstream's order, after the read, then clusters.

Differences from the original (cokeshao/HoliTom, LLaVA-OV):
- Output order: upstream emits, per window, [static centres, then each frame's dominant then
  contextual tokens] (one newline at the end); we emit ascending source, the adapters lay tokens out.
- DPC-kNN density ties: upstream adds U(0, 1e-6) noise from an unseeded generator (run-to-run
  changes); ours breaks ties by index (:mod:`llava.model.dpc_knn`) unless ``seed`` is set, which adds
  the same noise from a seeded CPU generator (one per video, drawn in window order: each frame's
  dynamic clustering, then the window's static clustering; upstream draws a window's frames at once).
- Top-k ties by importance go to the lower index (torch.topk's tie order is unspecified).
- Scoring, static means and merges run in float32 by default (upstream: the model dtype, available as
  ``score_dtype="model"``); DPC distances are float32 either way, as upstream.
- Merged means are sum / count rather than torch.mean (equal up to float rounding).
Differences from the authors' Qwen port (VidCom2 ``token_compressor/holitom``), switch ``port="authors"``:
- importance = the L2 norm of each feature instead of ViT attention (the port's choice; it scores in
  the model dtype, so combine with ``score_dtype="model"`` to come closest).
- NOT reproduced: the port's positions (kept indices = linspace(0, N - 1, count), unrelated to which
  tokens survived). Ours are the true sources above in either mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llava.model.dpc_knn import pairwise_distances
from llava.model.method_api import (
    VIT_RECEIVED_ATTENTION,
    HostCopy,
    Method,
    VideoSelection,
    VideoTokens,
    check_choice,
    check_range,
)
from llava.model.vidcom2 import check_video_features

PORTS = ("original", "authors")
SCORE_DTYPES = ("float32", "model")
_OWNER = "holitom"


@dataclass(frozen=True)
class HoliTomOptions:
    """HoliTom w/o M knobs; defaults = the original authors' scripts (upstream env name in brackets).

    tau: similarity threshold above which a token counts as static between two frames [T]; the
        scripts use 0.8 for R >= 0.15 and 0.65 for R = 0.10.
    beta: weight of a cluster's centre in its merged value [BETA].
    contextual_ratio: fraction of each frame's kept dynamic tokens that are DPC-kNN centres instead of
        top-importance tokens [D]; 0 makes the dynamic part pure top-k by attention.
    knn: neighbours K of the DPC-kNN density (clamped to the cluster count, as upstream) [K].
    max_window: longest temporal window the DP may form, in frames [MAX_WINDOW_SIZE].
    seed: None (default) breaks DPC density ties by index, deterministically; an int adds upstream's
        U(0, 1e-6) density noise from a CPU generator seeded with it (upstream's is unseeded).
    port: original (default: importance = ViT received attention) or authors (the VidCom2 authors'
        Qwen port: importance = feature L2 norm; their fake linspace positions are not reproduced).
    score_dtype: float32 (default) or model (similarities, means and merges in the input dtype, as
        upstream).
    """

    tau: float = 0.8
    beta: float = 0.6
    contextual_ratio: float = 0.0
    knn: int = 7
    max_window: int = 1024
    seed: int | None = None
    port: str = "original"
    score_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_range(_OWNER, "tau", self.tau, -1.0, 1.0)
        check_range(_OWNER, "beta", self.beta, 0.0, 1.0)
        check_range(_OWNER, "contextual_ratio", self.contextual_ratio, 0.0, 1.0)
        for key in ("knn", "max_window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_OWNER} option {key} must be an integer >= 1, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{_OWNER} option seed must be an integer or None, got {self.seed!r}")
        check_choice(_OWNER, "port", self.port, PORTS)
        check_choice(_OWNER, "score_dtype", self.score_dtype, SCORE_DTYPES)


# ------------------------------------------------------------------------------ temporal windows


def _similarity(features: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, P, D) -> (F-1, P) cosines of consecutive frames and the 0-d sum of the token norms, in ``dtype``.

    The normalisation is torch.nn.functional.normalize's (norm clamped at 1e-12), written out so that
    the norms also serve the finite check: a NaN or Inf in a token makes its norm, and the sum, non-finite.
    """
    x = features.to(dtype)
    norm = torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True)  # (F, P, 1)
    unit = x / norm.clamp_min(1e-12)
    return (unit[:-1] * unit[1:]).sum(dim=-1), norm.sum()


def frame_similarity(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(F, P, D) -> (F-1, P) cosine of each token with the same position in the next frame, in ``dtype``."""
    return _similarity(features, dtype)[0]


def static_run_lengths(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """(F-1, P) similarities -> (F-1, P) int64: from transition t on, how many consecutive s > tau.

    Position m is static in window [u, v] exactly when run[u, m] >= v - u.
    """
    steps = similarity.shape[0]
    above = similarity > tau  # compared in the similarity's own dtype, as upstream
    t = torch.arange(steps, device=similarity.device)[:, None].expand_as(above)
    breaks = torch.where(above, steps, t)  # a False at t stops every run reaching it
    next_break = breaks.flip(0).cummin(dim=0).values.flip(0)
    return next_break - t


def shorter_runs(run: torch.Tensor, width: int) -> torch.Tensor:
    """(F-1, P) run lengths -> (F-1, width-1) int64: shorter[u, L-1] = #{m : run[u, m] < L}, L = 1..width-1.

    A window [u, u+L] has P - shorter[u, L-1] static positions and gains G = L * that.
    """
    steps, _ = run.shape
    counts = torch.zeros(steps, steps + 1, dtype=torch.int64, device=run.device)  # run lengths 0..F-1
    counts.scatter_add_(1, run, torch.ones_like(run))
    return counts[:, : max(width - 1, 0)].cumsum(dim=1)


def partition(shorter: list[int], n_frames: int, per_frame: int, width: int) -> tuple[list[tuple[int, int]], int]:
    """The DP over frames, on the host, from :func:`shorter_runs` as a flat list ((F-1) * (width-1) ints).

    best[i] = max(best[i-1], max_w best[i-w] + G(i-w+1, i)), w = 2..min(i+1, width): a strictly larger
    value is needed to beat the single frame, and among equal windows the smallest wins. Returns the
    windows [(u, v)] in frame order (inclusive) and total_reduced = best[F-1].
    """
    row = width - 1
    best = [0] * (n_frames + 1)  # best[i + 1] = optimum over frames 0..i
    start = list(range(n_frames))
    # Inherently sequential (best[i] needs every best[j], j < i): plain Python on (F-1) * (width-1) ints.
    for i in range(n_frames):
        value, first = best[i], i
        for size in range(2, min(i + 1, width) + 1):  # increasing sizes: the first maximum is the smallest
            u, length = i - size + 1, size - 1
            candidate = best[u] + length * (per_frame - shorter[u * row + length - 1])
            if candidate > value:
                value, first = candidate, u
        best[i + 1], start[i] = value, first
    windows = []
    i = n_frames - 1
    while i >= 0:  # backtrack: one step per window
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[n_frames]


def static_windows(
    similarity: torch.Tensor, tau: float, max_window: int = 1024
) -> tuple[list[tuple[int, int]], int, torch.Tensor]:
    """The DP partition of the frames into windows.

    similarity: (F-1, P) from :func:`frame_similarity` (F >= 1; (0, P) for one frame).
    Returns the windows [(u, v)] in frame order (inclusive), total_reduced (the tokens the static
    averaging removes) and the (F-1, P) run lengths on the similarity's device (see
    :func:`static_run_lengths`). The run-length counts come to the host in one copy.
    """
    steps, per_frame = similarity.shape
    width = min(steps + 1, max_window)
    run = static_run_lengths(similarity, tau)
    shorter = shorter_runs(run, width).reshape(-1).tolist()
    windows, total_reduced = partition(shorter, steps + 1, per_frame, width)
    return windows, total_reduced, run


def adjusted_ratio(retention: float, total: int, total_reduced: int) -> float:
    """r' = min(R / ((N - total_reduced) / N), 1): the ratio applied to what the static averaging left."""
    return min(retention / ((total - total_reduced) / total), 1.0)


# ------------------------------------------------------------------------------ the DP on the device

_NEG = -(1 << 40)  # no edge: far below any path's gain (gains are at most F * P)
_MAXPLUS_ELEMENTS = 1 << 24  # (rows, n, n) broadcast per max-plus step: rows taken in chunks beyond this


def _max_plus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, n) x (n, n) int64 -> (n, n): out[i, j] = max_k a[i, k] + b[k, j]."""
    n = a.shape[0]
    rows = max(1, _MAXPLUS_ELEMENTS // (n * n))
    if rows >= n:
        return (a[:, :, None] + b[None]).amax(dim=1)
    return torch.cat([(a[i : i + rows, :, None] + b[None]).amax(dim=1) for i in range(0, n, rows)])


@dataclass(frozen=True)
class _Windows:
    """The DP's partition on the device: each frame's window [first, last] (F,) int64, and total_reduced (0-d)."""

    first: torch.Tensor
    last: torch.Tensor
    reduced: torch.Tensor


def window_tensors(shorter: torch.Tensor, n_frames: int, per_frame: int, width: int) -> _Windows:
    """:func:`partition` on the device, from :func:`shorter_runs` ((F-1, width-1) int64), without a host read.

    best[j] (the optimum over frames 0..j-1) is the longest path from node 0 to node j over edges u -> v+1
    weighted G(u, v) (a window [u, v], v > u, at most ``width`` frames) and u -> u+1 weighted 0 (a single
    frame): ceil(log2 F) max-plus squarings of the (F+1) x (F+1) edge matrix (0 on the diagonal: shorter
    paths). The window ending at frame i then starts at the largest u whose candidate best[u] + G(u, i)
    equals best[i+1]: the single frame wins ties, then the smallest window, as in the loop. The backtrack
    from frame F-1 marks the window ends by pointer doubling (ceil(log2(F+1)) steps).
    """
    device = shorter.device
    nodes, steps, row = n_frames + 1, n_frames - 1, width - 1
    node = torch.arange(nodes, device=device)
    edges = torch.full((nodes * nodes + 1,), _NEG, dtype=torch.int64, device=device)  # the last: a sink
    edges.index_fill_(0, torch.cat([node * (nodes + 1), node[:-1] * (nodes + 1) + 1]), 0)  # stay; one frame
    gain = None
    if steps > 0 and row > 0:
        u = node[:steps, None]
        length = node[None, 1:width]  # L = v - u, the window's frames minus one
        gain = length * (per_frame - shorter.view(steps, row))  # G(u, u + L)
        target = torch.where(u + length <= steps, u * nodes + u + length + 1, nodes * nodes)
        edges.scatter_(0, target.reshape(-1), gain.reshape(-1))
    paths = edges[:-1].view(nodes, nodes)
    for _ in range(max(n_frames - 1, 0).bit_length()):  # 2^s >= F - 1 ... F edges: enough squarings
        paths = _max_plus(paths, paths)
    best = paths[0]  # (F + 1,)
    size = node[None, 1 : width + 1]  # window sizes 1..width (1: the single frame)
    begin = node[:n_frames, None] - size + 1  # (F, width) the window's first frame
    candidate = best[begin.clamp(min=0)]
    if gain is not None:
        window = gain[begin.clamp(0, steps - 1), (size - 2).clamp(min=0)]
        candidate = candidate + torch.where(size >= 2, window, 0)
    candidate = torch.where(begin >= 0, candidate, _NEG)
    first_hit = (candidate == best[1:, None]).to(torch.uint8).argmax(dim=1)  # the smallest size that attains it
    start = node[:n_frames] - first_hit
    pointer = torch.cat([torch.where(start > 0, start - 1, n_frames), node[n_frames:]])  # -1 -> the sink F
    mark = torch.zeros(nodes, dtype=torch.int64, device=device)
    mark[n_frames - 1] = 1
    for _ in range(n_frames.bit_length()):
        mark = mark.scatter_reduce(0, pointer, mark, reduce="amax")
        pointer = pointer[pointer]
    last = torch.where(mark[:n_frames] > 0, node[:n_frames], n_frames - 1).flip(0).cummin(dim=0).values.flip(0)
    return _Windows(start[last], last, best[n_frames])


# ------------------------------------------------------------------------------ clustering merge


@dataclass
class _Sets:
    """B token sets padded to N (set b = its first sizes[b] rows), each clustered into counts[b] centres.

    Host lists carry the sizes where the host has them (one set at a time, the tests); the selection
    knows them on the device only: ``sizes`` / ``counts`` / ``ks`` None and ``knn`` bounds the k. The
    (B,) device tensors are needed where the sets are ragged: sizes_t when some set is padded, counts_t
    when the counts differ, ks_t when the k differ. noise: (B, N) float32 U(0, 1) draws (upstream's
    density noise is 1e-6 times them) or None.
    """

    sizes: list[int] | None
    counts: list[int] | None
    ks: list[int] | None
    sizes_t: torch.Tensor | None = None
    counts_t: torch.Tensor | None = None
    ks_t: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    knn: int = 0

    def padded(self, n: int) -> bool:
        return self.sizes is None or min(self.sizes) < n

    def counts_vary(self) -> bool:
        return self.counts is None or len(set(self.counts)) > 1


_DIRECT_MAX = 25  # torch.cdist computes sets of at most 25 tokens pair by pair, larger ones by matmul


def _distances(x: torch.Tensor, sets: _Sets) -> torch.Tensor:
    """(B, N, D) padded sets -> (B, N, N) float32 distances / sqrt(D), each set as it would alone.

    :func:`llava.model.dpc_knn.pairwise_distances` of one set takes torch.cdist's pair-by-pair path for
    at most 25 tokens and its matmul path above (self-distances not exactly 0 there); padding must not
    move a small set onto the other path, so a batch that may mix both recomputes the small sets' block.
    """
    dist = pairwise_distances(x)
    n = x.shape[1]
    if n <= _DIRECT_MAX or (sets.sizes is not None and min(sets.sizes) > _DIRECT_MAX):
        return dist  # every set on the path it takes alone
    head = x[:, :_DIRECT_MAX].float()
    direct = torch.cdist(head, head, compute_mode="donot_use_mm_for_euclid_dist") / (x.shape[-1] ** 0.5)
    block = dist[:, :_DIRECT_MAX, :_DIRECT_MAX]
    block.copy_(torch.where((sets.sizes_t <= _DIRECT_MAX)[:, None, None], direct, block))
    return dist


def _densities(nearest: torch.Tensor, sets: _Sets) -> torch.Tensor:
    """(B, N, k_max) ascending nearest distances -> (B, N) rho = exp(-mean of the ks[b] smallest squared)."""
    if sets.ks is not None:  # host ks: one pass per distinct k (one unless a set has fewer than knn centres)
        density = None
        for k in sorted(set(sets.ks)):
            rho = torch.exp(-(nearest[..., :k] ** 2).mean(dim=-1))
            density = rho if density is None else torch.where(sets.ks_t[:, None] == k, rho, density)
        return density
    widest = nearest.shape[-1]  # device ks (1..widest): every k's mean, each set picks its own
    means = torch.stack([(nearest[..., :k] ** 2).mean(dim=-1) for k in range(1, widest + 1)])
    pick = (sets.ks_t.clamp(1, widest) - 1)[None, :, None].expand(1, *nearest.shape[:2])
    return torch.exp(-means).gather(0, pick)[0]


def _dpc_centres(dist: torch.Tensor, sets: _Sets, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, N, N) distances -> (B, N) bool centre masks: the counts[b] highest rho * delta of each set.

    The rule of :func:`llava.model.dpc_knn.dpc_scores`, batched: density ties and score ties go to the
    lower index; padded rows and columns take no part (density -1, below every real one).
    positions: arange(>= N) on the device; valid: (B, N) the sets' real rows, None when none is padded.
    """
    batch, n, _ = dist.shape
    positions = positions[:n].expand(batch, n)
    padded = valid is not None
    pairs = valid[:, :, None] & valid[:, None, :] if padded else None
    k_max = max(sets.ks) if sets.ks is not None else max(1, min(sets.knn, n))
    nearest = torch.topk(torch.where(pairs, dist, torch.inf) if padded else dist, k=k_max, dim=-1, largest=False)
    density = _densities(nearest.values, sets)
    if sets.noise is not None:
        density = density + sets.noise * 1e-6
    if padded:
        density = torch.where(valid, density, -1.0)
    # rank 0 = densest; equal densities rank by index, so "denser" is a strict total order
    order = torch.sort(density, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, positions)
    denser = rank[:, None, :] < rank[:, :, None]  # denser[b, i, j]: j is denser than i
    far = (torch.where(pairs, dist, 0.0) if padded else dist).amax(dim=(1, 2))
    delta = torch.where(denser, dist, far[:, None, None]).min(dim=-1).values
    score = density * delta  # padded: -delta <= 0, ranked after every real score (they have lower indices)
    best = torch.sort(score, dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(best).scatter_(1, best, positions)
    return place < (sets.counts_t[:, None] if sets.counts_vary() else sets.counts[0])


def _merge(
    x: torch.Tensor,
    centre: torch.Tensor,
    dist: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
    sorted_sums: bool | None = None,
) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) centre masks, (B, N, N) distances -> (B, N, D), merged at the centres.

    Every non-centre token (of ``valid``, default all) joins the centre nearest to it by ``dist`` (ties: the
    lower index); a centre with members becomes beta * centre + (1 - beta) * mean(members), one without
    stays itself. Rows that are not centres hold garbage. The sums are deterministic: scatter_add_ on the
    CPU (sequential in index order), index_put_ with accumulate on CUDA (sorted; scatter_add_ is atomic);
    ``sorted_sums`` picks one explicitly (None: by device).
    """
    batch, n, dim = x.shape
    nearest = torch.where(centre[:, None, :], dist, torch.inf).argmin(dim=-1)  # (B, N), first minimum
    joins = ~centre if valid is None else valid ^ centre  # centres are valid
    target = torch.where(joins, nearest, n)  # non-members go to a spare column n
    sums = torch.zeros(batch, n + 1, dim, dtype=x.dtype, device=x.device)
    if x.device.type == "cuda" if sorted_sums is None else sorted_sums:
        rows = torch.arange(batch, device=x.device)[:, None].expand(batch, n)
        sums.index_put_((rows, target), x, accumulate=True)
    else:
        sums.scatter_add_(1, target[..., None].expand(batch, n, dim), x)
    # member counts: integers, exact in float32 whatever the order; cast like upstream's integer counts
    counts = torch.zeros(batch, n + 1, device=x.device).scatter_add_(1, target, joins.float())
    members = counts[:, :n, None].to(x.dtype)
    merged = beta * x + (1.0 - beta) * (sums[:, :n] / members.clamp(min=1))
    return torch.where(members > 0, merged, x)


def _cluster_sets(
    x: torch.Tensor, sets: _Sets, beta: float, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) padded sets -> (B, N) centre masks and (B, N, D) values (merged at the centres)."""
    n = x.shape[1]
    positions = torch.arange(n, device=x.device) if positions is None else positions
    dist = _distances(x, sets)  # (B, N, N) float32
    valid = positions[:n] < sets.sizes_t[:, None] if sets.padded(n) else None
    centre = _dpc_centres(dist, sets, positions, valid)
    return centre, _merge(x, centre, dist, beta, valid)


def merge_into_centres(x: torch.Tensor, centres: torch.Tensor, distances: torch.Tensor, beta: float) -> torch.Tensor:
    """(n, D) tokens, (c,) ascending centre indices, (n, n) distances -> (c, D) merged centre values.

    Every non-centre token joins the centre nearest to it by ``distances`` (ties: the earlier centre);
    a centre with members becomes beta * centre + (1 - beta) * mean(members), one without stays itself.
    """
    centre = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    centre[centres] = True
    return _merge(x[None], centre[None], distances[None], beta)[0, centres]


def cluster_merge(
    x: torch.Tensor, count: int, knn: int, beta: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) tokens -> (count,) ascending DPC-kNN centre indices and their (count, D) merged values.

    k = min(knn, count) neighbours for the density, as upstream; see :func:`merge_into_centres`.
    """
    n = x.shape[0]
    if not 0 <= count <= n:
        raise ValueError(f"cluster_merge: asked for {count} centres among {n} tokens")
    noise = None if generator is None else torch.rand(n, generator=generator)[None].to(x.device)
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device), x[:0]
    centre, merged = _cluster_sets(x[None], _Sets([n], [count], [min(knn, count)], noise=noise), beta)
    centres = centre[0].nonzero().squeeze(1)
    return centres, merged[0, centres]


# ------------------------------------------------------------------------------ the method


_CHUNK = 16  # torch's CPU sum over a non-innermost dim adds 16 rows at a time, then the chunks (SumKernel)


def _window_means(x: torch.Tensor, first: torch.Tensor, length: torch.Tensor, real: torch.Tensor,
                  longest: int, dtype: torch.dtype) -> torch.Tensor:
    """(F, P, D) frames -> (S, P, D) each window's mean over its frames [first, first + length), in ``dtype``.

    A 0/1 window x frame matrix times the frames (float32 sums, deterministic). On the CPU the sums
    follow torch.mean's order bit for bit (windows below 256 frames): each full chunk of 16 frames summed in
    order, the chunks summed in order, and the remaining frames' sum added to that last; on other devices
    one product. ``real``: (S,) sets that are windows (the others' means are garbage); ``longest``: a
    bound on the lengths.
    """
    n_frames, per_frame, dim = x.shape
    frames = x.reshape(n_frames, per_frame * dim).float()
    offset = torch.arange(n_frames, device=x.device)[None, :] - first[:, None]  # (S, F)
    inside = (offset >= 0) & (offset < length[:, None]) & real[:, None]
    if x.device.type != "cpu":
        sums = inside.to(torch.float32) @ frames
    else:
        whole = (offset // _CHUNK + 1) * _CHUNK <= length[:, None]  # the frame's chunk is a full one
        chunks = -(-longest // _CHUNK)
        weights = [inside & ~whole] + [inside & whole & (offset // _CHUNK == c) for c in range(chunks)]
        parts = (torch.stack(weights).to(torch.float32).flatten(0, 1) @ frames).view(chunks + 1, -1, frames.shape[1])
        total = parts[1]
        for c in range(2, chunks + 1):
            total = total + parts[c]
        sums = parts[0] + total
    return (sums.to(dtype) / length[:, None]).view(-1, per_frame, dim)


GROUPED_CPU_MEANS = True
"""On the CPU, compute the static means as torch.mean over the windows grouped by length (the summation
order of a window-by-window loop, bit for bit; the windows are read on the host, free there). False: the
window matrix product every other device uses (tests and scripts/count_method_ops.py switch to it)."""


def _grouped_means(x: torch.Tensor, tokens: torch.Tensor, windows: _Windows, n_static: torch.Tensor,
                   n_clusters: torch.Tensor, n_sets: int) -> torch.Tensor:
    """CPU: (S, P, D) static means of the multi-frame windows at their static positions (set order and
    each set's token order), as torch.mean sums them per group of windows of one length (those with
    clusters; the others stay 0), gathered (n_g, L, N_g, D) up to the group's widest set."""
    first, last = windows.first.tolist(), windows.last.tolist()
    static, clusters = n_static.tolist(), n_clusters.tolist()
    starts = [t for t in range(len(first)) if first[t] == t and last[t] > t]  # set b: the b-th window
    groups: dict[int, list[int]] = {}
    for b, u in enumerate(starts):
        if clusters[u]:
            groups.setdefault(last[u] - u + 1, []).append(b)
    out = x.new_zeros(n_sets, x.shape[1], x.shape[2])
    for length, members in groups.items():
        widest = max(static[starts[b]] for b in members)
        frames = torch.tensor([[starts[b] + j] for b in members for j in range(length)]).view(len(members), length, 1)
        rows = torch.tensor(members)
        out[rows, :widest] = x[frames, tokens[rows, None, :widest]].mean(dim=1)
    return out


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-to-device copy that does not stall the stream on CUDA (pinned memory, asynchronous)."""
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def holitom_select(
    features: torch.Tensor, importance: torch.Tensor, retention: float, options: HoliTomOptions | None = None
) -> VideoSelection:
    """One video's (F, P, D) features and (F, P) importance -> sources (K,) ascending and features (K, D).

    Output features are float32 (``score_dtype="float32"``) or the input dtype (``"model"``).
    One host read (the kept count, the finite flag and the windows), started as soon as the device DP
    and the budgets exist and waited for after the clustering is queued (module docstring).
    """
    options = options or HoliTomOptions()
    check_video_features(features, retention)
    n_frames, per_frame, dim = features.shape
    if tuple(importance.shape) != (n_frames, per_frame):
        raise ValueError(
            f"{_OWNER}: importance must be (F, P) = {(n_frames, per_frame)}, got {tuple(importance.shape)}"
        )
    dtype = torch.float32 if options.score_dtype == "float32" else features.dtype
    device = features.device
    total = n_frames * per_frame
    width = min(n_frames, options.max_window)
    steps = n_frames - 1
    positions = torch.arange(total + 1, device=device)  # sliced for every arange below
    frame = positions[:n_frames]

    # --- windows, budgets and the kept count, on the device; their copy to the host starts here ------
    x_all = features.to(dtype)
    similarity, norm_total = _similarity(x_all, dtype)
    run = static_run_lengths(similarity, options.tau)
    finite = ((norm_total + importance.sum()) * 0 == 0).long()  # NaN or Inf anywhere -> not finite
    windows = window_tensors(shorter_runs(run, width), n_frames, per_frame, width)
    first, last = windows.first, windows.last
    multi = last > first
    if steps > 0:
        # each frame's static mask: the positions whose run from its window's first step covers the window
        need = torch.where(multi, last - first, n_frames)
        static = run.index_select(0, first.clamp(max=steps - 1)) >= need[:, None]  # (F, P)
    else:
        static = torch.zeros(n_frames, per_frame, dtype=torch.bool, device=device)
    n_static = static.sum(dim=1)  # = P - shorter[u, v - u - 1] in a multi-frame window, 0 in a single one
    # r' in float64 as Python computes it (a true division: ``float / tensor`` would multiply by a reciprocal)
    kept_share = (total - windows.reduced).double() / total
    ratio = torch.div(torch.full_like(kept_share, float(retention)), kept_share).clamp(max=1.0)
    keep = ((per_frame - n_static).double() * ratio).ceil().long()  # per frame (its window's dynamic count)
    n_dominant = (keep.double() * (1.0 - options.contextual_ratio)).round().long()  # half-even, as round()
    n_clusters = torch.where(first == frame, (n_static.double() * ratio).round().long(), 0)  # per window
    count = keep.sum() + n_clusters.sum()
    read = HostCopy(torch.cat([torch.stack([finite, count, windows.reduced]), first, last, n_static]))

    # --- queued behind the copy: everything the shapes bound -----------------------------------------
    score = torch.where(static, -torch.inf, importance.float())
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # ties: the lower index
    rank = torch.empty_like(order).scatter_(1, order, positions[:per_frame].expand(n_frames, per_frame))
    dominant = rank < n_dominant[:, None]  # (F, P) the top-importance dynamic tokens
    n_windows = n_frames // 2 if width > 1 else 0  # multi-frame windows: at most F div 2
    contextual = options.contextual_ratio > 0
    n_sets = n_windows + (n_frames if contextual else 0)
    bound = min(total, int(retention * total) + n_frames + n_windows + 2)  # the kept count's bound
    x = sets = members = base = None
    if n_sets:
        # static sets: the multi-frame windows, by first frame; contextual sets: every frame's dynamic,
        # non-dominant tokens (options.contextual_ratio > 0); each set's tokens in index order
        listed = torch.sort(~(multi & (first == frame)), stable=True).indices[:n_windows]  # first frames
        real = positions[:n_windows] < (multi & (first == frame)).sum()
        rows, sizes, counts, bases = [], [], [], []
        if n_windows:
            rows.append(torch.where(real[:, None], static[listed], False))
            sizes.append(torch.where(real, n_static[listed], 0))
            counts.append(torch.where(real, n_clusters[listed], 0))
            bases.append(listed * per_frame)
        if contextual:
            rows.append(~(static | dominant))
            sizes.append(per_frame - n_static - n_dominant)
            counts.append(keep - n_dominant)
            bases.append(frame * per_frame)
        members = torch.cat(rows) if len(rows) > 1 else rows[0]
        tokens = torch.sort(torch.where(members, 0, 1), dim=-1, stable=True).indices  # (B, P)
        parts = []
        if n_windows:
            if device.type == "cpu" and GROUPED_CPU_MEANS:  # already in each set's token order
                parts.append(_grouped_means(x_all, tokens, windows, n_static, n_clusters, n_windows))
            else:
                means = _window_means(x_all, listed, last[listed] - listed + 1, real, width, dtype)
                parts.append(means.gather(1, tokens[:n_windows, :, None].expand(-1, -1, dim)))
        if contextual:
            parts.append(x_all[frame[:, None], tokens[n_windows:]])
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        size_t, count_t = torch.cat(sizes), torch.cat(counts)
        sets = _Sets(None, None, None, size_t, count_t, count_t.clamp(1, options.knn), knn=options.knn)
        base = (torch.cat(bases)[:, None] + tokens).reshape(-1)  # flat index of each set token
    if options.seed is None:
        out = _output(features, dominant, x, sets, base, bound, options.beta, dtype, positions)

    # --- the read: wait for the copy only -------------------------------------------------------------
    host = read.tolist()
    finite_ok, kept, reduced = host[:3]
    if not finite_ok and not (bool(torch.isfinite(features).all()) and bool(torch.isfinite(importance).all())):
        raise ValueError(f"{_OWNER}: features or importance contain NaN or Inf; refusing to merge them")
    if kept == 0:
        raise ValueError(
            f"{_OWNER} kept no token at R={retention}: the video is static and round(n_static * r') is 0; "
            "raise R"
        )
    if kept > bound:  # never: ceil / round add at most one per frame and window to R * N
        raise RuntimeError(f"{_OWNER}: the budgets keep {kept} tokens, more than the bound {bound}")
    if options.seed is not None:
        first_h, last_h = host[3 : 3 + n_frames], host[3 + n_frames : 3 + 2 * n_frames]
        static_h = host[3 + 2 * n_frames :]
        if sets is not None:
            sets.noise = _to_device(_seeded_noise(first_h, last_h, static_h, reduced, retention, per_frame,
                                                  n_windows, options), device)
        out = _output(features, dominant, x, sets, base, bound, options.beta, dtype, positions)
    source, values = out
    return VideoSelection(source[1 : kept + 1], values[1 : kept + 1])


def _output(features, dominant, x, sets, base, bound, beta, dtype, positions):
    """The kept tokens: the dominant ones and every set's centres (merged), compacted by a cumulative sum
    into ``bound`` + 1 slots (slot 0: a sink), ascending -> (sources, values)."""
    n_frames, per_frame, dim = features.shape
    marks = dominant.reshape(-1).long()  # (F * P,): 1 where a token is kept (at its own index)
    centre = merged = None
    if x is not None:
        centre, merged = _cluster_sets(x, sets, beta, positions)
        marks = marks.scatter_add(0, base, centre.reshape(-1).long())  # padding adds 0 (to any index)
    # the j-th kept token (ascending) goes to slot j + 1, everything else to slot 0, a sink
    slot = marks.cumsum(0) * marks
    source = torch.zeros(bound + 1, dtype=torch.int64, device=features.device)
    source = source.scatter_(0, slot, positions[: n_frames * per_frame])
    values = features.reshape(-1, dim).index_select(0, source).to(dtype)
    if centre is not None:
        values.index_put_(((slot[base] * centre.reshape(-1)),), merged.reshape(-1, dim))  # non-centres: sink
    return source, values


def _seeded_noise(first, last, n_static, reduced, retention, per_frame, n_windows, options) -> torch.Tensor:
    """Upstream's density noise from one CPU generator, in its draw order (per window: each frame's
    contextual set, then the static set), laid out as the padded sets: (B, P) float32."""
    n_frames = len(first)
    ratio = adjusted_ratio(float(retention), n_frames * per_frame, reduced)
    starts = [t for t in range(n_frames) if first[t] == t]
    multi = [u for u in starts if last[u] > u]
    static_set = {u: i for i, u in enumerate(multi)}
    n_sets = n_windows + (n_frames if options.contextual_ratio > 0 else 0)
    noise = torch.zeros(n_sets, per_frame)
    generator = torch.Generator().manual_seed(options.seed)
    for u in starts:  # a host loop, one small draw per set, no device work
        keep = math.ceil((per_frame - n_static[u]) * ratio)
        n_dominant = round(keep * (1.0 - options.contextual_ratio))
        for t in range(u, last[u] + 1):
            if keep - n_dominant:
                n = per_frame - n_static[u] - n_dominant
                noise[n_windows + t, :n] = torch.rand(n, generator=generator)
        if u in static_set and round(n_static[u] * ratio):
            noise[static_set[u], : n_static[u]] = torch.rand(n_static[u], generator=generator)
    return noise


def _select(video: VideoTokens, retention: float, options: HoliTomOptions) -> VideoSelection:
    if options.port == "authors":
        importance = video.features.to(torch.float32 if options.score_dtype == "float32" else video.features.dtype)
        importance = importance.norm(dim=-1).float()
    else:
        importance = video.signal(VIT_RECEIVED_ATTENTION)
    return holitom_select(video.features, importance, retention, options)


METHOD = Method(
    name="holitom",
    options=HoliTomOptions,
    signals=frozenset({VIT_RECEIVED_ATTENTION}),
    select=_select,
    merges=True,
    summary="DP temporal windows, static tokens averaged and DPC-kNN merged, dynamic top-k by ViT attention",
    needs=lambda options: frozenset() if options.port == "authors" else frozenset({VIT_RECEIVED_ATTENTION}),
)
