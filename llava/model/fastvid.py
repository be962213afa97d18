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

Implementation (GPU): one host read per video, started early. The budgets are computed on the device
from DySeg's flags (:mod:`llava.model.fastvid`, vectorised over frames), and the few integers the
host needs (the finite check, the kept count, the merge's padded sizes, the per-frame budgets) are copied
back as soon as they exist (:class:`llava.model.method_api.HostCopy`); everything sized by the knobs alone
is queued behind that copy: the salience order, every frame's rows, their float32 distances and DPC-kNN
ranks (video / qwen: over each frame's non-salient tokens, masked, from one (F, P, P) distance table), the
anchors, the candidate masks and the output, sized F * r_f (an upper bound on the kept count) with the
salient tokens already in place. The host waits for the copy only, so the GPU is still busy with that
backlog while the host queues the merge, the one part sized by the segments: every frame's rows scored
against the anchors of its segment (one bmm, padded to the segment with most anchor frames), the argmax
within each anchor frame's slots, the one-hot clusters summed per frame and then per segment (matmuls,
deterministic) and written into the output (about 20 launches, however many segments). Rare inputs take
a longer path after the read, with the same result: ``seed`` (its noise is drawn on the CPU, one draw per
anchor frame in order, as the reference does) and, for video / qwen, an anchor frame with at most 25
non-salient tokens (torch.cdist's pair-by-pair distances there, as a frame alone gets them) or fewer
than ``density_k``. Against a loop over anchor frames the outputs are the same up to float32 summation
order (sources equal; features within about 1 ulp; an exact cosine tie, e.g. between orthogonal integer
vectors, may then go either way, as it may between CPU and CUDA).

The VidCom2 authors' Qwen port (``port="authors"``, labelled): salience = the L2 norm of each token's
features (FRAME_SALIENCE is not read: ``Method.needs`` lists FRAME_GLOBAL alone), the qwen variant,
the port's defaults (c 8, tau 0.84, ignore 0.99, d 0.5, p 4, beta 0.5) and seg_ctx = 0 when
seg_retain = 1. Differences from the port:
the port scores in the model dtype (bf16; here the norms and density are float32), and it breaks ties
with unseeded noise as upstream does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.model.dpc_knn import pairwise_distances, stable_top
from llava.model.method_api import (
    FRAME_GLOBAL,
    FRAME_SALIENCE,
    HostCopy,
    Method,
    VideoSelection,
    VideoTokens,
    check_choice,
    check_range,
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

    def __post_init__(self) -> None:
        check_choice(OWNER, "variant", self.variant, ("auto", *VARIANTS))
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
    lowest[stable_top(-sim, min(c - 1, gaps))] = True  # c - 1 clamped to F - 1: upstream's topk crashes
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
# Budgets: per frame, the salient count and the anchor count. frame_budgets is the rule as plain loops
# over segments (the reference the tests read); budget_tensors computes the same integers on the device
# from the (F - 1,) cut / near-duplicate flags, vectorised over frames (cumulative sums, comparisons, no
# host read), so that everything downstream can be queued before the one host read; anchor_slots lays
# out, per frame, the anchor frames of its segment (the merge's padded batch); anchor_width bounds one
# frame's anchors from the knobs alone (a static shape).
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


def frame_budgets(
    knobs: Knobs, segments: list[tuple[int, int]], near: list[bool], per_frame: int, r_f: int
) -> Budgets:
    """The variant's salient / anchor counts of every frame and each anchor frame's merge scope (host loops)."""
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
# The same rule on the device
# ---------------------------------------------------------------------------------------------


def _share(total: torch.Tensor, parts: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Element-wise ``_spread(total, parts)[i]`` (int64 tensors; ``parts`` >= 1)."""
    return total // parts + (i < total % parts).long()


@dataclass(frozen=True)
class SegmentTensors:
    """DySeg's segments as (F,) int64 device tensors: each frame's segment [first, last] and its length."""

    first: torch.Tensor
    last: torch.Tensor
    length: torch.Tensor
    starts: torch.Tensor  # (F,) bool: a segment starts at this frame


def segment_tensors(cut: torch.Tensor) -> SegmentTensors:
    """(F - 1,) bool cuts (cut[t]: a segment ends after frame t) -> each frame's segment, on the device."""
    n = cut.shape[0] + 1
    frame = torch.arange(n, device=cut.device)
    starts, ends = F.pad(cut, (1, 0), value=True), F.pad(cut, (0, 1), value=True)
    first = torch.where(starts, frame, 0).cummax(dim=0).values
    last = torch.where(ends, frame, n - 1).flip(0).cummin(dim=0).values.flip(0)
    return SegmentTensors(first, last, last - first + 1, starts)


def budget_tensors(
    knobs: Knobs, segments: SegmentTensors, near: torch.Tensor, per_frame: int, r_f: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`frame_budgets`' salient and anchor counts as (F,) int64 device tensors, without a host read.

    ``near``: (F - 1,) bool, near[t] = the gap after frame t is below ``dyseg_ignore`` (qwen's sub-segment
    breaks). ``int(seg_retain * d)`` is computed in float64, as Python computes it.
    """
    first, last, length = segments.first, segments.last, segments.length
    frame = torch.arange(length.shape[0], device=length.device)
    p, d = knobs.p, knobs.d
    n_sal = r_f - int(r_f * d)
    back = last - frame  # frames after this one in its segment
    if knobs.variant == "onevision":
        count = torch.clamp((r_f - n_sal) * length // ((length + p - 1) // p), max=per_frame - n_sal)
        return torch.full_like(length, n_sal), torch.where(back % p == 0, count, 0)
    seg_retain = r_f * length
    seg_ctx = (seg_retain.double() * d).long()  # int(seg_retain * d): float64, truncated (>= 0)
    if knobs.variant == "qwen":
        seg_ctx = seg_ctx.clamp(min=1)
        if knobs.authors:
            seg_ctx = torch.where(seg_retain == 1, 0, seg_ctx)
    seg_sal = seg_retain - seg_ctx
    if knobs.variant == "video":
        shares = _share(seg_sal, length, frame - first)
        per_anchor = _share(seg_ctx, (length + p - 1) // p, back // p)
        anchors = torch.minimum(torch.where(back % p == 0, per_anchor, 0), per_frame - shares)
        return shares, anchors
    # qwen: inside a segment, sub-segments end at near-duplicate breaks and at the segment's last frame
    sub_end = F.pad(near, (0, 1), value=True) | (back == 0)
    ends_so_far = sub_end.long().cumsum(dim=0)
    before = ends_so_far[first] - sub_end[first].long()  # sub-segment ends before the segment
    subs = ends_so_far[last] - before
    index = ends_so_far - before - 1  # this frame's sub-segment (where it ends one)
    back_sub = subs - 1 - index
    per_anchor = _share(seg_ctx, (subs + p - 1) // p, back_sub // p)
    ctx = torch.where(back_sub % p == 0, per_anchor.clamp(max=per_frame // 2), 0)
    salient = torch.where(sub_end, torch.minimum(_share(seg_sal, subs, index), per_frame - ctx), 0)
    anchors = torch.where(sub_end, ctx, 0)
    single = length == 1  # a 1-frame segment: both budgets as they are
    return torch.where(single, seg_sal, salient), torch.where(single, seg_ctx, anchors)


def anchor_width(knobs: Knobs, n_frames: int, per_frame: int, r_f: int) -> int:
    """The most anchors one frame can get (>= 1): a static bound for the padded anchor tables."""
    p, d = knobs.p, knobs.d
    n_sal = r_f - int(r_f * d)
    lengths = range(1, n_frames + 1)
    if knobs.variant == "onevision":
        widest = max(min((r_f - n_sal) * n // math.ceil(n / p), per_frame - n_sal) for n in lengths)
    elif knobs.variant == "video":  # the first share of the context budget over ceil(L / p) anchor frames
        widest = max(-(-int(r_f * n * d) // math.ceil(n / p)) for n in lengths)
    else:  # qwen: a 1-frame segment gets its whole context budget; longer ones at most P div 2 per frame
        widest = max(int(r_f * d), 1)
        if n_frames > 1:
            widest = max(widest, min(per_frame // 2, max(int(r_f * n_frames * d), 1)))
    return max(1, min(widest, per_frame))


@dataclass(frozen=True)
class AnchorSlots:
    """Per frame, the anchor frames of its segment (ascending), padded to ``Q`` = ceil(F / p) slots.

    frames: (F, Q) the q-th anchor frame of each frame's segment (0 where there is none); own: (F,) an
    anchor frame's own slot in its segment (a frame before its segment's first anchor frame: 0); used:
    (F,) how many slots each frame's segment fills (the host reads the largest).
    """

    frames: torch.Tensor
    own: torch.Tensor
    used: torch.Tensor


def anchor_slots(anchors: torch.Tensor, segments: SegmentTensors, slots: int) -> AnchorSlots:
    """(F,) anchor counts + segments -> the merge's slot tables (device, static shapes)."""
    is_anchor = (anchors > 0).long()
    so_far = is_anchor.cumsum(dim=0)
    before = (so_far - is_anchor)[segments.first]  # anchor frames before the segment
    used = so_far[segments.last] - before
    listed = torch.sort(is_anchor, descending=True, stable=True).indices  # the anchor frames first, ascending
    q = torch.arange(slots, device=anchors.device)
    index = (before[:, None] + q).clamp(max=anchors.shape[0] - 1)
    frames = torch.where(q < used[:, None], listed[index], 0)
    return AnchorSlots(frames, (so_far - before - 1).clamp(min=0), used)


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
) -> torch.Tensor:
    """(B, M, M) float32 distances -> (B, M) token positions by decreasing DPC score, all rows at once.

    Row b is :func:`llava.model.dpc_knn.dpc_scores` + ``stable_top`` on its first ``counts[b]`` tokens
    (``valid`` (B, M) bool marks them; None = all M): k clamped to the row's count, equal densities ranked
    by position, ``noise`` (B, M) of U(0, 1) draws added to the density times 1e-6 (upstream's tie-break).
    Padding ranks after every real token.
    """
    rows, m, _ = dist.shape
    counts = [m] * rows if counts is None else counts
    k_all = max(1, min(int(k), m))
    padded = dist if valid is None else dist.masked_fill(~valid[:, None, :], math.inf)
    nearest = torch.topk(padded, k=k_all, dim=-1, largest=False).values  # ascending, padding last
    density = torch.exp(-(nearest**2).mean(dim=-1))
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
    return torch.where((counts_on_device <= _CDIST_EXACT_MAX)[:, None, None], exact, matmul)


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


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d bool: no NaN or Inf anywhere; one min / max reduction per tensor (both propagate a NaN)."""
    bounds = torch.stack([bound.float() for t in tensors for bound in torch.aminmax(t)])
    return (bounds * 0 == 0).all()


@dataclass(frozen=True)
class _Rows:
    """Every frame's rows of the merge and the tables the knobs alone size (device tensors).

    unit / values / rows32: (F, R, D) rows, unit-normalised / in the merge dtype / in float32 (onevision:
    the R = P - n_sal non-salient tokens ascending; video / qwen: all R = P tokens). token: (F, R) each
    row's token, or None when row = token. salient: (F, P) bool, the salient tokens. rest: video / qwen,
    (F, P) the non-salient tokens ascending, then the salient ones; rest_count: (F,) how many are not.
    """

    unit: torch.Tensor
    values: torch.Tensor
    rows32: torch.Tensor
    token: torch.Tensor | None
    salient: torch.Tensor
    rest: torch.Tensor | None = None
    rest_count: torch.Tensor | None = None


@dataclass(frozen=True)
class _Anchors:
    """Each frame's anchors, padded to the static width W, and the output with the salient tokens in place.

    row: (F, W) the anchor's row in the flattened (F * R) rows, in the order cosine ties follow; real:
    (F, W) bool, not padding; value: (F, W, D) the anchors in the merge dtype; slot_rows / slot_padding:
    (F, Q, W) ``row`` / not ``real`` of each frame's q-th segment anchor frame; candidate: (F, R, Q) bool,
    may row r join the q-th anchor frame of its segment (None = all); source: (bound + 1,) the kept flat
    indices ascending from slot 1 (slot 0: a sink); out: (bound + 1, D) their features (the anchors'
    slots are overwritten by the merge); slot: (F, W) each anchor's output slot (0 for padding).
    """

    row: torch.Tensor
    real: torch.Tensor
    value: torch.Tensor
    slot_rows: torch.Tensor
    slot_padding: torch.Tensor
    candidate: torch.Tensor | None
    source: torch.Tensor
    out: torch.Tensor
    slot: torch.Tensor


def _anchors(
    ranks: torch.Tensor,
    rows: _Rows,
    anchors: torch.Tensor,
    slots: AnchorSlots,
    features: torch.Tensor,
    width: int,
    bound: int,
    steps: torch.Tensor,
) -> _Anchors:
    """Anchor tables and the output buffers from the DPC ranks (F, R') of every frame's candidates."""
    n_frames, per_frame, dim = features.shape
    frame = steps[:n_frames, None]
    real = steps[:width] < anchors[:, None]  # (F, W)
    if rows.rest is None:  # onevision: anchors in decreasing score (cosine ties go to the higher score)
        row = ranks[:, :width]
        token = torch.where(real, rows.token.gather(1, row), per_frame)
        candidate = None
    else:  # video / qwen: anchors by index (cosine ties go to the lowest); padding sorts last
        token = torch.where(real, rows.rest.gather(1, ranks[:, :width]), per_frame).sort(dim=1).values
        row = token.clamp(max=per_frame - 1)
    mine = torch.zeros(n_frames, per_frame + 1, dtype=torch.bool, device=features.device)
    mine = mine.scatter_(1, token, True)[:, :per_frame]  # (F, P) every anchor frame's own anchors
    if rows.rest is not None:
        # candidates: the segment's tokens neither salient nor among the anchor frame's own anchors
        own = slots.frames == frame  # (F, Q) the slot is the frame itself
        candidate = ~(rows.salient[..., None] | (mine[..., None] & own[:, None, :]))
    keep = (rows.salient | mine).reshape(-1)
    slot_of = keep.cumsum(dim=0) * keep  # kept tokens: their output slot from 1, in index order; others 0
    source = torch.zeros(bound + 1, dtype=torch.int64, device=features.device)
    source = source.scatter_(0, slot_of, steps[: n_frames * per_frame])
    out = features.reshape(-1, dim).index_select(0, source).to(rows.values.dtype)
    slot = torch.where(real, slot_of.view(n_frames, per_frame).gather(1, token.clamp(max=per_frame - 1)), 0)
    row = row + frame * rows.unit.shape[1]  # into the flattened rows
    value = rows.values.reshape(-1, dim)[row]
    return _Anchors(row, real, value, row[slots.frames], ~real[slots.frames], candidate, source, out, slot)


def _merge(rows: _Rows, found: _Anchors, slots: AnchorSlots, segment_of: torch.Tensor, indicator: torch.Tensor | None,
           n_used: int, width: int, beta: float, steps: torch.Tensor) -> torch.Tensor:
    """:func:`merge_into_anchors` for every anchor frame at once -> (F, width, D) new anchor values.

    Every frame scores its rows against the anchors of its segment (a bmm over frames, padded to the
    ``n_used`` anchor frames of the fullest segment times ``width``), argmax within each anchor frame's
    slots; the one-hot sums per frame are added up per segment by an indicator matmul (``segment_of``: (F,)
    each frame's segment; ``indicator``: (S, F) the frames of each segment, None when every segment is one
    frame), deterministic, unlike index_add on CUDA. Rows of frames that are not anchor frames hold garbage.
    """
    unit, rows32 = rows.unit, rows.rows32
    n_frames, n_rows, dim = unit.shape
    columns = n_used * width
    anchors = unit.reshape(-1, dim)[found.slot_rows[:, :n_used, :width]]  # (F, Q, W, D) of each frame's segment
    sims = torch.bmm(unit, anchors.view(n_frames, columns, dim).mT).view(n_frames, n_rows, n_used, width)
    padding = found.slot_padding[:, None, :n_used, :width]
    choice = sims.masked_fill_(padding, -math.inf).argmax(dim=-1)  # (F, R, Q); ties: the first slot
    member = choice[..., None] == steps[:width]  # (F, R, Q, W) one-hot
    if found.candidate is not None:
        member &= found.candidate[:, :, :n_used, None]
    member = member.view(n_frames, n_rows, columns)
    sums = torch.bmm(member.mT.to(torch.float32), rows32)  # (F, Q * W, D)
    sizes = member.sum(dim=1, dtype=torch.float32)  # (F, Q * W), exact counts
    own = (steps[:n_frames], slots.own)  # an anchor frame's own slot in its segment
    if indicator is not None:  # add the frames of each segment
        sums = indicator @ sums.reshape(n_frames, columns * dim)  # (S, Q * W * D)
        sizes = indicator @ sizes
        own = (segment_of, slots.own)
    dtype = rows.values.dtype
    total = sums.view(-1, n_used, width, dim)[own].to(dtype)  # (F, W, D)
    size = sizes.view(-1, n_used, width)[own].to(dtype)  # (F, W)
    mean = total / size.clamp(min=1)[..., None]
    weight = (size + 1).reciprocal().clamp(min=beta)[..., None]  # = 1 / (size + 1), bit for bit
    return weight * found.value[:, :width] + (1 - weight) * mean


def fastvid_select(
    features: torch.Tensor,
    salience: torch.Tensor | None,
    frame_global: torch.Tensor,
    retention: float,
    options: FastVIDOptions | None = None,
    *,
    family: str = "",
) -> VideoSelection:
    """FastVID on one video: (F, P, D) features, (F, P) salience, (F, G) frame globals -> K merged tokens.

    ``salience`` may be None with port="authors" (the L2 norms of the features are used). Returns
    sources (K,) ascending and features (K, D) (float32, or the features' dtype with merge_dtype="model").

    One host read, started as soon as the device budgets exist and waited for after everything the knobs
    size is queued (module docstring); after it, the merge (a fixed number of ops).
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
    device = features.device
    dtype = torch.float32 if options.merge_dtype == "float32" else features.dtype
    onevision = knobs.variant == "onevision"
    n_slots = -(-n_frames // knobs.p)  # anchor frames of one segment: at most ceil(F / p)
    width = anchor_width(knobs, n_frames, per_frame, r_f)
    bound = n_frames * r_f  # the kept count never exceeds it
    steps = torch.arange(max(n_frames * per_frame, bound) + 1, device=device)
    frame = steps[:n_frames, None]

    # --- what the host needs, first; its copy starts now and is waited for below ---------------------
    cut, near = gap_tensors(frame_global, knobs.c, knobs.tau, knobs.ignore)
    segments = segment_tensors(cut)
    salient_n, anchors_n = budget_tensors(knobs, segments, near, per_frame, r_f)
    slots = anchor_slots(anchors_n, segments, n_slots)
    rest_n = per_frame - salient_n
    if onevision:
        rare = torch.zeros((), dtype=torch.bool, device=device)
    else:  # an anchor frame whose candidates need torch.cdist's other method or their own k
        exact = _CDIST_EXACT_MAX if per_frame > _CDIST_EXACT_MAX else 0
        rare = ((anchors_n > 0) & ((rest_n <= exact) | (rest_n < min(knobs.k, per_frame)))).any()
    finite = _all_finite(features, salience, frame_global)
    summary = torch.stack([finite, (salient_n + anchors_n).sum(), slots.used.max(), anchors_n.max(),
                           segments.starts.sum(), rare])
    read = HostCopy(torch.cat([summary, salient_n, anchors_n]))

    # --- queued behind the copy: everything the knobs size -----------------------------------------
    order = torch.sort(salience.float(), dim=1, descending=True, stable=True).indices  # ties: lower index
    if onevision:  # every frame: n_sal salient tokens, its other M tokens are the rows of the merge
        n_sal = r_f - int(r_f * knobs.d)
        rest = order[:, n_sal:].sort(dim=1).values  # (F, M) the non-salient tokens, ascending
        picked = features[frame, rest]
        values = picked.to(dtype)
        rows32 = values if dtype == torch.float32 else picked.float()  # float32: distances and cluster sums
        salient = torch.zeros(n_frames, per_frame, dtype=torch.bool, device=device).scatter_(1, order[:, :n_sal], True)
        rows = _Rows(F.normalize(values, dim=-1, eps=_EPS), values, rows32, rest, salient)
        n_candidates, valid = per_frame - n_sal, None
    else:
        rank = torch.empty_like(order).scatter_(1, order, steps[:per_frame].expand_as(order))
        salient = rank < salient_n[:, None]  # (F, P)
        values = features.to(dtype)  # (F, P, D): every token is a row; the salient ones are not candidates
        rows32 = values.float()
        rest = torch.sort(salient.to(torch.uint8), dim=1, stable=True).indices  # non-salient first, ascending
        rows = _Rows(F.normalize(values, dim=-1, eps=_EPS), values, rows32, None, salient, rest, rest_n)
        n_candidates, valid = per_frame, steps[:per_frame] < rest_n[:, None]
    dist = found = None
    if width > 0 and n_candidates > 0:
        if onevision:
            dist = pairwise_distances(rows32)  # (F, M, M)
        else:  # each frame's candidates in ``rest`` order, from one table of all its tokens
            table = pairwise_distances(rows32)  # (F, P, P)
            dist = table.gather(1, rest[:, :, None].expand(-1, -1, per_frame))
            dist = dist.gather(2, rest[:, None, :].expand(-1, per_frame, -1))
        if options.seed is None:  # every frame's candidates ranked by decreasing DPC score
            ranks = batched_dpc_ranks(dist, knobs.k, valid=valid)
            found = _anchors(ranks, rows, anchors_n, slots, features, width, bound, steps)
    else:  # no frame can get an anchor: the output is the salient tokens
        ranks = torch.zeros(n_frames, 0, dtype=torch.int64, device=device)
        found = _anchors(ranks, rows, anchors_n, slots, features, 0, bound, steps)
    segment_of = segments.starts.long().cumsum(dim=0) - 1  # (F,) each frame's segment
    indicator = (steps[:n_frames, None] == segment_of).to(torch.float32)  # (F, F): row s, segment s's frames

    # --- the read: wait for the copy (not for the work queued since) ------------------------------
    host = read.tolist()
    finite_ok, count, n_used, widest, n_segments, is_rare = host[:6]
    if not finite_ok:
        raise ValueError(f"{OWNER}: features or signals contain NaN or Inf; refusing to select tokens from them")
    if count > bound:  # the budgets never exceed F * r_f
        raise RuntimeError(f"{OWNER}: budgets keep {count} tokens, more than F * r_f = {bound}")
    if found is None or is_rare:  # seeded or rare: rank again, with the host's counts (and noise)
        salient_h, anchors_h = host[6 : 6 + n_frames], host[6 + n_frames :]
        counts = [per_frame - s if a and not onevision else n_candidates for s, a in zip(salient_h, anchors_h,
                                                                                       strict=True)]
        noise = None
        if options.seed is not None:  # upstream's noise, drawn anchor frame by anchor frame as the loop did
            generator = torch.Generator().manual_seed(options.seed)
            noise = torch.zeros(n_frames, n_candidates)
            for f, a in enumerate(anchors_h):  # seeded path only: one CPU draw per anchor frame
                if a:
                    noise[f, : counts[f]] = torch.rand(counts[f], generator=generator)
            noise = (noise.pin_memory() if device.type == "cuda" else noise).to(device, non_blocking=True)
        if is_rare and per_frame > _CDIST_EXACT_MAX:  # frames of <= 25 candidates: pair-by-pair distances
            head = rows32[frame, rest[:, :_CDIST_EXACT_MAX]]
            direct = torch.cdist(head, head, compute_mode="donot_use_mm_for_euclid_dist") / dim**0.5
            block = dist[:, :_CDIST_EXACT_MAX, :_CDIST_EXACT_MAX]
            block.copy_(torch.where((rest_n <= _CDIST_EXACT_MAX)[:, None, None], direct, block))
        ranks = batched_dpc_ranks(dist, knobs.k, counts=counts, valid=valid, noise=noise)
        found = _anchors(ranks, rows, anchors_n, slots, features, width, bound, steps)
    if widest > 0:
        indicator = indicator[:n_segments] if n_segments < n_frames else None
        new = _merge(rows, found, slots, segment_of, indicator, n_used, widest, knobs.beta, steps)
        found.out[found.slot[:, :widest]] = new  # padding: to the sink slot 0
    return VideoSelection(found.source[1 : count + 1], found.out[1 : count + 1])


def _select(video: VideoTokens, retention: float, options: FastVIDOptions) -> VideoSelection:
    salience = None if options.port == "authors" else video.signal(FRAME_SALIENCE)
    return fastvid_select(video.features, salience, video.signal(FRAME_GLOBAL), retention, options, family=video.family)


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
