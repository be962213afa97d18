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

HoliTom's inner merge ("HoliTom M", option ``inner_merge``; see :class:`HoliTomInnerPlan`): at LLM layer
k of the prefill, the video tokens with the lowest last-token attention are averaged into their most
similar kept token. The method then acts in both stages; nominal R is the outer ratio (the authors'
RETAIN_RATIO), and the driver reports the achieved layer-averaged retention of both stages together.

Positions (our rule; upstream LLaVA-OV has none beyond the output order): a static token or static
centre at spatial position m of window [u, v] takes the source u * P + m (the window's FIRST frame);
a dynamic token or dynamic centre takes its own flat index. Sources are unique (a position static in a
window is dynamic in none of its frames) and the output is in ascending source order.

Executions (``execution``; default: compiled on CUDA, eager on the CPU and with ``seed``):
- ``compiled`` / ``static`` (:func:`static_selection`): every shape fixed by (F, P, D), R and the knobs, so
  torch.compile compiles once per video shape, and nothing is read on the host until the adapter's count
  read (the registry gets a padded selection with its count). The DP runs on the device as a longest
  path (max-plus squarings of the window-gain matrix, exact integers), then each frame's choice by the
  host's tie rules and the backtrack by pointer doubling (:func:`device_windows`). Budgets follow in
  float64 as on the host. The static sets sit in F // 2 slots of all P positions (members: the window's
  static positions), their means one product with the 0/1 window masks; with contextual_ratio > 0 each
  frame's other dynamic tokens form F more sets; one DPC-kNN merge takes them all, ranks as comparisons.
  Distances use the matmul form with self-distances 0 for every set (eager: pair by pair up to 25
  tokens); float32 sets on CUDA take their Gram and merge sums from an exact three-bf16 split (bf16
  GEMMs with float32 accumulation), and the merge sums are a one-hot product (deterministic). Against
  eager: the same sources on every CPU test case, features within float32 rounding; compiled kernels
  may round reductions (the cosines, the densities) differently, which can flip exact near-ties.
  ``seed`` draws its noise set by set in the host layout's order, so it runs eager.
- ``eager`` (the outputs of a window-by-window loop, bit for bit on the CPU): ONE host synchronisation
  per video, a copy of the (F-1) x (W-1) run-length counts and a finite flag; the DP and its backtrack
  run in plain Python on that copy (W = min(F, max_window)). Every size is then known on the host: one
  small host-to-device copy carries the per-frame and per-set integers, the dominant top-k runs over all
  frames at once, all static and contextual token sets go through ONE padded DPC-kNN merge (a set of at
  most 25 tokens keeps torch.cdist's pair-by-pair distances, as it would alone), and the output is
  compacted by a cumulative sum with the known count (no nonzero). The finite check reads the sum of
  the token norms and of the importance; only when that is not finite (NaN / Inf, or huge finite values
  overflowing) are the inputs checked element by element. On CUDA the merge sums are atomic adds
  (scatter_add_), so their float rounding order is not fixed there, as with the index_add_ of a loop.

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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava.model.compiled_select import compiled
from llava.model.dpc_knn import gram_distances, k_smallest, pairwise_distances
from llava.model.float32_products import float32_matmul
from llava.model.inllm_select import top_visual
from llava.model.method_api import (
    LLM_ATTENTION_ROWS,
    VIT_RECEIVED_ATTENTION,
    Boundary,
    InLLMPlan,
    LayerAction,
    LayerState,
    Method,
    Stage,
    VideoSelection,
    VideoTokens,
    check_choice,
    check_range,
    check_static_execution,
    read_padded,
)
from llava.model.vidcom2 import check_video_features

PORTS = ("original", "authors")
INNER_ATTENTION = ("rows", "eager")
SCORE_DTYPES = ("float32", "model")
_OWNER = "holitom"
EMPTY_REASON = "the video is static and round(n_static * r') is 0; raise R"


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
        upstream); also the inner merge's.
    inner_merge: also run HoliTom's inner merge M inside the LLM (the authors' HOLITOM_k / HOLITOM_r set).
    inner_layer: k, the layer before which M merges, reading layer k-1's attention [HOLITOM_k].
    inner_ratio: r, the fraction of the current video tokens merged away at layer k [HOLITOM_r].
    inner_attention: rows (the last token's row from the layer's query and keys) or eager (the layer's
        whole map, as upstream's eager fallback; for memory comparisons).
    execution: None (default: "compiled" on CUDA, "eager" on the CPU or with ``seed``), "compiled" (the
        static-shape formulation through torch.compile; on the CPU it runs uncompiled), "static" (the same
        formulation, never compiled) or "eager" (the window layout read on the host, then batched ops
        sized by it). See the module docstring's Executions paragraphs.
    """

    tau: float = 0.8
    beta: float = 0.6
    contextual_ratio: float = 0.0
    knn: int = 7
    max_window: int = 1024
    seed: int | None = None
    port: str = "original"
    score_dtype: str = "float32"
    inner_merge: bool = False
    inner_layer: int = 18
    inner_ratio: float = 0.5
    inner_attention: str = "rows"
    execution: str | None = None

    def __post_init__(self) -> None:
        layout = "draws upstream's noise set by set in the order of the host's window layout"
        check_static_execution(_OWNER, self.execution, self.seed, layout)
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
        if isinstance(self.inner_layer, bool) or not isinstance(self.inner_layer, int) or self.inner_layer < 1:
            raise ValueError(f"{_OWNER} option inner_layer must be an integer >= 1, got {self.inner_layer!r}")
        if not 0.0 <= self.inner_ratio < 1.0:
            raise ValueError(f"{_OWNER} option inner_ratio must be in [0, 1), got {self.inner_ratio}")
        check_choice(_OWNER, "inner_attention", self.inner_attention, INNER_ATTENTION)


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


# ------------------------------------------------------------------------------ clustering merge


@dataclass
class _Sets:
    """B token sets padded to N (set b = its first sizes[b] rows), each clustered into counts[b] centres.

    Host lists carry the sizes; the (B,) device tensors are needed only where the sets are ragged:
    sizes_t when some set is padded, counts_t when the counts differ, ks_t when the k differ.
    noise: (B, N) float32 U(0, 1) draws (upstream's density noise is 1e-6 times them) or None.
    """

    sizes: list[int]
    counts: list[int]
    ks: list[int]
    sizes_t: torch.Tensor | None = None
    counts_t: torch.Tensor | None = None
    ks_t: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def padded(self, n: int) -> bool:
        return min(self.sizes) < n


_DIRECT_MAX = 25  # torch.cdist computes sets of at most 25 tokens pair by pair, larger ones by matmul


def _distances(x: torch.Tensor, sets: _Sets) -> torch.Tensor:
    """(B, N, D) padded sets -> (B, N, N) float32 distances / sqrt(D), each set as it would alone.

    :func:`llava.model.dpc_knn.pairwise_distances` of one set takes torch.cdist's pair-by-pair path for
    at most 25 tokens and its matmul path above (self-distances not exactly 0 there); padding must not
    move a small set onto the other path, so a batch mixing both recomputes the small sets' block.
    """
    dist = pairwise_distances(x)
    n = x.shape[1]
    if n <= _DIRECT_MAX or min(sets.sizes) > _DIRECT_MAX:
        return dist  # every set on the path it takes alone
    head = x[:, :_DIRECT_MAX].float()
    direct = torch.cdist(head, head, compute_mode="donot_use_mm_for_euclid_dist") / (x.shape[-1] ** 0.5)
    block = dist[:, :_DIRECT_MAX, :_DIRECT_MAX]
    block.copy_(torch.where((sets.sizes_t <= _DIRECT_MAX)[:, None, None], direct, block))
    return dist


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
    nearest = torch.topk(torch.where(pairs, dist, torch.inf) if padded else dist, k=max(sets.ks), dim=-1, largest=False)
    density = None
    for k in sorted(set(sets.ks)):  # one pass per distinct k (one unless a set has fewer than knn centres)
        rho = torch.exp(-(nearest.values[..., :k] ** 2).mean(dim=-1))
        density = rho if density is None else torch.where(sets.ks_t[:, None] == k, rho, density)
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
    return place < (sets.counts_t[:, None] if len(set(sets.counts)) > 1 else sets.counts[0])


def _merge(
    x: torch.Tensor, centre: torch.Tensor, dist: torch.Tensor, beta: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) centre masks, (B, N, N) distances -> (B, N, D), merged at the centres.

    Every non-centre token (of ``valid``, default all) joins the centre nearest to it by ``dist`` (ties: the
    lower index); a centre with members becomes beta * centre + (1 - beta) * mean(members), one without
    stays itself. Rows that are not centres hold garbage.
    """
    batch, n, dim = x.shape
    nearest = torch.where(centre[:, None, :], dist, torch.inf).argmin(dim=-1)  # (B, N), first minimum
    joins = ~centre if valid is None else valid ^ centre  # centres are valid
    target = torch.where(joins, nearest, n)  # non-members go to a spare column n
    sums = torch.zeros(batch, n + 1, dim, dtype=x.dtype, device=x.device)
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


# ------------------------------------------------------------------------------ static execution


@dataclass(frozen=True)
class StaticPlan:
    """What the static formulation is specialised on: Python constants of the function torch.compile traces.

    tau: the threshold as the score dtype rounds it (the eager comparison's operand: a bf16 similarity is
    compared with bf16(tau)). width: W = min(F, max_window). slots: S, the most windows of >= 2 frames
    (F // 2; 0 when W = 1). cap: the padded output length, a bound of the kept count (:func:`static_plan`).
    keep_share: 1 - contextual_ratio, the dominant share of each frame's kept dynamic tokens.
    """

    retention: float
    tau: float
    beta: float
    keep_share: float
    contextual: bool
    knn: int
    width: int
    slots: int
    cap: int
    float32: bool


def static_plan(
    n_frames: int, per_frame: int, retention: float, options: HoliTomOptions, dtype: torch.dtype
) -> StaticPlan:
    """The constants of one video shape. The cap bounds K = sum over frames of ceil(n_d r') + sum over windows
    of round(n_s r'): r' * (N - total_reduced) <= R * N, so K < R * N + F (the ceils) + S / 2 (the rounds);
    the rest of S and 2 more absorb the float rounding of r'."""
    width = min(n_frames, options.max_window)
    slots = n_frames // 2 if width >= 2 else 0
    total = n_frames * per_frame
    score_dtype = torch.float32 if options.score_dtype == "float32" else dtype
    return StaticPlan(
        retention=float(retention),
        tau=float(torch.tensor(options.tau, dtype=score_dtype)),
        beta=options.beta,
        keep_share=1.0 - options.contextual_ratio,
        contextual=options.contextual_ratio > 0,
        knn=options.knn,
        width=width,
        slots=slots,
        cap=min(total, math.floor(retention * total) + n_frames + slots + 2),
        float32=options.score_dtype == "float32",
    )


def _ahead(values: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (..., N, N) bool: [..., i, j] = value j comes before value i in a stable descending sort
    (larger, or equal at a lower index). Ranks as comparisons: one fused reduction, no sort or scatter."""
    n = values.shape[-1]
    index = torch.arange(n, device=values.device)
    before, after = values[..., None, :], values[..., :, None]
    return (before > after) | ((before == after) & (index[None, :] < index[:, None]))


def device_windows(
    similarity: torch.Tensor, tau: float, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`partition` on the device: (F-1, P) similarities -> each frame's window (first, last), (F,) each,
    the (F, P) static masks and total_reduced (0-d int64). No host read; shapes depend on (F, P) alone.

    The DP is a longest path over the nodes 0..F (node i: frames 0..i-1 covered; a window [u, i] is an
    edge u -> i + 1 of weight G(u, i), a single frame one of weight 0): its values come from max-plus
    squarings of the edge matrix, exactly (integers). Each frame's choice then follows the host rule
    (beat the single frame strictly; among equal windows the smallest), and the backtrack is a pointer
    chase from the last frame, by doubling.
    """
    steps, per_frame = similarity.shape
    n_frames, device = steps + 1, similarity.device
    frames = torch.arange(n_frames, device=device)
    if width < 2:  # every window is a single frame
        return frames, frames, torch.zeros(n_frames, per_frame, dtype=torch.bool, device=device), frames.sum() * 0
    run = torch.cat([static_run_lengths(similarity, tau), similarity.new_zeros(1, per_frame, dtype=torch.int64)])
    span = frames[None, :] - frames[:, None]  # (F, F) [u, i] = i - u
    allowed = (span >= 1) & (span <= width - 1)
    n_static = (run[:, None, :] >= span.clamp(min=1)[:, :, None]).sum(dim=-1)  # (F, F) static positions of [u, i]
    never = -(1 << 40)  # below any sum of gains, also after the squarings add it up
    gain = torch.where(allowed, span * n_static, never)
    nodes = torch.arange(n_frames + 1, device=device)
    edge = torch.nn.functional.pad(gain, (1, 0, 0, 1), value=never)  # [u, i + 1] = G(u, i)
    edge = torch.where((nodes[None, :] == nodes[:, None]) | (nodes[None, :] == nodes[:, None] + 1), 0, edge)
    hops = max(1, math.ceil(math.log2(n_frames)))
    for _ in range(hops):  # paths of up to 2^hops >= F edges; the diagonal 0 keeps the shorter ones
        edge = (edge[:, :, None] + edge[None, :, :]).amax(dim=1).clamp_min(never)
    best = edge[0]  # (F + 1,) best[i]: the optimum over frames 0..i-1
    # per frame i, the best window [u, i] and, among equal ones, the largest u (the smallest window): one
    # maximum of the key value * (F + 1) + u (no equality test between separately reduced values)
    key = (best[:n_frames, None] + gain) * (n_frames + 1) + frames[:, None]  # (F, F) [u, i]
    top = key.amax(dim=0)
    value, smallest = torch.div(top, n_frames + 1, rounding_mode="floor"), top % (n_frames + 1)
    start = torch.where(value > best[:n_frames], smallest, frames).clamp(0, steps)
    sink = n_frames  # node F stands for "before frame 0"
    jump = torch.cat([torch.where(start > 0, start - 1, sink), nodes[-1:]])  # (F + 1,) the previous window's end
    on = nodes == n_frames - 1
    for _ in range(hops):  # after s rounds: every end within 2^s - 1 windows of the last frame (F windows at most)
        on = on | (on[:, None] & (jump[:, None] == nodes[None, :])).any(dim=0)
        jump = jump[jump]
    is_end = on[:n_frames]
    # indices that come out of a reduction are clamped to their (already true) range: in a fused kernel,
    # torch.compile's bounds assert also sees the padded lanes of the reduction, which hold its identity
    last = torch.where(is_end[None, :] & (span >= 0), frames[None, :], n_frames).amin(dim=1).clamp(0, steps)  # (F,)
    first = start[last].clamp(0, steps)
    need = last - first
    static = (need > 0)[:, None] & (run[first] >= need[:, None])
    return first, last, static, best[n_frames]


def _bf16_part(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float32 values rounded to bf16 (nearest even) by bit arithmetic: torch.compile elides a
    float32 -> bf16 -> float32 cast pair inside a fused kernel, which would leave the value unrounded."""
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536: the int32 mask 0xFFFF0000
    return bits.view(torch.float32)


_ALIGN = 8  # rows per part padded to a multiple of 8: 16-byte aligned GEMM operands (tensor-core kernels)


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) float32 -> (B, 3M, D) bf16 [hi; mid; lo] per batch (M = N rounded up to a multiple of 8,
    the padding rows 0), hi + mid + lo == x exactly.

    Why: a float32 value has 24 significant bits and bf16 8, and each remainder is exact in float32, so
    three bf16 parts hold it (finite values away from float32's range ends). Products of the parts by a
    bf16 GEMM with float32 output are exact, so a float32 product costs tensor-core GEMMs instead of a
    float32 GEMM (see :mod:`llava.model.float32_products`). The parts are rounded by :func:`_bf16_part`, so
    the final cast is exact."""
    n = x.shape[1]
    x = torch.nn.functional.pad(x, (0, 0, 0, -n % _ALIGN))[:, None]  # (B, 1, M, D)
    hi = _bf16_part(x)
    rest = x - hi
    mid = _bf16_part(rest)
    # the three parts chosen by a part index. torch.compile makes this one pointwise kernel when x is cheap
    # to reload (a GEMM's output, as in _static_clusters). Fed longer expressions (x / a gathered length),
    # it kept the bits and remainders in memory and took two kernels, as a stack of the parts did.
    part = torch.arange(3, device=x.device)[None, :, None, None]
    parts = torch.where(part == 0, hi, torch.where(part == 1, mid, rest - mid))  # (B, 3, M, D)
    return parts.to(torch.bfloat16).flatten(1, 2)


def _split_gram(parts: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 3M, D) parts of :func:`split_bf16` -> (B, n, n) float32 x_i . x_j from two GEMMs, [hi; mid; lo] by hi
    and mid by mid (4 of the 9 part blocks; the Gram is symmetric, so hi.mid and hi.lo are the transposes of
    mid.hi and lo.hi), summed hi.hi + (hi.mid + mid.hi) + (hi.lo + lo.hi + mid.mid), small terms first (the
    dropped mid.lo, lo.mid and lo.lo are below float32's own rounding of the product)."""
    m = parts.shape[1] // 3
    by_hi = float32_matmul(parts, parts[:, :m].mT)  # (B, 3M, M)
    mid = parts[:, m : 2 * m]
    middle = float32_matmul(mid, mid.mT)[:, :n, :n]
    high, cross, low = by_hi[:, :n, :n], by_hi[:, m : m + n, :n], by_hi[:, 2 * m : 2 * m + n, :n]
    return high + ((cross + cross.mT) + ((low + low.mT) + middle))


def _splits(x: torch.Tensor) -> bool:
    """Whether a set's products take the three-bf16 split: float32 sets on CUDA (tensor-core GEMMs)."""
    return x.dtype == torch.float32 and x.is_cuda


def _static_clusters(
    x: torch.Tensor,
    valid: torch.Tensor,
    counts: torch.Tensor,
    knn: int,
    beta: float,
    dtype: torch.dtype,
    length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) sets (members ``valid`` (B, N), in position order), (B,) centre counts -> (B, N) centre masks
    and (B, N, D) values in ``dtype`` (merged at the centres): :func:`_dpc_centres` + :func:`_merge` with the
    members left in place. k = min(knn, count) per set; distances by the matmul form with self-distance 0
    (:func:`llava.model.dpc_knn.gram_distances`); the merge sums are a one-hot product (float32).

    ``length`` (B,) float32: the sets are x / length (a window's sums and its frame count). float32 sets on
    CUDA take both products from the three-bf16 split (:func:`split_bf16`) of x itself, then divide by the
    length (its square for the Gram): the split reads a product's output directly, in one pass."""
    batch, n, _ = x.shape
    parts = split_bf16(x) if _splits(x) else None
    scale = None if length is None else length[:, None, None]
    if parts is None:
        x = x if scale is None else x / scale
        dist = gram_distances(x)
    else:
        gram = _split_gram(parts, n)
        dist = gram_distances(x, gram if scale is None else gram / scale.square())
    pair = valid[:, :, None] & valid[:, None, :]
    widest = min(knn, n)
    nearest = k_smallest(dist.masked_fill(~pair, torch.inf), widest)  # (B, N, widest) ascending
    k = counts.clamp(min=1, max=widest)
    taken = torch.arange(widest, device=x.device) < k[:, None, None]
    rho = torch.exp(-(nearest.square().masked_fill(~taken, 0.0).sum(dim=-1) / k[:, None]))
    density = torch.where(valid, rho, -1.0)
    far = dist.masked_fill(~pair, 0.0).amax(dim=(1, 2))
    delta = torch.where(_ahead(density), dist, far[:, None, None]).amin(dim=-1)
    score = torch.where(valid, density * delta, -torch.inf)
    centre = valid & (_ahead(score).sum(dim=-1) < counts[:, None])
    nearest_centre = torch.where(centre[:, None, :], dist, torch.inf).argmin(dim=-1)  # (B, N) first minimum
    member = (valid & ~centre)[:, :, None] & (nearest_centre[:, :, None] == torch.arange(n, device=x.device))
    pick = member.mT  # (B, N centres, N members), 0 / 1: exact in any dtype
    if parts is None:
        sums = float32_matmul(pick.to(x.dtype), x)
    else:  # the three parts summed in one float32 accumulator
        pick = torch.nn.functional.pad(pick.to(torch.bfloat16), (0, parts.shape[1] // 3 - n))
        sums = float32_matmul(pick.repeat(1, 1, 3), parts)
        if scale is not None:
            sums, x = sums / scale, x / scale
    sums = sums.to(dtype)  # (B, N, D): each centre's members summed
    size = member.sum(dim=1, dtype=torch.float32).to(dtype)[..., None]
    values = x.to(dtype)
    merged = beta * values + (1.0 - beta) * (sums / size.clamp(min=1))
    return centre, torch.where(size > 0, merged, values)


def _static_similarity(features: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, P, D) -> the (F-1, P) cosines of :func:`frame_similarity` and whether every feature is finite (0-d).

    float32: dot / (|a| |b|) (norms clamped at 1e-12 as there), equal to the unit-vector form up to float32
    rounding. The finite check rides on the squared norms: each term is x^2 + 0 * x, which is x^2 exactly
    for a finite x and NaN for a NaN or an Inf, so a row's sum is NaN exactly when the row holds one (a
    finite overflow gives +Inf, not NaN). torch.compile computes it in the similarity's one pass over the
    features; separate isfinite() or 0 * x reductions took two more passes. Other score dtypes keep the
    unit-vector form, whose roundings in that dtype the threshold comparison would otherwise see."""
    if dtype != torch.float32 or features.shape[0] < 2:
        return _similarity(features, dtype)[0], torch.isfinite(features).all()
    x = features.float()
    before, after = x[:-1], x[1:]
    dot = (before * after).sum(dim=-1)
    square_before = (before.square() + before * 0.0).sum(dim=-1)
    square_after = (after.square() + after * 0.0).sum(dim=-1)
    norms = square_before.sqrt().clamp_min(1e-12) * square_after.sqrt().clamp_min(1e-12)
    finite = ~(square_before.isnan().any() | square_after.isnan().any())
    return dot / norms, finite


def static_selection(
    features: torch.Tensor, importance: torch.Tensor, plan: StaticPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom on one video with every shape fixed by (F, P, D) and ``plan``: what torch.compile traces.

    Returns sources (cap,) ascending, padded with F * P; their values (cap, D); the kept count K (0-d) and
    a validity flag (0-d: finite inputs, K within the cap): the selection is sources[:K], values[:K].

    Windows, budgets and ranks stay on the device (:func:`device_windows`). The static sets sit in S slots
    (the j-th window of >= 2 frames in slot j), each with all P positions and its static ones as members;
    their means are one product with the 0/1 window masks. With contextual_ratio > 0, each frame's
    dynamic tokens that are not dominant form F more sets. All sets go through one DPC-kNN merge.
    """
    n_frames, per_frame, dim = features.shape
    total, device = n_frames * per_frame, features.device
    dtype = torch.float32 if plan.float32 else features.dtype
    frames = torch.arange(n_frames, device=device)
    similarity, finite = _static_similarity(features, dtype)
    finite = finite & torch.isfinite(importance).all()
    first, last, static, reduced = device_windows(similarity, plan.tau, plan.width)

    n_static = static.sum(dim=1)  # (F,) the static positions of each frame's window
    ratio = (plan.retention / ((total - reduced.double()) / total)).clamp(max=1.0)  # r', float64 as on the host
    keep = torch.ceil((per_frame - n_static).double() * ratio).long()
    n_dominant = torch.round(keep.double() * plan.keep_share).long()  # half-even, as Python's round
    score = torch.where(static, -torch.inf, importance.float())
    dominant = _ahead(score).sum(dim=-1) < n_dominant[:, None]  # (F, P) top by importance, ties: lower index

    sets, members, counts, lengths = [], [], [], []
    opens = (last > first) & (frames == first)  # (F,) frames that open a window of >= 2 frames
    slot = opens.long().cumsum(0) - 1
    if plan.slots:
        slots = torch.arange(plan.slots, device=device)
        match = opens[None, :] & (slot[None, :] == slots[:, None])  # (S, F)
        real = match.any(dim=1)
        slot_first = torch.where(match, frames[None, :], 0).amax(dim=1).clamp(0, n_frames - 1)  # see device_windows
        slot_last = last[slot_first]
        inside = real[:, None] & (frames[None, :] >= slot_first[:, None]) & (frames[None, :] <= slot_last[:, None])
        sums = float32_matmul(inside.to(features.dtype), features.reshape(n_frames, per_frame * dim))
        length = (slot_last - slot_first + 1).float()
        if plan.float32:  # the windows' sums, divided by their lengths inside the clustering
            sets.append(sums.view(plan.slots, per_frame, dim))
        else:  # the windows' means in the score dtype
            sets.append((sums / length[:, None]).view(plan.slots, per_frame, dim).to(dtype))
        lengths.append(length)
        members.append(static[slot_first] & real[:, None])
        counts.append(torch.where(real, torch.round(n_static[slot_first].double() * ratio).long(), 0))
    if plan.contextual:
        sets.append(features.to(dtype))
        members.append(~static & ~dominant)
        counts.append(keep - n_dominant)
        lengths.append(torch.ones(n_frames, device=device))
    kept = dominant
    if sets:
        x = sets[0] if len(sets) == 1 else torch.cat(sets)
        valid, count = torch.cat(members), torch.cat(counts)
        length = torch.cat(lengths) if plan.float32 else None
        centre, merged = _static_clusters(x, valid, count, plan.knn, plan.beta, dtype, length)
    if plan.slots:  # a window's static centres sit at its first frame
        at_slot = torch.where(opens, slot, plan.slots).clamp(0, plan.slots)  # clamped: see device_windows
        static_centre = torch.cat([centre[: plan.slots], centre.new_zeros(1, per_frame)])[at_slot]  # (F, P)
        kept = kept | static_centre
    if plan.contextual:
        kept = kept | centre[plan.slots :]
    flat = kept.reshape(-1)
    count = flat.sum()
    place = torch.where(flat, flat.cumsum(0) - 1, plan.cap).clamp(max=plan.cap)  # padding and overflow: a sink
    index = torch.arange(total, device=device)
    source = torch.full((plan.cap + 1,), total, dtype=torch.int64, device=device).scatter_(0, place, index)
    source = source[: plan.cap]
    safe = source.clamp(max=total - 1)
    values = features.reshape(total, dim)[safe].to(dtype)
    if plan.contextual:
        contextual = centre[plan.slots :].reshape(-1)[safe]
        values = torch.where(contextual[:, None], merged[plan.slots :].reshape(total, dim)[safe], values)
    if plan.slots:
        frame, position = safe // per_frame, safe % per_frame
        row = at_slot.clamp(max=plan.slots - 1)[frame] * per_frame + position
        from_static = static_centre.reshape(-1)[safe]
        values = torch.where(from_static[:, None], merged[: plan.slots].reshape(-1, dim)[row], values)
    return source, values, count, finite & (count <= plan.cap)


def _static_padded(
    features: torch.Tensor, importance: torch.Tensor, retention: float, options: HoliTomOptions, execution: str
) -> VideoSelection:
    """The static formulation (compiled on CUDA with execution='compiled') as a padded selection with its
    count and validity on the device: no host read (the adapter's count read covers them)."""
    n_frames, per_frame, _ = features.shape
    plan = static_plan(n_frames, per_frame, retention, options, features.dtype)
    select = functools.partial(static_selection, plan=plan)
    if execution == "compiled" and features.is_cuda:
        select = compiled(select, _OWNER, key=(_OWNER, plan), alternatives="execution=eager")
    source, values, count, valid = select(features, importance)
    return VideoSelection(source, values, valid=valid, count=count)


def _exact(selection: VideoSelection, retention: float) -> VideoSelection:
    """A padded selection cut to its count (one host read); invalid: non-finite inputs; empty: a static clip."""
    selection, ok = read_padded(selection)
    if not ok:
        raise ValueError(f"{_OWNER}: features or importance contain NaN or Inf; refusing to merge them")
    if selection.source.numel() == 0:
        raise ValueError(f"{_OWNER} kept no token at R={retention}: {EMPTY_REASON}")
    return selection


# ------------------------------------------------------------------------------ the method


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-to-device copy that does not stall the stream on CUDA (pinned memory, asynchronous)."""
    return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)


def holitom_select(
    features: torch.Tensor,
    importance: torch.Tensor,
    retention: float,
    options: HoliTomOptions | None = None,
    *,
    padded: bool = False,
) -> VideoSelection:
    """One video's (F, P, D) features and (F, P) importance -> sources (K,) ascending and features (K, D).

    Output features are float32 (``score_dtype="float32"``) or the input dtype (``"model"``).
    Eager: one host synchronisation, reading (F-1) x (W-1) run-length counts and a finite flag together;
    the DP runs on the host, then every size is known there and the device work is batched over the
    frames (dominant top-k) and over the windows' and frames' token sets (one padded DPC-kNN merge).
    Static / compiled: no host read before the end (:func:`static_selection`); ``padded`` returns its
    padded outputs with ``count`` and ``valid`` instead of reading them (the registry's path; the eager
    execution ignores it).
    """
    options = options or HoliTomOptions()
    check_video_features(features, retention)
    n_frames, per_frame, dim = features.shape
    if tuple(importance.shape) != (n_frames, per_frame):
        raise ValueError(
            f"{_OWNER}: importance must be (F, P) = {(n_frames, per_frame)}, got {tuple(importance.shape)}"
        )
    execution = options.execution or ("compiled" if features.is_cuda and options.seed is None else "eager")
    if execution != "eager":
        selection = _static_padded(features, importance, retention, options, execution)
        return selection if padded else _exact(selection, retention)
    dtype = torch.float32 if options.score_dtype == "float32" else features.dtype

    # Queued behind the vision tower: no host wait until the one copy below.
    similarity, norm_total = _similarity(features, dtype)
    run = static_run_lengths(similarity, options.tau)
    width = min(n_frames, options.max_window)
    total = norm_total + importance.sum()  # NaN or Inf anywhere -> non-finite (or a finite overflow)
    finite = (total * 0 == 0).long()
    host = torch.cat([shorter_runs(run, width).reshape(-1), finite[None]]).tolist()  # the one sync
    if not host.pop() and not (bool(torch.isfinite(features).all()) and bool(torch.isfinite(importance).all())):
        raise ValueError(f"{_OWNER}: features or importance contain NaN or Inf; refusing to merge them")
    windows, total_reduced = partition(host, n_frames, per_frame, width)
    ratio = adjusted_ratio(float(retention), n_frames * per_frame, total_reduced)
    plan = _Plan(windows, host, n_frames, per_frame, width, ratio, options)
    if plan.kept == 0:
        raise ValueError(f"{_OWNER} kept no token at R={retention}: {EMPTY_REASON}")
    return _build(features, importance, run, plan, dtype, options.beta)


class _Plan:
    """Every budget the DP implies, as host data: per frame, and per token set to cluster.

    Sets: one per window with static clusters (its static positions' means), grouped by window length,
    then one per frame with contextual centres (its dynamic tokens that are not dominant).
    """

    def __init__(
        self,
        windows: list[tuple[int, int]],
        shorter: list[int],
        n_frames: int,
        per_frame: int,
        width: int,
        ratio: float,
        options: HoliTomOptions,
    ) -> None:
        self.frame_start: list[int] = []  # per frame: the run row of its window's first frame
        self.frame_need: list[int] = []  # per frame: the run length a static position needs (F: none)
        self.frame_dominant: list[int] = []  # per frame: its top-importance dynamic tokens
        by_length: dict[int, list[tuple[int, int, int]]] = {}  # window length -> [(u, n_s, n_cl)]
        contextual: list[tuple[int, int, int]] = []  # (t, n_rest, n_ctx)
        draws: list[tuple[str, int, int]] = []  # noise draws in upstream's order: (kind, frame, n)
        self.kept = 0
        for u, v in windows:
            n_static = per_frame - shorter[u * (width - 1) + v - u - 1] if v > u else 0
            n_dynamic = per_frame - n_static
            keep = math.ceil(n_dynamic * ratio)
            n_dominant = round(keep * (1.0 - options.contextual_ratio))
            n_contextual = keep - n_dominant
            n_clusters = round(n_static * ratio)  # half-even, as upstream's round()
            self.kept += (v - u + 1) * keep + n_clusters
            for t in range(u, v + 1):
                self.frame_start.append(u if v > u else min(u, n_frames - 2))
                self.frame_need.append(v - u if v > u else n_frames)
                self.frame_dominant.append(n_dominant)
                if n_contextual:
                    contextual.append((t, n_dynamic - n_dominant, n_contextual))
                    draws.append(("c", t, n_dynamic - n_dominant))
            if n_clusters:
                by_length.setdefault(v - u + 1, []).append((u, n_static, n_clusters))
                draws.append(("s", u, n_static))
        self.any_static = any(need < n_frames for need in self.frame_need)
        self.set_row: list[int] = []  # the row listing the set's tokens: u (static), F + t or t (contextual)
        self.set_base: list[int] = []  # flat index of the set's frame: u * P or t * P
        self.set_need: list[int] = []  # static sets: the run length their positions have (v - u)
        self.groups: list[tuple[int, int, int, list[int]]] = []  # (first set, end, N_g, frames of the windows)
        sizes, counts = [], []
        for length in sorted(by_length):
            members = by_length[length]
            frames = [u + j for u, _, _ in members for j in range(length)]
            self.groups.append((len(sizes), len(sizes) + len(members), max(n for _, n, _ in members), frames))
            for u, n_static, n_clusters in members:
                self.set_row.append(u)
                self.set_need.append(length - 1)
                self.set_base.append(u * per_frame)
                sizes.append(n_static)
                counts.append(n_clusters)
        self.n_static_sets = len(sizes)
        self.contextual_frames = [t for t, _, _ in contextual]
        for t, n_rest, n_contextual in contextual:  # rows of [static; rest], or of rest alone
            self.set_row.append(n_frames + t if self.any_static else t)
            self.set_base.append(t * per_frame)
            sizes.append(n_rest)
            counts.append(n_contextual)
        self.sets = _Sets(sizes, counts, [min(options.knn, c) for c in counts])
        if options.seed is not None and sizes:
            # upstream's density noise from one CPU generator, drawn in its order (per window: each frame's
            # contextual set, then the static set): a host loop, one small draw per set, no device work
            row_of = {("s", self.set_row[b]): b for b in range(self.n_static_sets)}
            row_of.update({("c", t): self.n_static_sets + i for i, t in enumerate(self.contextual_frames)})
            generator = torch.Generator().manual_seed(options.seed)
            noise = torch.zeros(len(sizes), max(sizes))
            for kind, frame, n in draws:
                noise[row_of[(kind, frame)], :n] = torch.rand(n, generator=generator)
            self.sets.noise = noise

    def frame_masks(self) -> bool:
        """Whether the (F, P) static masks are needed (the dominant top-k or the contextual sets use them);
        static sets alone read their rows straight from the run lengths."""
        return self.any_static and (any(self.frame_dominant) or bool(self.contextual_frames))

    def device_ints(self) -> dict[str, list[int]]:
        """The host ints the device work needs, by name (only those it needs for this video)."""
        sets = self.sets
        out: dict[str, list[int]] = {}
        if self.frame_masks():
            out["start"], out["need"] = self.frame_start, self.frame_need
        elif self.n_static_sets:
            out["set_need"] = self.set_need
        if len(set(self.frame_dominant)) > 1:
            out["dominant"] = self.frame_dominant
        if sets.sizes:
            out["row"], out["base"] = self.set_row, self.set_base
            if sets.padded(max(sets.sizes)):
                out["sizes"] = sets.sizes
            if len(set(sets.counts)) > 1:
                out["counts"] = sets.counts
            if len(set(sets.ks)) > 1:
                out["ks"] = sets.ks
            if len(self.groups) > 1 or self.groups and self.groups[0][1] - self.groups[0][0] > 1:
                for first, _, _, frames in self.groups:
                    out[f"frames{first}"] = frames
            if self.contextual_frames:
                out["contextual"] = self.contextual_frames
        return out


def _build(
    features: torch.Tensor, importance: torch.Tensor, run: torch.Tensor, plan: _Plan, dtype: torch.dtype, beta: float
) -> VideoSelection:
    """The selection from the plan: top-k batched over frames, the DPC-kNN merges over padded sets."""
    n_frames, per_frame, dim = features.shape
    device = features.device
    sets = plan.sets
    n_sets = len(sets.sizes)
    # ONE host-to-device copy of every per-frame / per-set int, first after the sync (the stream is idle)
    wanted = plan.device_ints()
    packed = _to_device(torch.tensor([v for block in wanted.values() for v in block] or [0]), device)
    ints, offset = {}, 0
    for name, block in wanted.items():
        ints[name], offset = packed[offset : offset + len(block)], offset + len(block)
    if sets.noise is not None:
        sets.noise = _to_device(sets.noise, device)
    sets.sizes_t, sets.counts_t, sets.ks_t = ints.get("sizes"), ints.get("counts"), ints.get("ks")
    positions = torch.arange(n_frames * per_frame, device=device)  # sliced for every arange below

    # each frame's static mask (its window's) and dominant tokens (top importance among the dynamic ones)
    static = run.index_select(0, ints["start"]) >= ints["need"][:, None] if plan.frame_masks() else None  # (F, P)
    dominant = marks = None
    if any(plan.frame_dominant):
        score = importance.float() if static is None else torch.where(static, -torch.inf, importance.float())
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # ties: the lower index
        rank = torch.empty_like(order).scatter_(1, order, positions[:per_frame].expand(n_frames, per_frame))
        dominant = rank < (ints["dominant"][:, None] if "dominant" in ints else plan.frame_dominant[0])
        marks = dominant.reshape(-1).long()  # (F * P,): 1 where a token is kept (at its own index)

    centre = merged = flat = None
    if n_sets:
        # each set's tokens in index order: the window's static positions or the frame's contextual tokens
        # (dynamic, not dominant), listed by a stable sort of "not a member"
        if plan.contextual_frames:
            taken = [mask for mask in (static, dominant) if mask is not None]
            if not taken:
                rest = torch.ones(n_frames, per_frame, dtype=torch.bool, device=device)
            else:
                rest = ~taken[0] if len(taken) == 1 else ~(taken[0] | taken[1])
            table = torch.cat([static, rest]) if static is not None else rest
            rows = table.index_select(0, ints["row"])
        elif static is not None:
            rows = static.index_select(0, ints["row"])
        else:  # static sets only: their windows' static positions straight from the run lengths
            rows = run.index_select(0, ints["row"]) >= ints["set_need"][:, None]
        width = max(sets.sizes)
        tokens = torch.sort(torch.where(rows, 0, 1), dim=-1, stable=True).indices[:, :width]  # (B, N)
        # the sets' values, (B, N, D): static means (one gather per window length) and contextual tokens;
        # written straight into one zero-padded buffer unless a single part fills it
        single = len(plan.groups) + bool(plan.contextual_frames) == 1 and (
            not plan.groups or plan.groups[0][2] == width
        )
        x = None if single else torch.zeros(n_sets, width, dim, dtype=dtype, device=device)
        for first, end, n_group, frames in plan.groups:
            length = len(frames) // (end - first)
            if f"frames{first}" in ints:
                frame_index = ints[f"frames{first}"].view(end - first, length, 1)
                window = features[frame_index, tokens[first:end, None, :n_group]]  # (n_g, L, N_g, D)
            else:  # one window: a slice of the frames
                window = features[frames[0] : frames[0] + length, tokens[first, :n_group]][None]
            if x is None:
                x = window.to(dtype).mean(dim=1)
            else:
                torch.mean(window.to(dtype), dim=1, out=x[first:end, :n_group])
        if plan.contextual_frames:
            n_rest = max(sets.sizes[plan.n_static_sets :])
            picked = features[ints["contextual"][:, None], tokens[plan.n_static_sets :, :n_rest]]
            if x is None:
                x = picked.to(dtype)
            else:
                x[plan.n_static_sets :, :n_rest].copy_(picked)
        centre, merged = _cluster_sets(x, sets, beta, positions)
        flat = ints["base"][:, None] + tokens  # (B, N) flat index of each set token (a centre's source)
        if marks is None:
            marks = torch.zeros(n_frames * per_frame, dtype=torch.int64, device=device)
        marks.scatter_add_(0, flat.reshape(-1), centre.reshape(-1).long())  # padding adds 0 (to any index)

    # compaction with the count known on the host: the j-th kept token (ascending) goes to slot j + 1,
    # everything else to slot 0, a sink
    slot = marks.cumsum(0) * marks
    source = torch.zeros(plan.kept + 1, dtype=torch.int64, device=device).scatter_(0, slot, positions)
    values = features.reshape(-1, dim).index_select(0, source).to(dtype)
    if centre is not None:
        values.index_put_(((slot[flat] * centre).reshape(-1),), merged.reshape(-1, dim))  # non-centres: sink
    return VideoSelection(source[1:], values[1:])


def _select(video: VideoTokens, retention: float, options: HoliTomOptions) -> VideoSelection:
    if options.port == "authors":
        importance = video.features.to(torch.float32 if options.score_dtype == "float32" else video.features.dtype)
        importance = importance.norm(dim=-1).float()
    else:
        importance = video.signal(VIT_RECEIVED_ATTENTION)
    return holitom_select(video.features, importance, retention, options, padded=True)


# ------------------------------------------------------------------------------ inner merge M (in the LLM)


def sequential_merge(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    visual: torch.Tensor,
    keep: torch.Tensor,
    kept: Sequence[int],
    dropped: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, L, D) hidden states -> the same with every dropped video token averaged into its most similar
    kept one, in index order: h_keep <- (h_keep + h_drop) / 2, one after the other (upstream's loop).

    Closed form, all rows and tokens at once: a kept token that receives d_1 < ... < d_m ends as
    h / 2^m + sum_i d_i / 2^(m - i + 1) (the powers of 2 by ldexp, exact). Similarity: cosine of the
    hidden states as they enter the layer (each norm clamped at 1e-8), computed once before any merge, as
    upstream; ties go to the kept token of higher attention (upstream's topk order, first maximum).
    scores (B, L) the attention ranking the tokens; keep (B, L) the kept video tokens; kept / dropped per
    row (host ints). The merge runs in ``dtype`` and is cast back to the hidden states' dtype.
    """
    batch, length, dim = hidden.shape
    device = hidden.device
    n_keep, n_drop = max(kept), max(dropped)
    if n_drop == 0 or n_keep == 0:
        return hidden
    # kept tokens in decreasing attention (upstream's topk order), dropped ones in index order
    kept_at = torch.sort(scores.masked_fill(~keep, -torch.inf), dim=1, descending=True, stable=True).indices[:, :n_keep]
    gone = visual & ~keep
    drop_at = torch.sort(torch.where(gone, 0, 1), dim=1, stable=True).indices[:, :n_drop]
    kept_ok = torch.arange(n_keep, device=device)[None] < torch.tensor(list(kept), device=device)[:, None]
    drop_ok = torch.arange(n_drop, device=device)[None] < torch.tensor(list(dropped), device=device)[:, None]
    h_keep = torch.gather(hidden, 1, kept_at[..., None].expand(batch, n_keep, dim)).to(dtype)
    h_drop = torch.gather(hidden, 1, drop_at[..., None].expand(batch, n_drop, dim)).to(dtype)
    unit_keep = h_keep / torch.linalg.vector_norm(h_keep, dim=-1, keepdim=True).clamp_min(1e-8)
    unit_drop = h_drop / torch.linalg.vector_norm(h_drop, dim=-1, keepdim=True).clamp_min(1e-8)
    similarity = torch.matmul(unit_drop, unit_keep.transpose(1, 2)).masked_fill(~kept_ok[:, None, :], -torch.inf)
    target = similarity.argmax(dim=-1)  # (B, Dm) slot among the kept, the first maximum
    # group the dropped tokens by target (flat keys b * Km + slot; padding to a sink), index order kept
    sink = batch * n_keep
    key = torch.where(drop_ok, torch.arange(batch, device=device)[:, None] * n_keep + target, sink).reshape(-1)
    received = torch.zeros(sink + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    order = torch.sort(key, stable=True).indices
    first = received.cumsum(0) - received  # where each target's run starts in the sorted order
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(key.numel(), device=device) - first[key[order]])
    one = torch.ones((), device=device)  # float32 exponents: exact integers, exact powers of 2 (then cast)
    w_drop = torch.ldexp(one, -(received[key] - rank).float()).to(dtype)  # 2^-(m - rank): the last one 1/2
    w_keep = torch.ldexp(one, -received[:sink].float()).to(dtype).view(batch, n_keep, 1)
    flat = torch.zeros(sink + 1, dim, dtype=dtype, device=device)
    flat.index_add_(0, key, h_drop.reshape(-1, dim) * w_drop[:, None])
    merged = h_keep * w_keep + flat[:sink].view(batch, n_keep, dim)
    place = torch.where(kept_ok, kept_at, length)  # padding slots go to a spill row
    out = torch.cat([hidden, hidden.new_zeros(batch, 1, dim)], dim=1)
    out.scatter_(1, place[..., None].expand(batch, n_keep, dim), merged.to(hidden.dtype))
    return out[:, :length]


class HoliTomInnerPlan(InLLMPlan):
    """HoliTom M at layer k (prefill): layer k-1's last-token attention (head mean) ranks the current n video
    tokens, round(n * (1 - r)) stay (at least one), each other one is averaged into its most similar kept
    token (:func:`sequential_merge`) and dropped for layers >= k. Positions inherit (gaps), as upstream's
    position_ids = the kept indices; decoding continues from the uncompressed length."""

    def __init__(self, layer: int, ratio: float, full_map: bool, score_dtype: str) -> None:
        self.boundaries = (Boundary(layer, rows="last", source="previous"),)
        self.ratio = ratio
        self.positions = "inherit"
        self.full_map = full_map
        self.score_dtype = score_dtype

    def act(self, boundary: Boundary, state: LayerState) -> LayerAction:
        kept = tuple(max(1, round(n * (1.0 - self.ratio))) if n else 0 for n in state.visual_now)
        keep = top_visual(state.scores, state.visual, kept)
        dtype = torch.float32 if self.score_dtype == "float32" else state.hidden.dtype
        dropped = [n - k for n, k in zip(state.visual_now, kept, strict=True)]
        values = sequential_merge(state.hidden, state.scores, state.visual, keep, kept, dropped, dtype)
        return LayerAction(keep, kept, values)


def inner_plan(num_layers: int, retention: float, options: HoliTomOptions) -> HoliTomInnerPlan | None:
    """The in-LLM stage of one request (None unless ``inner_merge``); R is the outer stage's alone."""
    if not options.inner_merge:
        return None
    if options.inner_layer >= num_layers:
        raise ValueError(
            f"{_OWNER} option inner_layer={options.inner_layer}: the language model has {num_layers} layers "
            f"(valid 1..{num_layers - 1})"
        )
    return HoliTomInnerPlan(options.inner_layer, options.inner_ratio, options.inner_attention == "eager",
                            options.score_dtype)  # fmt: skip


def _needs(options: HoliTomOptions) -> frozenset[str]:
    outer = frozenset() if options.port == "authors" else frozenset({VIT_RECEIVED_ATTENTION})
    return outer | ({LLM_ATTENTION_ROWS} if options.inner_merge else frozenset())


METHOD = Method(
    name="holitom",
    options=HoliTomOptions,
    stages=(Stage.PRE_LLM, Stage.IN_LLM),
    signals=frozenset({VIT_RECEIVED_ATTENTION, LLM_ATTENTION_ROWS}),
    select=_select,
    merges=True,
    summary="DP temporal windows, static tokens averaged and DPC-kNN merged, dynamic top-k by ViT attention "
    "(inner_merge: HoliTom M at layer 18)",
    needs=_needs,
    plan=inner_plan,
    empty_reason=EMPTY_REASON,
)
