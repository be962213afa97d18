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
  dtype. Density distances are float32 in both, as upstream.
- video: upstream strips LLaVA-Video's row newlines itself (hard-coded 64 x 13 x 13) and re-inserts the
  newline of every row that keeps a token; here the features come without newlines (P = 169) and the
  adapter's layout policy places newlines.
- Output: one selection per video (upstream: batch size 1, one video per request).

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

from llava.model.dpc_knn import dpc_centres, stable_top
from llava.model.method_api import (
    FRAME_GLOBAL,
    FRAME_SALIENCE,
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


def gap_flags(
    frame_global: torch.Tensor, c: int, tau: float, ignore: float | None = None
) -> tuple[list[bool], list[bool]]:
    """(F, G) -> (cut, near) per frame gap t < F - 1, on the host (one sync).

    cut[t]: the segment ends after frame t (c_t among the min(c - 1, F - 1) smallest, ties to the lower
    gap, or c_t < tau). near[t]: c_t < ignore (qwen's sub-segment cuts; all False without ``ignore``).
    """
    unit = F.normalize(frame_global.float(), dim=-1, eps=_EPS)
    sim = (unit[:-1] * unit[1:]).sum(dim=-1)  # (F-1,)
    gaps = sim.shape[0]
    lowest = torch.zeros(gaps, dtype=torch.bool, device=sim.device)
    lowest[stable_top(-sim, min(c - 1, gaps))] = True  # c - 1 clamped to F - 1: upstream's topk crashes
    cut = lowest | (sim < tau)
    near = sim < ignore if ignore is not None else torch.zeros_like(cut)
    flags = torch.stack([cut, near]).tolist()
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
    member = F.one_hot(choice, anchors.shape[0]).to(dtype) * candidate[:, None].to(dtype)
    size = member.sum(dim=0)  # (A,)
    mean = (member.T @ values) / size.clamp(min=1)[:, None]
    weight = (1.0 / (size + 1)).clamp(min=beta)[:, None]
    return weight * values[anchors] + (1 - weight) * mean


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
) -> VideoSelection:
    """FastVID on one video: (F, P, D) features, (F, P) salience, (F, G) frame globals -> K merged tokens.

    ``salience`` may be None with port="authors" (the L2 norms of the features are used). Returns
    sources (K,) ascending and features (K, D) (float32, or the features' dtype with merge_dtype="model").
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
    finite = torch.isfinite(features).all() & torch.isfinite(salience).all() & torch.isfinite(frame_global).all()
    if not bool(finite):
        raise ValueError(f"{OWNER}: features or signals contain NaN or Inf; refusing to select tokens from them")

    cut, near = gap_flags(frame_global, knobs.c, knobs.tau, knobs.ignore)
    budgets = frame_budgets(knobs, segments_from_cuts(cut), near, per_frame, r_f)

    device = features.device
    order = torch.sort(salience.float(), dim=1, descending=True, stable=True).indices  # ties: lower index
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_frame, device=device).expand_as(order))
    salient = rank < torch.tensor(budgets.salient, device=device)[:, None]  # (F, P)
    flat = features.reshape(n_frames * per_frame, dim)
    dtype = torch.float32 if options.merge_dtype == "float32" else features.dtype
    generator = None if options.seed is None else torch.Generator().manual_seed(options.seed)

    sources, values = [], []
    for f, count in enumerate(budgets.anchors):  # loop over anchor frames: each has its own budget and scope
        if count == 0:
            continue
        rest = order[f, budgets.salient[f] :].sort().values  # the frame's non-salient tokens, ascending
        picks = dpc_centres(features[f, rest], knobs.k, count, generator=generator)  # by decreasing score
        if knobs.variant != "onevision":
            picks = picks.sort().values  # these scripts order anchors by index (cosine ties go to the lowest)
        lo, hi = budgets.scope[f]
        local = (f - lo) * per_frame + rest[picks]  # anchor rows within the scope
        candidate = ~salient[lo:hi].reshape(-1)
        if knobs.variant != "onevision":
            candidate[local] = False  # video / qwen: the frame's own anchors are not candidates
        sources.append(local + lo * per_frame)
        values.append(merge_into_anchors(flat[lo * per_frame : hi * per_frame], candidate, local, knobs.beta, dtype))

    kept = salient.reshape(-1).nonzero().squeeze(1)
    source = torch.cat([kept, *sources])
    merged = torch.cat([flat[kept].to(dtype), *values])
    source, permutation = torch.sort(source)
    return VideoSelection(source, merged[permutation])


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
