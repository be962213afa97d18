"""FastVID (NeurIPS'25): dynamic segmentation, then per segment salient tokens kept and context tokens merged.

What it does, per video of F frames x P tokens:

1. DySeg. c_t = cos(g_t, g_{t+1}) of the frames' global vectors (signal FRAME_GLOBAL). A segment ends
   after frame t when c_t is one of the ``dyseg_c - 1`` smallest or below ``dyseg_tau``.
2. Budgets. r_f = int(P * R) tokens per frame-equivalent, a share ``stprune_d`` of it context
   (anchor) tokens, the rest salient tokens; how they are spread over a segment's frames depends on the
   variant (below).
3. Salient tokens: each frame's top tokens by salience (signal FRAME_SALIENCE), kept as they are.
4. Anchor tokens: in an anchor frame, the DPC-kNN centres (rho from the ``density_k`` = 4 nearest,
   self included, distances / sqrt(D) in float32; score rho * delta; :mod:`llava.model.dpc_knn`)
   among the frame's non-salient tokens.
5. Merge: every candidate goes to the anchor (of that anchor frame) of largest cosine; each anchor
   becomes w * anchor + (1 - w) * mean(its cluster), w = max(1 / (|cluster| + 1), dtm_beta).
Output: salient tokens and merged anchors, by ascending source (a salient token's own index, an
anchor's own index), as the reference orders them.

Variants (the three released scripts; ``variant="auto"`` picks by model family):
- ``onevision`` (LLaVA-OV): every frame n_sal = r_f - int(r_f * d) salient tokens; in a segment of Ls
  frames the anchor frames are the last one and every ``dtm_p``-th before it, each with
  (n_ctx * Ls) div ceil(Ls / p) anchors (n_ctx = r_f - n_sal). Candidates: the non-salient tokens of
  the frame (1-frame segment) or of every frame of the segment; anchors are candidates too, so they
  join their own cluster. Cosine ties go to the anchor of higher density score.
- ``video`` (LLaVA-Video): a segment gets r_f * Ls tokens, int(. * d) of them context; the salient
  budget is split evenly over its frames (remainder to the first), the context budget over the
  ceil(Ls / p) anchor frames (remainder to the last ones). Candidates: every token of the segment that
  is neither salient nor one of this frame's anchors. Cosine ties go to the anchor of lower index.
- ``qwen`` (Qwen2.5-VL): as ``video`` but seg_ctx = max(int(. * d), 1); a multi-frame segment is cut
  again where c_t < ``dyseg_ignore`` (near-duplicates) and only the last frame of each sub-segment
  gets tokens: salient budget split evenly over the V sub-segments (remainder to the first), context
  over ceil(V / p) anchor sub-segments counted from the end (remainder to the last ones), each capped at
  P div 2, salient capped at P minus the frame's anchors. A 1-frame segment gets both budgets as they are.
Defaults differ by variant, so the knobs are Optional (None = the variant's default):
onevision / video: c 8, tau 0.9, d 0.4, p 4, beta 0.6; qwen: c 8, tau 0.84, ignore 0.95, d 0.4, p 4,
beta 0.6 (the official Qwen script).

R maps onto r_f = int(P * R) directly (``retention_ratio`` upstream); kept ~ F * r_f, a little less
from the integer divisions and the caps. R must leave r_f >= 1, i.e. R >= 1 / P.

Differences from the original code (all three variants):
- Deterministic ties. Upstream breaks DPC density ties with unseeded U(0, 1e-6) noise; here equal
  densities rank by index (lower = denser), or ``seed`` adds upstream's noise from a seeded CPU generator
  (one generator per video, drawn anchor frame by anchor frame). Salience and DySeg top-k ties go to the
  lower index (upstream: whatever torch.topk returns).
- Crashes upstream, handled here: topk of c - 1 gaps with F - 1 < c - 1 (clamped to F - 1, so every gap
  is a cut; F = 1 is one segment), no cut at all (one segment; upstream indexes an empty tensor in the
  video / qwen scripts), more anchors than non-salient tokens at high R (onevision: capped at P - n_sal;
  video: capped at P - the frame's salient count), segments without salient or context tokens
  (upstream concatenates empty lists), fewer than 4 tokens for the density (k clamped), zero vectors in a
  cosine (normalised with eps 1e-12 instead of NaN), non-finite inputs (ValueError).
- onevision: whether an anchor frame merges within itself or over its segment is decided by the
  segment's length; upstream decides by "anchor count == n_ctx", which for p = 1, or p = 2 with
  n_ctx = 1, also makes anchor frames of multi-frame segments merge within their frame only.
- Merging runs in float32 (upstream: the model dtype); ``merge_dtype="model"`` merges in the features'
  dtype (the cluster sums accumulate in float32 and round once, as a matmul in that dtype does). Density
  distances are float32 in both, as upstream.
- video: upstream strips LLaVA-Video's row newlines itself (hard-coded 64 x 13 x 13) and re-inserts the
  newline of every row that keeps a token; here the features come without newlines (P = 169) and the
  adapter's layout policy places newlines.
- Output: one selection per video (upstream: batch size 1, one video per request).

Executions (``execution``; default: compiled on CUDA, eager on the CPU and with ``seed``):
- ``compiled`` / ``static``: every shape fixed by (F, P, D, R, knobs), so torch.compile compiles once per
  video shape and nothing is read on the host until the adapter's count read. DySeg's flags stay on the
  device (segment id = cumulative cuts); each frame's budgets come from a host table of
  :func:`frame_budgets` per segment shape (length, and qwen's sub-segment count), exact for every layout.
  Every frame is ranked; the kept tokens fill compact slots sized by the most any layout can keep (a DP
  over segmentations), and the merge scores all rows against those anchor slots in one product, masking
  anchor frames outside a row's segment. Products of bf16 / fp16 features run in that dtype with float32
  accumulation (:func:`llava.model.float32_products.float32_matmul`: the float32 products up to summation
  order). Distances use the matmul form with self-distances 0. Against eager: the same sources on every
  CPU test case, features within float32 rounding; the compiled kernels may round reductions (DySeg
  cosines, densities) differently, which can flip exact near-ties. ``seed`` draws its noise per anchor
  frame in the order the host layout gives, so it runs eager. float32 features compile too, but their
  products are float32 GEMMs.
- ``eager``: the layout read on the host, then batched ops sized by it (below).

Implementation (eager): one host sync per video, a small read of DySeg's cut flags with the finite check.
Before it, all that the segments do not decide is queued: the salience order and, for onevision (every
frame has the same salient count), every frame's non-salient rows and their DPC-kNN ranks in one
(F, M, M) batch. After it, a fixed number of batched ops however many anchor frames: video / qwen rank
their anchor frames' non-salient tokens in one padded, masked batch; the merge scores every frame's rows
against the anchors of its segment (one bmm, padded to the segment with most anchor slots), takes the
argmax within each anchor frame's slots, and sums the one-hot clusters per frame and then per segment
(matmuls, deterministic); the output comes from one sort of the kept keys, sized from the budgets. Only
``seed`` draws its noise in a short CPU loop over anchor frames (one draw each, as the reference does).
Against a loop over anchor frames the outputs are the same up to float32 summation order (sources equal;
features within about 1 ulp; an exact cosine tie, e.g. between orthogonal integer vectors, may then go
either way, as it may between CPU and CUDA).

The VidCom2 authors' Qwen port (``port="authors"``, labelled): salience = the L2 norm of each token's
features (FRAME_SALIENCE is not read: ``Method.needs`` lists FRAME_GLOBAL alone), the qwen variant,
the port's defaults (c 8, tau 0.84, ignore 0.99, d 0.5, p 4, beta 0.5) and seg_ctx = 0 when
seg_retain = 1. Differences from the port:
the port scores in the model dtype (bf16; here the norms and density are float32), and it breaks ties
with unseeded noise as upstream does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llava.model.compiled_select import compiled
from llava.model.dpc_knn import gram_distances, k_smallest, pairwise_distances, stable_top
from llava.model.float32_products import float32_matmul
from llava.model.method_api import (
    FRAME_GLOBAL,
    FRAME_SALIENCE,
    Method,
    VideoSelection,
    VideoTokens,
    check_choice,
    check_range,
    check_static_execution,
    read_padded,
)
from llava.model.vidcom2 import check_video_features

OWNER = "fastvid"
VARIANTS = ("onevision", "video", "qwen")
PORTS = ("original", "authors")
MERGE_DTYPES = ("float32", "model")
FAMILY_VARIANTS = {"llava_onevision": "onevision", "llava_video": "video"}  # and every "qwen*" -> qwen
_EPS = 1e-12

# (dyseg_c, dyseg_tau, dyseg_ignore, stprune_d, dtm_p, dtm_beta) of each reference script
_LLAVA_DEFAULTS = (8, 0.9, None, 0.4, 4, 0.6)
DEFAULTS: dict[str, tuple] = {
    "onevision": _LLAVA_DEFAULTS,
    "video": _LLAVA_DEFAULTS,
    "qwen": (8, 0.84, 0.95, 0.4, 4, 0.6),
    "authors": (8, 0.84, 0.99, 0.5, 4, 0.5),
}


def _check_int(key: str, value: int | None, low: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{OWNER} option {key} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class FastVIDOptions:
    """FastVID's knobs; None = the default of the resolved variant (see the module docstring).

    variant: "auto" (by model family: llava_onevision -> onevision, llava_video -> video, qwen* -> qwen),
        or "onevision" / "video" / "qwen" (the budgeting of each released script).
    port: "original" (FastVID's own code) or "authors" (the VidCom2 authors' Qwen port: L2-norm
        salience, qwen variant, its defaults, seg_ctx = 0 when a segment keeps one token).
    dyseg_c: DySeg's minimum number of segments c (the c - 1 least similar frame gaps are cuts).
    dyseg_tau: DySeg's similarity threshold tau (every gap with cos < tau is a cut too).
    dyseg_ignore: qwen only: inside a segment, gaps with cos >= this are near-duplicates whose earlier
        frame gets no tokens.
    stprune_d: d, the context (anchor) share of the budget.
    dtm_p: p, the anchor-frame stride within a segment (counted back from its last frame).
    dtm_beta: beta, the floor of the anchor's own weight w in the merge.
    density_k: neighbours (self included) of the DPC-kNN density (4 upstream).
    seed: None = deterministic index tie-break of densities; an int adds upstream's U(0, 1e-6) density
        noise from a CPU generator seeded with it.
    merge_dtype: "float32" (default) or "model": the cosine assignment and the weighted means in the
        features' dtype, as upstream does.
    execution: None (default: "compiled" on CUDA, "eager" on the CPU or with ``seed``), "compiled" (the
        static-shape formulation through torch.compile; on the CPU it runs uncompiled), "static" (the same
        formulation, never compiled) or "eager" (the layout read on the host, then batched ops sized by
        it). See the module docstring's Executions paragraphs.
    """

    variant: str = "auto"
    port: str = "original"
    dyseg_c: int | None = None
    dyseg_tau: float | None = None
    dyseg_ignore: float | None = None
    stprune_d: float | None = None
    dtm_p: int | None = None
    dtm_beta: float | None = None
    density_k: int = 4
    seed: int | None = None
    merge_dtype: str = "float32"
    execution: str | None = None

    def __post_init__(self) -> None:
        check_choice(OWNER, "variant", self.variant, ("auto", *VARIANTS))
        layout = "draws upstream's noise per anchor frame, which only the host layout knows"
        check_static_execution(OWNER, self.execution, self.seed, layout)
        check_choice(OWNER, "port", self.port, PORTS)
        check_choice(OWNER, "merge_dtype", self.merge_dtype, MERGE_DTYPES)
        if self.port == "authors" and self.variant not in ("auto", "qwen"):
            raise ValueError(f"{OWNER} port=authors is the qwen variant; got variant={self.variant!r}")
        if self.variant in ("onevision", "video") and self.dyseg_ignore is not None:
            raise ValueError(f"{OWNER} option dyseg_ignore applies to the qwen variant only, not {self.variant!r}")
        _check_int("dyseg_c", self.dyseg_c, 1)
        _check_int("dtm_p", self.dtm_p, 1)
        _check_int("density_k", self.density_k, 1)
        _check_int("seed", self.seed, 0)
        for key in ("dyseg_tau", "dyseg_ignore"):
            if getattr(self, key) is not None:
                check_range(OWNER, key, getattr(self, key), -1.0, 1.0)
        if self.stprune_d is not None:
            check_range(OWNER, "stprune_d", self.stprune_d, 0.0, 1.0)
        if self.dtm_beta is not None:
            check_range(OWNER, "dtm_beta", self.dtm_beta, 0.0, 1.0)


@dataclass(frozen=True)
class Knobs:
    """The options resolved for one video: the variant and every knob's value."""

    variant: str
    authors: bool
    c: int
    tau: float
    ignore: float | None
    d: float
    p: int
    beta: float
    k: int


def resolve_variant(options: FastVIDOptions, family: str) -> str:
    """The variant to run: the explicit one, or the model family's (port=authors: qwen)."""
    if options.port == "authors" or options.variant != "auto":
        return "qwen" if options.port == "authors" else options.variant
    if family in FAMILY_VARIANTS:
        return FAMILY_VARIANTS[family]
    if family.startswith("qwen"):
        return "qwen"
    raise ValueError(
        f"{OWNER} cannot pick its variant for model family {family!r}: set the option variant to one of "
        f"{', '.join(VARIANTS)}"
    )


def resolve_knobs(options: FastVIDOptions | None, family: str = "") -> Knobs:
    """Options + model family -> the knobs of one run (None fields take the variant's defaults)."""
    options = options or FastVIDOptions()
    variant = resolve_variant(options, family)
    authors = options.port == "authors"
    c, tau, ignore, d, p, beta = DEFAULTS["authors" if authors else variant]
    if variant != "qwen" and options.dyseg_ignore is not None:
        raise ValueError(f"{OWNER} option dyseg_ignore applies to the qwen variant only, not {variant!r}")

    def pick(value, default):
        return default if value is None else value

    return Knobs(
        variant=variant,
        authors=authors,
        c=pick(options.dyseg_c, c),
        tau=float(pick(options.dyseg_tau, tau)),
        ignore=None if variant != "qwen" else float(pick(options.dyseg_ignore, ignore)),
        d=float(pick(options.stprune_d, d)),
        p=pick(options.dtm_p, p),
        beta=float(pick(options.dtm_beta, beta)),
        k=options.density_k,
    )


# ---------------------------------------------------------------------------------------------
# DySeg
# ---------------------------------------------------------------------------------------------


def gap_tensors(
    frame_global: torch.Tensor, c: int, tau: float, ignore: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, G) -> (cut, near): (F - 1,) bool tensors on the globals' device, no sync (see :func:`gap_flags`)."""
    unit = F.normalize(frame_global.float(), dim=-1, eps=_EPS)
    sim = (unit[:-1] * unit[1:]).sum(dim=-1)  # (F-1,)
    gaps = sim.shape[0]
    lowest = torch.zeros(gaps, dtype=torch.bool, device=sim.device)
    # c - 1 clamped to F - 1 (upstream's topk crashes); index_fill_, as lowest[...] = True would sync on CUDA
    lowest.index_fill_(0, stable_top(-sim, min(c - 1, gaps)), True)
    cut = lowest | (sim < tau)
    near = sim < ignore if ignore is not None else torch.zeros_like(cut)
    return cut, near


def gap_flags(
    frame_global: torch.Tensor, c: int, tau: float, ignore: float | None = None
) -> tuple[list[bool], list[bool]]:
    """(F, G) -> (cut, near) per frame gap t < F - 1, on the host (one sync).

    cut[t]: the segment ends after frame t (c_t among the min(c - 1, F - 1) smallest, ties to the lower
    gap, or c_t < tau). near[t]: c_t < ignore (qwen's sub-segment cuts; all False without ``ignore``).
    """
    flags = torch.stack(gap_tensors(frame_global, c, tau, ignore)).tolist()
    return flags[0], flags[1]


def segments_from_cuts(cut: list[bool]) -> list[tuple[int, int]]:
    """Cut flags of the F - 1 gaps -> [(first frame, length)] of the segments, in order."""
    segments, start = [], 0
    for t, is_cut in enumerate(cut):
        if is_cut:
            segments.append((start, t + 1 - start))
            start = t + 1
    segments.append((start, len(cut) + 1 - start))
    return segments


def segment_lengths(frame_global: torch.Tensor, c: int, tau: float) -> list[int]:
    """(F, G) frame globals -> DySeg's segment lengths (sum F)."""
    cut, _ = gap_flags(frame_global, c, tau)
    return [length for _, length in segments_from_cuts(cut)]


# ---------------------------------------------------------------------------------------------
# Budgets (host integers; loops over segments and their frames: data-dependent and short)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budgets:
    """Per frame: salient count, anchor count and the frames [lo, hi) whose tokens merge into its anchors."""

    salient: list[int]
    anchors: list[int]
    scope: list[tuple[int, int]]


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, the remainder to the first ones."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def frame_budgets(knobs: Knobs, segments: list[tuple[int, int]], near: list[bool], per_frame: int, r_f: int) -> Budgets:
    """The variant's salient / anchor counts of every frame and each anchor frame's merge scope."""
    n = sum(length for _, length in segments)
    salient, anchors, scope = [0] * n, [0] * n, [(0, 0)] * n
    p, d = knobs.p, knobs.d
    n_sal = r_f - int(r_f * d)
    for start, length in segments:  # one iteration per segment
        frames = range(start, start + length)
        for f in frames:
            scope[f] = (start, start + length)
        if knobs.variant == "onevision":
            count = min((r_f - n_sal) * length // math.ceil(length / p), per_frame - n_sal)
            for j, f in enumerate(frames):  # a 1-frame segment's scope is its frame: it merges within it
                salient[f] = n_sal
                anchors[f] = count if (length - 1 - j) % p == 0 else 0
            continue
        seg_retain = r_f * length
        if knobs.authors and seg_retain == 1:
            seg_ctx = 0
        elif knobs.variant == "qwen":
            seg_ctx = max(int(seg_retain * d), 1)
        else:
            seg_ctx = int(seg_retain * d)
        seg_sal = seg_retain - seg_ctx
        if knobs.variant == "video":
            shares, per_anchor = _spread(seg_sal, length), _spread(seg_ctx, math.ceil(length / p))
            for j, f in enumerate(frames):
                back = length - 1 - j
                salient[f] = shares[j]
                ctx = per_anchor[back // p] if back % p == 0 else 0
                anchors[f] = min(ctx, per_frame - shares[j])  # upstream's topk crashes beyond
            continue
        if length == 1:  # qwen, 1-frame segment: both budgets as they are (they sum to r_f <= P)
            salient[start], anchors[start] = seg_sal, seg_ctx
            continue
        ends = [t - start for t in range(start, start + length - 1) if near[t]] + [length - 1]
        subs = len(ends)
        shares, per_anchor = _spread(seg_sal, subs), _spread(seg_ctx, math.ceil(subs / p))
        for i, end in enumerate(ends):  # only each sub-segment's last frame gets tokens
            back = subs - 1 - i
            ctx = min(per_anchor[back // p], per_frame // 2) if back % p == 0 else 0
            anchors[start + end] = ctx
            salient[start + end] = min(shares[i], per_frame - ctx)
    return Budgets(salient, anchors, scope)


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------


def merge_into_anchors(
    tokens: torch.Tensor, candidate: torch.Tensor, anchors: torch.Tensor, beta: float, dtype: torch.dtype
) -> torch.Tensor:
    """New anchor values: (M, D) tokens, (M,) bool candidates, (A,) anchor rows -> (A, D) in ``dtype``.

    Each candidate joins the anchor of largest cosine (ties: the first anchor in ``anchors``); an anchor
    becomes w * anchor + (1 - w) * mean(cluster), w = max(1 / (|cluster| + 1), beta); an empty cluster
    leaves it unchanged. A one-hot matmul rather than index_add: deterministic on CUDA.
    """
    values = tokens.to(dtype)
    unit = F.normalize(values, dim=-1, eps=_EPS)
    choice = (unit @ unit[anchors].T).argmax(dim=1)  # (M,)
    columns = torch.arange(anchors.shape[0], device=choice.device)
    member = ((choice[:, None] == columns) & candidate[:, None]).to(dtype)  # one-hot without F.one_hot's syncs
    size = member.sum(dim=0)  # (A,)
    mean = (member.T @ values) / size.clamp(min=1)[:, None]
    weight = (1.0 / (size + 1)).clamp(min=beta)[:, None]
    return weight * values[anchors] + (1 - weight) * mean


# ---------------------------------------------------------------------------------------------
# Batched over anchor frames: DPC-kNN ranks and the merge as padded, masked tensor ops
# ---------------------------------------------------------------------------------------------


def batched_dpc_ranks(
    dist: torch.Tensor,
    k: int,
    *,
    counts: list[int] | None = None,
    valid: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    passes: bool = False,
) -> torch.Tensor:
    """(B, M, M) float32 distances -> (B, M) token positions by decreasing DPC score, all rows at once.

    Row b is :func:`llava.model.dpc_knn.dpc_scores` + ``stable_top`` on its first ``counts[b]`` tokens
    (``valid`` (B, M) bool marks them; None = all M): k clamped to the row's count, equal densities ranked
    by position, ``noise`` (B, M) of U(0, 1) draws added to the density times 1e-6 (upstream's tie-break).
    Padding ranks after every real token. ``counts`` None with ``valid`` given: the counts are not known on
    the host (the static formulation), so every k below ``k`` is provided for. ``passes``: the k nearest
    distances by k masked minimum passes instead of torch.topk (the same values; torch.compile fuses the
    passes into small reductions, while topk stays a library kernel).
    """
    rows, m, _ = dist.shape
    k_all = max(1, min(int(k), m))
    padded = dist if valid is None else dist.masked_fill(~valid[:, None, :], math.inf)
    nearest = k_smallest(padded, k_all) if passes else torch.topk(padded, k=k_all, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    if counts is None:
        short = list(range(1, k_all)) if valid is not None else []
    else:
        short = sorted({max(1, min(int(k), n)) for n in counts} - {k_all})
    if short:  # rows of fewer than k tokens: their own k (rare; at most k - 1 extra steps)
        k_row = valid.sum(dim=-1).clamp(max=int(k))[:, None]
        for few in short:
            density = torch.where(k_row == few, torch.exp(-(nearest[..., :few] ** 2).mean(dim=-1)), density)
    if noise is not None:
        density = density + noise.to(density.device) * 1e-6
    if valid is not None:
        density = density.masked_fill(~valid, -math.inf)
    order = stable_top(density, m)  # rank 0 = densest; ties by position: "denser" is a strict total order
    positions = torch.arange(m, device=dist.device)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
    denser = rank[:, None, :] < rank[:, :, None]  # denser[b, i, j]: j is denser than i
    if valid is None:
        far = dist.amax(dim=(1, 2))
    else:
        far = dist.masked_fill(~(valid[:, :, None] & valid[:, None, :]), -math.inf).amax(dim=(1, 2))
    delta = torch.where(denser, dist, far[:, None, None]).min(dim=-1).values
    score = density * delta
    if valid is not None:
        score = score.masked_fill(~valid, -math.inf)
    return stable_top(score, m)


_CDIST_EXACT_MAX = 25  # torch.cdist's default mode takes exact differences up to 25 rows, a matmul above


def padded_distances(x: torch.Tensor, counts: list[int], counts_on_device: torch.Tensor) -> torch.Tensor:
    """(B, M, D) rows of which the first ``counts[b]`` are real -> (B, M, M) float32 distances / sqrt(D).

    Each row's distances are computed as :func:`llava.model.dpc_knn.pairwise_distances` computes them for
    that frame alone: cdist picks its method by size, so padding a frame of <= 25 tokens past 25 would
    switch it to the matmul form (other rounding; duplicated tokens get distance ~1e-4 rather than 0).
    ``counts_on_device``: the same counts as a (B,) tensor (read only when they straddle 25).
    """
    if max(counts) <= _CDIST_EXACT_MAX or min(counts) > _CDIST_EXACT_MAX:
        return pairwise_distances(x)  # one method for every row, the one each frame alone would get
    x = x.float()
    scale = x.shape[-1] ** 0.5
    exact = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / scale
    matmul = torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist") / scale
    matmul = matmul.masked_fill(torch.eye(x.shape[1], dtype=torch.bool, device=x.device), 0.0)  # as pairwise_distances
    return torch.where((counts_on_device <= _CDIST_EXACT_MAX)[:, None, None], exact, matmul)


@dataclass(frozen=True)
class AnchorLayout:
    """Host-side shape of the batched merge, from the budgets (small lists; read from one packed tensor).

    frames: the A anchor frames, ascending; counts: their anchor counts; width: max count (slots per
    anchor frame); slots: Q, the most anchor frames in one segment; segment_of: (F,) every frame's
    segment; frame_slots: (F, Q) the q-th anchor frame (index into ``frames``) of each frame's segment
    (0 = padding); slot_counts: (F, Q) that anchor frame's count (0 = padding); own: (F, Q) 1 where it is
    the frame itself; seg_slot: (A,) segment * Q + q of every anchor frame.
    """

    frames: list[int]
    counts: list[int]
    width: int
    slots: int
    n_segments: int
    segment_of: list[int]
    frame_slots: list[int]
    slot_counts: list[int]
    own: list[int]
    seg_slot: list[int]


def anchor_layout(anchors: list[int], segments: list[tuple[int, int]]) -> AnchorLayout:
    """Per-frame anchor counts + segments -> the padded layout (loops over segments and their frames)."""
    frames = [f for f, count in enumerate(anchors) if count > 0]
    index = {f: i for i, f in enumerate(frames)}
    members = [[f for f in range(start, start + length) if anchors[f] > 0] for start, length in segments]
    slots = max(1, max(len(group) for group in members))
    segment_of, frame_slots, slot_counts, own, seg_slot = [], [], [], [], []
    for s, (start, length) in enumerate(segments):
        group = members[s] + [None] * (slots - len(members[s]))
        seg_slot += [s * slots + q for q in range(len(members[s]))]
        for g in range(start, start + length):
            segment_of.append(s)
            frame_slots += [0 if a is None else index[a] for a in group]
            slot_counts += [0 if a is None else anchors[a] for a in group]
            own += [int(a == g) for a in group]
    counts = [anchors[f] for f in frames]
    return AnchorLayout(frames, counts, max(counts, default=0), slots, len(segments), segment_of, frame_slots,
                        slot_counts, own, seg_slot)


def _packed(lists: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Host integer lists -> int64 tensors on ``device`` through one copy (non-blocking: no stream sync)."""
    flat = torch.tensor([v for values in lists for v in values], dtype=torch.int64)
    if device.type == "cuda":  # a copy from pageable memory would wait for the stream: pin it first
        flat = flat.pin_memory()
    return list(flat.to(device, non_blocking=True).split([len(values) for values in lists]))


def merge_batched(
    unit: torch.Tensor,
    values: torch.Tensor,
    values32: torch.Tensor,
    anchor_rows: torch.Tensor,
    candidate: torch.Tensor | None,
    layout: AnchorLayout,
    tables: dict[str, torch.Tensor],
    beta: float,
) -> torch.Tensor:
    """:func:`merge_into_anchors` for every anchor frame at once -> (A, width, D) new anchor values.

    unit / values / values32: (F, M, D) the frames' token rows (unit-normalised / in the merge dtype / in
    float32: the cluster sums accumulate in float32 and round to the merge dtype once); anchor_rows:
    (A, width) each anchor's row in the flattened (F * M) table, in tie-break order (slots past an anchor
    frame's count are padding); candidate: (F, M, Q) bool, may token m of frame g join the q-th anchor frame
    of its segment (None = all). Every frame scores its rows against the anchors of its own segment
    (a bmm over frames, padded to Q * width), argmax within each anchor frame's slots; the one-hot sums per
    frame are added up per segment by an indicator matmul (deterministic, unlike index_add on CUDA).
    """
    n_frames, rows, dim = unit.shape
    slots, width, dtype = layout.slots, layout.width, values.dtype
    columns = slots * width
    steps = tables["steps"]
    per_frame = anchor_rows[tables["frame_slots"]].reshape(n_frames, columns)  # (F, Q * width)
    real = steps[:width] < tables["slot_counts"][..., None]  # (F, Q, width)
    sims = torch.bmm(unit, unit.reshape(-1, dim)[per_frame].mT)  # (F, M, Q * width) cosines
    sims = sims.masked_fill_(~real.reshape(n_frames, 1, columns), -math.inf)
    choice = sims.view(n_frames, rows, slots, width).argmax(dim=-1)  # ties: the first slot
    member = choice[..., None] == steps[:width]  # (F, M, Q, width) one-hot
    if candidate is not None:
        member &= candidate[..., None]
    member = member.view(n_frames, rows, columns)
    sums = torch.bmm(member.mT.to(torch.float32), values32)  # (F, Q * width, D)
    sizes = member.sum(dim=1, dtype=torch.float32)  # (F, Q * width), exact counts
    if layout.n_segments < n_frames:  # add the frames of each segment
        indicator = (tables["segment_of"][None, :] == steps[: layout.n_segments, None]).to(torch.float32)  # (S, F)
        sums = indicator @ sums.reshape(n_frames, columns * dim)
        sizes = indicator @ sizes
    sums = sums.reshape(-1, width, dim)[tables["seg_slot"]].to(dtype)  # (A, width, D)
    size = sizes.reshape(-1, width)[tables["seg_slot"]].to(dtype)  # (A, width)
    mean = sums / size.clamp(min=1)[..., None]
    weight = (size + 1).reciprocal().clamp(min=beta)[..., None]  # = 1 / (size + 1), bit for bit
    return weight * values.reshape(-1, dim)[anchor_rows] + (1 - weight) * mean


# ---------------------------------------------------------------------------------------------
# The static formulation: every shape fixed by (F, P, D, R, knobs), no host read before the end
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetTable:
    """Every frame's budgets by the shape of its segment, from :func:`frame_budgets` (host, cached).

    salient / anchors: onevision / video (F + 1, F): [L, j] for the j-th frame of an L-frame segment;
    qwen (F + 1, F + 1, F): [L, V, i] for the i-th of the V sub-segment ends of an L-frame segment (other
    frames get nothing). Only lengths DySeg can produce (L <= F - min(c - 1, F - 1)) are filled.
    width: the most anchors of one frame. salient_cap / anchor_cap: the most salient / anchor tokens of a
    whole video over every layout DySeg can produce (the padded output sizes).
    """

    salient: torch.Tensor
    anchors: torch.Tensor
    width: int
    salient_cap: int
    anchor_cap: int
    on_device: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two tables on ``device``, copied there once."""
        if device not in self.on_device:
            self.on_device[device] = (self.salient.to(device), self.anchors.to(device))
        return self.on_device[device]


def _video_cap(per_segment: list[int], n_frames: int, fewest: int) -> int:
    """Max over partitions of F frames into >= ``fewest`` segments of sum per_segment[L] (L = each length;
    0 = impossible length): a DP over (frames covered, segments used), on the host."""
    lengths = [length for length in range(1, len(per_segment)) if length <= n_frames]
    best = [[-1] * (n_frames + 1) for _ in range(n_frames + 1)]  # best[n][s]: n frames in s segments
    best[0][0] = 0
    for n in range(1, n_frames + 1):
        for s in range(1, n + 1):
            options = [best[n - length][s - 1] + per_segment[length] for length in lengths
                       if length <= n and best[n - length][s - 1] >= 0]
            best[n][s] = max(options, default=-1)
    return max(best[n_frames][s] for s in range(fewest, n_frames + 1) if best[n_frames][s] >= 0)


@functools.lru_cache(maxsize=256)
def budget_table(knobs: Knobs, n_frames: int, per_frame: int, r_f: int) -> BudgetTable:
    """The budgets of every segment shape, each computed by :func:`frame_budgets` on that one segment.

    A segment's budgets depend only on its length (and, for qwen, on its number of sub-segments: which
    frames end them does not change the counts), so the table is exact for every layout."""
    longest = n_frames - min(knobs.c - 1, n_frames - 1)
    qwen = knobs.variant == "qwen"
    shape = (n_frames + 1, n_frames + 1, n_frames) if qwen else (n_frames + 1, n_frames)
    salient, anchors = torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64)
    for length in range(1, longest + 1):
        if not qwen:
            budgets = frame_budgets(knobs, [(0, length)], [False] * (length - 1), per_frame, r_f)
            salient[length, :length] = torch.tensor(budgets.salient)
            anchors[length, :length] = torch.tensor(budgets.anchors)
            continue
        for subs in range(1, length + 1):  # sub-segments end after the first subs - 1 frames and at the last
            near = [t < subs - 1 for t in range(length - 1)]
            budgets = frame_budgets(knobs, [(0, length)], near, per_frame, r_f)
            ends = list(range(subs - 1)) + [length - 1]
            salient[length, subs, :subs] = torch.tensor([budgets.salient[f] for f in ends])
            anchors[length, subs, :subs] = torch.tensor([budgets.anchors[f] for f in ends])
    fewest = min(knobs.c, n_frames)

    def cap(table: torch.Tensor) -> int:
        per_segment = table.sum(dim=-1)  # (F + 1,) or, for qwen, (F + 1, F + 1): the most over sub-segments
        return _video_cap((per_segment.amax(dim=1) if qwen else per_segment).tolist(), n_frames, fewest)

    return BudgetTable(salient, anchors, int(anchors.max()), cap(salient), cap(anchors))


def _cosines(rows: torch.Tensor, anchors: torch.Tensor, float32: bool) -> torch.Tensor:
    """(N, D) rows, (A, D) anchors -> (N, A) cosines: float32 from the inputs' dtype, or in that dtype."""
    if not float32:  # merge_dtype="model": unit vectors and their product in the features' dtype, as upstream
        return F.normalize(rows, dim=-1, eps=_EPS) @ F.normalize(anchors, dim=-1, eps=_EPS).T
    row_norm = rows.float().norm(dim=-1).clamp_min(_EPS)
    anchor_norm = anchors.float().norm(dim=-1).clamp_min(_EPS)
    return float32_matmul(rows, anchors.T) / row_norm[:, None] / anchor_norm[None, :]


def _slots(counts: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F,) per-frame counts laid end to end in ``cap`` slots -> each slot's frame, rank within the frame
    and real flag, (cap,) each (padding slots: the last frame, rank clamped at 0, not real)."""
    end = counts.cumsum(0)
    slot = torch.arange(cap, device=counts.device)
    frame = (end[None, :] <= slot[:, None]).sum(dim=1).clamp(max=counts.shape[0] - 1)
    return frame, (slot - (end - counts)[frame]).clamp(min=0), slot < end[-1]


def _first_max_in_groups(sims: torch.Tensor, counts: torch.Tensor, group: torch.Tensor, width: int) -> torch.Tensor:
    """(N, A) scores over slots laid out frame by frame ((F,) ``counts``, at most ``width`` each; (A,) each
    slot's frame) -> (N, A) bool: per row, the first slot of largest score within each frame's slots.

    The slots are read as an (N, F, width) view (gathered, padding -inf) and reduced by argmax: ties go to
    the first slot, and no scatter is needed."""
    n_slots = sims.shape[1]
    steps = torch.arange(width, device=sims.device)
    start = counts.cumsum(0) - counts
    columns = start[:, None] + steps  # (F, width)
    dense = sims[:, columns.clamp(max=n_slots - 1)].masked_fill(~(steps < counts[:, None]), -math.inf)
    chosen = start + dense.argmax(dim=-1)  # (N, F) the slot each row picks in each frame
    return chosen[:, group] == torch.arange(n_slots, device=sims.device)


@dataclass(frozen=True)
class StaticConfig:
    """What the static formulation is specialised on (Python constants of the compiled function)."""

    knobs: Knobs
    r_f: int
    width: int
    salient_cap: int
    anchor_cap: int
    float32: bool


def static_selection(
    features: torch.Tensor,
    salience: torch.Tensor | None,
    frame_global: torch.Tensor,
    salient_table: torch.Tensor,
    anchor_table: torch.Tensor,
    cfg: StaticConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FastVID on one video with every shape fixed by (F, P, D) and ``cfg``: what torch.compile traces.

    Returns keys (salient_cap + anchor_cap,) ascending, padded with F * P; their values (same length, D);
    the kept count K (0-d) and the finite flag (0-d): the selection is keys[:K], values[:K].

    The segments come from DySeg's flags on the device (segment id = cumulative cuts), each frame's
    budgets from the table by its segment's shape. Every frame is ranked; the kept tokens fill compact
    slots (frame by frame, the video's largest possible count), so the merge scores every row against
    anchor_cap anchors in one product, takes the first maximum within each anchor frame's slots and
    masks the anchor frames outside a row's segment.
    """
    knobs, dtype = cfg.knobs, torch.float32 if cfg.float32 else features.dtype
    n_frames, per_frame, dim = features.shape
    total, device = n_frames * per_frame, features.device
    if knobs.authors:
        salience = features.float().norm(dim=-1)
    finite = torch.isfinite(features).all() & torch.isfinite(salience).all() & torch.isfinite(frame_global).all()
    cut, near = gap_tensors(frame_global, knobs.c, knobs.tau, knobs.ignore)
    frames = torch.arange(n_frames, device=device)
    segment = torch.cat([frames[:1] * 0, cut.long().cumsum(0)])  # (F,) segment id
    same = segment[:, None] == segment[None, :]  # (F, F) frames of one segment
    length = same.sum(dim=1)
    position = frames - torch.where(same, frames, n_frames).amin(dim=1)  # index within the segment
    if knobs.variant == "qwen":  # only sub-segment ends get tokens: near-duplicate gaps inside the segment
        inner = torch.cat([near, torch.zeros(1, dtype=torch.bool, device=device)]) & (position < length - 1)
        is_end = inner | (position == length - 1)
        earlier = frames[None, :] < frames[:, None]  # earlier[f, g]: g comes before f
        subs = (same & is_end[None, :]).sum(dim=1)
        before = (same & is_end[None, :] & earlier).sum(dim=1)
        n_sal = torch.where(is_end, salient_table[length, subs, before], 0)
        n_anchor = torch.where(is_end, anchor_table[length, subs, before], 0)
    else:
        n_sal, n_anchor = salient_table[length, position], anchor_table[length, position]

    flat = features.reshape(total, dim)
    frame_start = frames * per_frame
    order = torch.sort(salience.float(), dim=1, descending=True, stable=True).indices  # ties: lower index
    s_frame, s_rank, s_real = _slots(n_sal, cfg.salient_cap)
    salient_source = order[s_frame, s_rank.clamp(max=per_frame - 1)] + frame_start[s_frame]
    keys = [torch.where(s_real, salient_source, total)]
    values = [flat[salient_source].to(dtype)]
    if cfg.anchor_cap > 0:
        a_frame, a_rank, a_real = _slots(n_anchor, cfg.anchor_cap)
        if knobs.variant == "onevision":  # rows: every frame's M non-salient tokens; anchors are candidates
            n_rest = per_frame - cfg.r_f + int(cfg.r_f * knobs.d)
            rest = order[:, per_frame - n_rest :].sort(dim=1).values  # (F, M) ascending
            rest_source = (rest + frame_start[:, None]).reshape(-1)
            rows = flat.index_select(0, rest_source).view(n_frames, n_rest, dim)
            ranks = batched_dpc_ranks(gram_distances(rows), knobs.k, passes=True)  # (F, M) by decreasing score
            anchor_rows = ranks[a_frame, a_rank.clamp(max=n_rest - 1)] + a_frame * n_rest  # into F * M
            source = rest_source[anchor_rows]
            rows = rows.reshape(-1, dim)
            candidate = None
        else:  # rows: every token; a frame's anchors rank among its non-salient tokens, in index order
            positions = torch.arange(per_frame, device=device)
            rank = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
            salient = rank < n_sal[:, None]  # (F, P)
            # non-salient first, each part ascending (unique keys: no reliance on a stable sort)
            rest = torch.sort(salient.long() * per_frame + positions, dim=1).values % per_frame
            inside = positions < (per_frame - n_sal)[:, None]  # (F, P) the real rows of each pool
            pool = flat[(rest + frame_start[:, None]).reshape(-1)].view(n_frames, per_frame, dim)
            ranks = batched_dpc_ranks(gram_distances(pool), knobs.k, valid=inside, passes=True)
            width = cfg.width
            real = positions[:width] < n_anchor[:, None]  # (F, width)
            token = torch.where(real, rest.gather(1, ranks[:, :width]), per_frame).sort(dim=1).values
            mine = torch.zeros(n_frames, per_frame + 1, dtype=torch.bool, device=device)
            mine = mine.scatter_(1, token, True)[:, :per_frame]  # (F, P) each frame's own anchors
            source = frame_start[a_frame] + token[a_frame, a_rank.clamp(max=width - 1)].clamp(max=per_frame - 1)
            anchor_rows = source
            rows = flat
            # candidate[(g, m), a]: token m of frame g may join anchor frame a's clusters
            own = mine.reshape(-1)[:, None] & (frames.repeat_interleave(per_frame)[:, None] == frames)
            candidate = ~salient.reshape(-1)[:, None] & ~own
        row_frame = frames.repeat_interleave(rows.shape[0] // n_frames)
        joins = same[row_frame] & (n_anchor > 0)  # (N, F): the anchor frames of each row's segment
        joins = joins if candidate is None else joins & candidate
        anchors = rows[anchor_rows]  # (A, D) in the features' dtype
        sims = _cosines(rows, anchors, cfg.float32).masked_fill(~a_real, -math.inf)
        member = _first_max_in_groups(sims, n_anchor, a_frame, cfg.width) & joins[:, a_frame] & a_real
        sums = float32_matmul(member.T.to(rows.dtype), rows).to(dtype)  # (A, D), float32 accumulation
        size = member.sum(dim=0, dtype=torch.float32).to(dtype)
        mean = sums / size.clamp(min=1)[:, None]
        weight = (size + 1).reciprocal().clamp(min=knobs.beta)[:, None]
        keys.append(torch.where(a_real, source, total))
        values.append(weight * anchors.to(dtype) + (1 - weight) * mean)
    return (*_in_source_order(keys, values, total), n_sal.sum() + n_anchor.sum(), finite)


def _in_source_order(
    keys: list[torch.Tensor], values: list[torch.Tensor], total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts of (unique) keys, padded with ``total``, and their value rows -> all of them by ascending key,
    padding last. Each key's place is the count of kept keys below it (a cumulative sum over the video's
    tokens), so the rows are written once to their place instead of concatenated, sorted and gathered."""
    flat = torch.cat(keys)
    real = flat < total
    kept = torch.zeros(total + 1, dtype=torch.int64, device=flat.device).index_fill_(0, flat, 1)[:total]
    below = kept.cumsum(0) - kept
    padding_rank = (~real).long().cumsum(0) - 1
    place = torch.where(real, below[flat.clamp(max=total - 1)], real.sum() + padding_rank)
    ordered = torch.empty_like(flat).index_copy_(0, place, flat)
    rows = values[0].new_empty(flat.shape[0], values[0].shape[1])
    offset = 0
    for part in values:  # two parts: salient tokens, merged anchors
        rows.index_copy_(0, place[offset : offset + part.shape[0]], part)
        offset += part.shape[0]
    return ordered, rows


def _static_padded(
    features: torch.Tensor,
    salience: torch.Tensor | None,
    frame_global: torch.Tensor,
    knobs: Knobs,
    r_f: int,
    options: FastVIDOptions,
    execution: str,
) -> VideoSelection:
    """The static formulation (compiled on CUDA with execution='compiled') as a padded selection with its
    count and finite flag on the device: no host read (the adapter's count read covers them)."""
    n_frames, per_frame, _ = features.shape
    table = budget_table(knobs, n_frames, per_frame, r_f)
    cfg = StaticConfig(knobs, r_f, table.width, table.salient_cap, table.anchor_cap, options.merge_dtype == "float32")
    select = functools.partial(static_selection, cfg=cfg)
    if execution == "compiled" and features.is_cuda:
        select = compiled(select, OWNER, key=("fastvid", cfg), alternatives="execution=eager")
    keys, values, count, finite = select(features, salience, frame_global, *table.to(features.device))
    return VideoSelection(keys, values, valid=finite, count=count)


def _exact(selection: VideoSelection) -> VideoSelection:
    """A padded selection cut to its count (one host read); its invalidity means non-finite inputs."""
    selection, ok = read_padded(selection)
    if not ok:
        raise ValueError(f"{OWNER}: features or signals contain NaN or Inf; refusing to select tokens from them")
    return selection


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def _check_signal(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    ok = isinstance(value, torch.Tensor) and value.dim() == len(shape)
    ok = ok and all(s is None or v == s for v, s in zip(value.shape, shape, strict=True))
    if not ok or value.shape[-1] == 0:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        want = "(" + ", ".join("G" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{OWNER}: signal {name} must have shape {want}, got {got}")


def fastvid_select(
    features: torch.Tensor,
    salience: torch.Tensor | None,
    frame_global: torch.Tensor,
    retention: float,
    options: FastVIDOptions | None = None,
    *,
    family: str = "",
    padded: bool = False,
) -> VideoSelection:
    """FastVID on one video: (F, P, D) features, (F, P) salience, (F, G) frame globals -> K merged tokens.

    ``salience`` may be None with port="authors" (the L2 norms of the features are used). Returns
    sources (K,) ascending and features (K, D) (float32, or the features' dtype with merge_dtype="model").
    ``padded``: the static executions return their padded outputs with ``count`` and ``valid`` instead
    of reading them (the registry's path; the eager execution ignores it).

    Eager: one host sync, the DySeg flags with the finite check. Before it, everything the segments do
    not decide is queued (salience order; onevision: every frame's non-salient rows and their DPC-kNN
    ranks, as each frame has the same salient count). After it, a fixed number of batched ops.
    Static / compiled: no sync before the end (see :func:`static_selection`).
    """
    check_video_features(features, retention)
    options = options or FastVIDOptions()
    knobs = resolve_knobs(options, family)
    n_frames, per_frame, dim = features.shape
    if knobs.authors:
        salience = features.float().norm(dim=-1)
    _check_signal(FRAME_SALIENCE, salience, (n_frames, per_frame))
    _check_signal(FRAME_GLOBAL, frame_global, (n_frames, None))
    r_f = int(per_frame * retention)
    if r_f < 1:
        raise ValueError(
            f"{OWNER} needs R >= 1/P = {1 / per_frame:.4g} (P = {per_frame} tokens per frame), so that every "
            f"frame keeps int(P * R) >= 1 tokens; got R = {retention}"
        )
    execution = options.execution or ("compiled" if features.is_cuda and options.seed is None else "eager")
    if execution != "eager":
        selection = _static_padded(features, salience, frame_global, knobs, r_f, options, execution)
        return selection if padded else _exact(selection)
    device, total = features.device, n_frames * per_frame
    dtype = torch.float32 if options.merge_dtype == "float32" else features.dtype
    generator = None if options.seed is None else torch.Generator().manual_seed(options.seed)
    onevision = knobs.variant == "onevision"
    flat = features.reshape(total, dim)
    frame_start = torch.arange(0, total, per_frame, device=device)  # (F,) first flat index of each frame

    # --- queued before the sync -------------------------------------------------------------------
    finite = torch.isfinite(features).all() & torch.isfinite(salience).all() & torch.isfinite(frame_global).all()
    cut, near = gap_tensors(frame_global, knobs.c, knobs.tau, knobs.ignore)
    order = torch.sort(salience.float(), dim=1, descending=True, stable=True).indices  # ties: lower index
    if onevision:  # every frame: n_sal salient tokens, its other M tokens are the rows of the merge
        n_sal = r_f - int(r_f * knobs.d)
        m = per_frame - n_sal
        rest = order[:, n_sal:].sort(dim=1).values  # (F, M) the non-salient tokens, ascending
        rest_source = (rest + frame_start[:, None]).reshape(-1)  # (F * M,) their flat indices
        row_start = torch.arange(n_frames, device=device)[:, None] * m  # (F, 1) first row of each frame
        kept = (order[:, :n_sal] + frame_start[:, None]).reshape(-1)
        kept_values = flat[kept].to(dtype)
        rows = flat.index_select(0, rest_source).view(n_frames, m, dim)  # (F, M, D), one index per row
        values = rows.to(dtype)
        rows = values if dtype == torch.float32 else rows.float()  # float32: distances and cluster sums
        dist = ranks = None
        if m > 0 and r_f > n_sal:  # some frame gets anchors
            dist = pairwise_distances(rows)
            if generator is None:  # (F, M) every frame's rows (into F * M), in decreasing score
                ranks = batched_dpc_ranks(dist, knobs.k) + row_start
    else:
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_frame, device=device).expand_as(order))
        order_source = order + frame_start[:, None]  # (F, P) flat indices by decreasing salience
        values = features.to(dtype)  # (F, P, D): every token is a row; the salient ones are masked out
        rows = values.float()  # float32: distances and cluster sums (the same tensor by default)
    unit = F.normalize(values, dim=-1, eps=_EPS)

    # --- the sync: DySeg's flags and the finite check, one small read ----------------------------
    gaps = n_frames - 1
    flags = torch.cat([cut, near, finite.reshape(1)]).tolist()
    if not flags[-1]:
        raise ValueError(f"{OWNER}: features or signals contain NaN or Inf; refusing to select tokens from them")
    segments = segments_from_cuts(flags[:gaps])
    budgets = frame_budgets(knobs, segments, flags[gaps : 2 * gaps], per_frame, r_f)
    layout = anchor_layout(budgets.anchors, segments)
    n_anchor_frames, width = len(layout.frames), layout.width
    count = sum(budgets.salient) + sum(layout.counts)
    if onevision:
        sal_max = n_sal
    else:
        sal_max = max(budgets.salient)
        n_rest = [per_frame - budgets.salient[f] for f in layout.frames]
    rest_max = 0 if onevision or not n_anchor_frames else max(n_rest)

    lists = {"frames": layout.frames, "counts": layout.counts, "segment_of": layout.segment_of,
             "frame_slots": layout.frame_slots, "slot_counts": layout.slot_counts, "own": layout.own,
             "seg_slot": layout.seg_slot}
    if not onevision:
        lists["salient"] = budgets.salient
        lists["n_rest"] = n_rest
    tables = dict(zip(lists, _packed(list(lists.values()), device), strict=True))
    tables["frame_slots"] = tables["frame_slots"].view(n_frames, layout.slots)
    tables["slot_counts"] = tables["slot_counts"].view(n_frames, layout.slots)
    tables["steps"] = torch.arange(max(width, sal_max, rest_max, layout.n_segments, 1), device=device)
    steps = tables["steps"]

    if not onevision:  # the salient tokens of each frame, padded to the largest count
        salient = rank < tables["salient"][:, None]  # (F, P)
        taken = steps[:sal_max] < tables["salient"][:, None]  # (F, sal_max)
        kept = torch.where(taken, order_source[:, :sal_max], total).reshape(-1)
        kept_values = flat[order_source[:, :sal_max].reshape(-1)].to(dtype)  # padding rows: dropped at the end

    if n_anchor_frames == 0:
        keys, merged = kept, kept_values
    else:
        frames = tables["frames"]
        real = steps[:width] < tables["counts"][:, None]  # (A, width)
        draws = None
        if generator is not None:  # upstream's noise, drawn anchor frame by anchor frame as the loop did
            sizes = [m] * n_anchor_frames if onevision else n_rest
            draws = torch.zeros(n_anchor_frames, m if onevision else rest_max)
            for i, size in enumerate(sizes):  # seeded path only: one CPU draw per anchor frame
                draws[i, :size] = torch.rand(size, generator=generator)
        if onevision:
            if ranks is None:
                ranks = batched_dpc_ranks(dist[frames], knobs.k, noise=draws) + row_start[frames]
            else:
                ranks = ranks[frames]
            anchor_rows = ranks[:, :width]  # (A, width) in decreasing score: cosine ties go to the higher score
            source = rest_source[anchor_rows]
            candidate = None  # the rows are the non-salient tokens: all candidates, anchors included
        else:
            # each anchor frame's non-salient tokens ascending (a stable sort puts them before the salient)
            rest = torch.sort(salient[frames].to(torch.uint8), dim=1, stable=True).indices[:, :rest_max]
            pool = rows[frames[:, None], rest]
            dist = padded_distances(pool, n_rest, tables["n_rest"])
            inside = None if min(n_rest) == rest_max else steps[:rest_max] < tables["n_rest"][:, None]  # (A, rest_max)
            ranks = batched_dpc_ranks(dist, knobs.k, counts=n_rest, valid=inside, noise=draws)
            # these scripts order a frame's anchors by index (cosine ties go to the lowest); padding sorts last
            token = torch.where(real, rest.gather(1, ranks[:, :width]), per_frame).sort(dim=1).values
            mine = torch.zeros(n_anchor_frames, per_frame + 1, dtype=torch.bool, device=device)
            mine = mine.scatter_(1, token, True)[:, :per_frame]  # (A, P) the frame's own anchors
            anchor_rows = frame_start[frames][:, None] + token.clamp(max=per_frame - 1)
            source = anchor_rows
            own_anchor = torch.zeros_like(salient).index_copy_(0, frames, mine)  # (F, P)
            own = tables["own"].view(n_frames, layout.slots) != 0  # (F, Q)
            # candidates: the segment's tokens neither salient nor among the anchor frame's own anchors
            candidate = ~(salient[..., None] | (own_anchor[..., None] & own[:, None, :]))
        new = merge_batched(unit, values, rows, anchor_rows, candidate, layout, tables, knobs.beta)
        keys = torch.cat([kept, torch.where(real, source, total).reshape(-1)])
        merged = torch.cat([kept_values, new.reshape(-1, dim)])
    keys, permutation = torch.sort(keys)  # padding (key F * P) sorts last
    return VideoSelection(keys[:count], merged[permutation[:count]])


def _select(video: VideoTokens, retention: float, options: FastVIDOptions) -> VideoSelection:
    salience = None if options.port == "authors" else video.signal(FRAME_SALIENCE)
    glob = video.signal(FRAME_GLOBAL)
    return fastvid_select(video.features, salience, glob, retention, options, family=video.family, padded=True)


def _needs(options: FastVIDOptions) -> frozenset[str]:
    """The authors' port scores by feature norm: it reads only the frame globals."""
    return frozenset({FRAME_GLOBAL}) if options.port == "authors" else frozenset({FRAME_SALIENCE, FRAME_GLOBAL})


METHOD = Method(
    name="fastvid",
    options=FastVIDOptions,
    signals=frozenset({FRAME_SALIENCE, FRAME_GLOBAL}),
    select=_select,
    merges=True,
    needs=_needs,
    summary="DySeg segments, per segment salient tokens kept and DPC-kNN anchors merged with their context",
)
