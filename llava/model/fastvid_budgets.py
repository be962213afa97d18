"""FastVID's per-frame budgets from DySeg's cuts: a host reference and the same rule on the device.

Per frame: how many salient tokens it keeps and how many anchors (context centres) it gets, per variant
(module docstring of :mod:`llava.model.fastvid`). :func:`frame_budgets` is the rule as plain Python loops
over segments (the reference the tests read); :func:`budget_tensors` computes the same integers on the
device from the (F - 1,) cut / near-duplicate flags, vectorised over frames (cumulative sums and
comparisons, no host read), so that everything downstream can be queued before the selection's one host
read. :func:`anchor_slots` lays out, per frame, the anchor frames of its segment (the merge's padded
batch); :func:`anchor_width` bounds the anchors of one frame from the knobs alone (a static shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class BudgetKnobs(Protocol):
    """The knobs the budgets read (:class:`llava.model.fastvid.Knobs`)."""

    variant: str
    authors: bool
    d: float
    p: int


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
    knobs: BudgetKnobs, segments: list[tuple[int, int]], near: list[bool], per_frame: int, r_f: int
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
    true = torch.ones(1, dtype=torch.bool, device=cut.device)
    starts, ends = torch.cat([true, cut]), torch.cat([cut, true])
    first = torch.where(starts, frame, 0).cummax(dim=0).values
    last = torch.where(ends, frame, n - 1).flip(0).cummin(dim=0).values.flip(0)
    return SegmentTensors(first, last, last - first + 1, starts)


def budget_tensors(
    knobs: BudgetKnobs, segments: SegmentTensors, near: torch.Tensor, per_frame: int, r_f: int
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
    true = torch.ones(1, dtype=torch.bool, device=near.device)
    sub_end = torch.cat([near, true]) | (back == 0)
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


def anchor_width(knobs: BudgetKnobs, n_frames: int, per_frame: int, r_f: int) -> int:
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

    frames: (F, Q) the q-th anchor frame of each frame's segment (0 where there is none); counts: (F, Q)
    its anchor count (0 = no such anchor frame); own: (F,) an anchor frame's own slot in its segment (a
    frame before its segment's first anchor frame: 0);
    used: (F,) how many slots each frame's segment fills (the host reads the largest).
    """

    frames: torch.Tensor
    counts: torch.Tensor
    own: torch.Tensor
    used: torch.Tensor


def anchor_slots(anchors: torch.Tensor, segments: SegmentTensors, slots: int) -> AnchorSlots:
    """(F,) anchor counts + segments -> the merge's slot tables (device, static shapes)."""
    is_anchor = anchors > 0
    so_far = is_anchor.long().cumsum(dim=0)
    before = so_far[segments.first] - is_anchor[segments.first].long()  # anchor frames before the segment
    used = so_far[segments.last] - before
    listed = torch.sort(~is_anchor, stable=True).indices  # the anchor frames first, ascending
    q = torch.arange(slots, device=anchors.device)
    real = q < used[:, None]
    frames = torch.where(real, listed[(before[:, None] + q).clamp(max=anchors.shape[0] - 1)], 0)
    counts = torch.where(real, anchors[frames], 0)
    return AnchorSlots(frames, counts, (so_far - 1 - before).clamp(min=0), used)
