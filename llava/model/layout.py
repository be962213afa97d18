"""Where newline tokens go among a video's (kept) tokens, and each token's uncompressed position.

Uncompressed layouts (``newline_position`` of the checkpoint), for F frames of h x w pooled tokens:
- ``one_token`` (LLaVA-OneVision): all F*h*w tokens, then ONE newline.
- ``grid`` (LLaVA-Video): every row of every frame ends with a newline: F*h*(w+1) tokens.
- ``frame``: every frame ends with a newline; ``no_token``: no newline.

After compression, ``one_token`` / ``frame`` / ``no_token`` keep their newlines (one per video, one
per frame that keeps a token, none). For ``grid`` the row newlines are a choice, ``grid_newlines``:
- ``frame`` (DEFAULT): one newline after each frame's kept tokens (frames keeping no token get none).
  It marks frame boundaries, costs 1 token per frame, so the achieved retention counting newlines
  stays close to R (R = 0.25, 13x13 grid: (42 + 1) / 182 = 0.236).
- ``rows``: a newline after every row that still has a kept token; the row structure survives,
  but nearly every row keeps a token at R = 0.25, so about 13 extra tokens per frame (~0.30).
- ``all_rows``: the authors' code: all h row newlines of a frame, regrouped after its kept tokens
  (~0.30 achieved at R = 0.25).
When every token is kept (identity compression) every choice gives the exact uncompressed layout.

Positions: each layout entry carries its offset in the UNCOMPRESSED visual block, so a caller can
use contiguous positions (the default, as the paper's code does) or the original ones.

Two equivalent constructions, both vectorised:
- :func:`build_layout` from kept indices: one sort over K + (number of newlines) entries;
- :func:`layout_from_mask` from the token keep mask, for every choice whose entries stay in
  uncompressed order (all but ``all_rows``): the kept entries are the True positions of a mask over
  the uncompressed block, so the only host synchronisation is reading their count, and nothing is
  launched after it (the pipeline's GPU waits on the host at that point).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

GRID_NEWLINES = ("frame", "rows", "all_rows")


@dataclass
class VisualLayout:
    """One video's visual block as it enters the LM.

    source: (N,) int64 rows of ``[video tokens (F*h*w); newline]``, i.e. a value F*h*w is a newline.
    original_offsets: (N,) int64 offset of each entry in the uncompressed block (for original positions).
    full_length: length of the uncompressed block (tokens + newlines).
    kept_tokens / total_tokens: video tokens kept / before, newlines excluded.
    """

    source: torch.Tensor
    original_offsets: torch.Tensor
    full_length: int
    total_tokens: int
    _kept: int | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return int(self.source.numel())

    @property
    def kept_tokens(self) -> int:
        """Video tokens kept (newlines excluded); counted on first use, after the timed stages."""
        if self._kept is None:
            self._kept = int((self.source < self.total_tokens).sum())
        return self._kept

    @property
    def newlines(self) -> int:
        return self.length - self.kept_tokens

    def stats(self) -> dict[str, float | int]:
        """Achieved retention with and without newline tokens, for InferenceResult.extra."""
        return {
            "video_tokens_before": self.total_tokens,
            "video_tokens_kept": self.kept_tokens,
            "newline_tokens_before": self.full_length - self.total_tokens,
            "newline_tokens_after": self.newlines,
            "achieved_retention_without_newlines": self.kept_tokens / self.total_tokens,
            "achieved_retention_with_newlines": self.length / self.full_length,
        }


def full_length(frames: int, h: int, w: int, newline_position: str) -> int:
    """Length of the uncompressed visual block."""
    tokens = frames * h * w
    return {"one_token": tokens + 1, "grid": frames * h * (w + 1), "frame": frames * (h * w + 1), "no_token": tokens}[
        newline_position
    ]


def build_layout(
    kept: torch.Tensor, frames: int, h: int, w: int, newline_position: str, grid_newlines: str = "frame"
) -> VisualLayout:
    """kept (K,) ascending flat indices into F*h*w -> the visual block (see the module docstring)."""
    if newline_position not in ("one_token", "grid", "frame", "no_token"):
        raise ValueError(f"unknown newline_position {newline_position!r}")
    if grid_newlines not in GRID_NEWLINES:
        raise ValueError(f"grid_newlines must be one of {', '.join(GRID_NEWLINES)}, got {grid_newlines!r}")
    device = kept.device
    kept = kept.to(torch.int64)
    per_frame, total = h * w, frames * h * w
    newline_id = total
    if newline_position in ("one_token", "no_token"):  # no per-token arithmetic: the hot path of OV
        extra = newline_position == "one_token"
        source = torch.cat([kept, torch.full((int(extra),), newline_id, device=device)])
        offsets = torch.cat([kept, torch.full((int(extra),), total, device=device)])
        return VisualLayout(source, offsets, full_length(frames, h, w, newline_position), total, kept.numel())

    f, j = kept // per_frame, kept % per_frame
    r, c = j // w, j % w
    if newline_position == "frame":
        stride = per_frame + 1
        tok_local, tok_offset = j, f * stride + j
        nl_frames = torch.unique(f)
        nl_local, nl_frame = torch.full_like(nl_frames, per_frame), nl_frames
        nl_offset = nl_frames * stride + per_frame
    else:  # grid
        stride, row = h * (w + 1), w + 1
        tok_local, tok_offset = r * row + c, f * stride + r * row + c
        policy = "rows" if kept.numel() == total else grid_newlines
        if policy == "rows":
            rows = torch.unique(kept // w)  # (frame, row) pairs with a kept token
            nl_frame, nl_row = rows // h, rows % h
            nl_local = nl_row * row + w
        elif policy == "frame":
            nl_frame = torch.unique(f)
            nl_row = torch.full_like(nl_frame, h - 1)
            nl_local = torch.full_like(nl_frame, h * row)  # after every token of the frame
        else:  # all_rows
            frames_kept = torch.unique(f)
            nl_frame = frames_kept.repeat_interleave(h)
            nl_row = torch.arange(h, device=device).repeat(frames_kept.numel())
            nl_local = h * row + nl_row
        nl_offset = nl_frame * stride + nl_row * row + w
    # One stable sort by (frame, position within the frame) interleaves tokens and newlines.
    span = (h + 1) * (w + 1) + h + 1
    keys = torch.cat([f * span + tok_local, nl_frame * span + nl_local])
    order = torch.argsort(keys, stable=True)
    source = torch.cat([kept, torch.full_like(nl_frame, newline_id)])[order]
    offsets = torch.cat([tok_offset, nl_offset])[order]
    return VisualLayout(source, offsets, full_length(frames, h, w, newline_position), total, kept.numel())


def block_keep_mask(
    mask: torch.Tensor, h: int, w: int, newline_position: str, grid_newlines: str = "frame"
) -> torch.Tensor | None:
    """Token keep mask (F, h*w) -> keep mask over the uncompressed block (full_length,), no host sync.

    Marks the same entries :func:`build_layout` keeps, except that a mask keeping no token marks
    nothing, newlines included (a refused selection: the caller raises on the empty block). None for
    ``grid`` with ``all_rows``, whose newlines leave uncompressed order (use build_layout there).
    """
    frames = mask.shape[0]
    if newline_position == "no_token":
        return mask.reshape(-1)
    if newline_position == "one_token":  # the newline stays unless nothing is kept (a refused selection)
        return torch.cat([mask.reshape(-1), mask.any().reshape(1)])
    if newline_position == "frame":
        return torch.cat([mask, mask.any(dim=1, keepdim=True)], dim=1).reshape(-1)
    if newline_position != "grid":
        raise ValueError(f"unknown newline_position {newline_position!r}")
    if grid_newlines not in GRID_NEWLINES:
        raise ValueError(f"grid_newlines must be one of {', '.join(GRID_NEWLINES)}, got {grid_newlines!r}")
    if grid_newlines == "all_rows":
        return None
    grid = mask.reshape(frames, h, w)
    rows = grid.any(dim=2, keepdim=True)  # a newline after every row with a kept token
    if grid_newlines == "frame":  # one newline, in the slot of the frame's last row newline
        last = grid.any(dim=(1, 2)).reshape(frames, 1, 1)
        per_frame = torch.cat([rows.new_zeros(frames, h - 1, 1), last], dim=1)
        rows = torch.where(mask.all(), rows, per_frame)  # everything kept: the uncompressed layout
    return torch.cat([grid, rows], dim=2).reshape(-1)


@lru_cache(maxsize=32)
def block_sources(frames: int, h: int, w: int, newline_position: str, device: torch.device) -> torch.Tensor:
    """(full_length,) row of ``[video tokens; newline]`` for each entry of the uncompressed block.

    Made once per shape, outside inference mode (usable in and out of it)."""
    total = frames * h * w
    with torch.inference_mode(False):
        tokens = torch.arange(total, device=device)
        if newline_position in ("one_token", "no_token"):
            return torch.arange(total + int(newline_position == "one_token"), device=device)
        if newline_position == "frame":
            grid, pad = tokens.reshape(frames, h * w), (frames, 1)
        else:
            grid, pad = tokens.reshape(frames, h, w), (frames, h, 1)
        return torch.cat([grid, torch.full(pad, total, device=device)], dim=-1).reshape(-1)


@dataclass
class PendingLayout:
    """A layout from a block keep mask, computed at full block size on the device and waiting for its
    kept count (``count``, a 0-d device tensor): :meth:`finish` cuts it to that count with views only.

    Splitting the two lets a caller read the counts of all of a batch's videos in one synchronisation.
    """

    sources: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor | None
    count: torch.Tensor
    full_length: int
    total_tokens: int

    def finish(self, kept: int) -> tuple[VisualLayout, torch.Tensor | None]:
        if kept > self.sources.shape[0]:
            raise ValueError(f"{kept} entries kept, more than the {self.sources.shape[0]} this layout was sized for")
        layout = VisualLayout(self.sources[:kept], self.offsets[:kept], self.full_length, self.total_tokens)
        return layout, (self.rows[:kept] if self.rows is not None else None)


def pending_layout(
    block_mask: torch.Tensor,
    frames: int,
    h: int,
    w: int,
    newline_position: str,
    table: torch.Tensor | None = None,
    rank: torch.Tensor | None = None,
) -> PendingLayout:
    """Everything :func:`layout_from_mask` computes before its host synchronisation (see there).

    ``rank``: a compact ``table`` (a merging method's M output rows, then the newline) instead of rows of
    ``[video tokens; newline]``: (F*h*w + 1,) each source's row of it (:class:`SelectedVideo`'s rank), the
    newline's last. Then at most M tokens are kept, so the layout is computed at M + (newline slots)
    entries instead of the whole block's."""
    size = block_mask.numel()
    total = frames * h * w
    length = size if rank is None or table is None else min(size, table.shape[0] - 1 + size - total)
    offsets = torch.nonzero_static(block_mask, size=length, fill_value=0).squeeze(1)
    sources = block_sources(frames, h, w, newline_position, block_mask.device).index_select(0, offsets)
    rows = None
    if table is not None:
        rows = table.index_select(0, sources if rank is None else rank.index_select(0, sources))
    return PendingLayout(sources, offsets, rows, block_mask.sum(), size, total)


def layout_from_mask(
    block_mask: torch.Tensor,
    frames: int,
    h: int,
    w: int,
    newline_position: str,
    table: torch.Tensor | None = None,
) -> tuple[VisualLayout, torch.Tensor | None]:
    """The layout of the True entries of :func:`block_keep_mask`, in uncompressed order, and (when
    ``table`` = rows of ``[video tokens; newline]`` is given) its rows: the visual block's embeddings.

    Everything is computed for the whole block before the one host synchronisation, the kept count,
    and then cut to it: no kernel is launched after the sync, when the GPU would wait for the host.
    """
    pending = pending_layout(block_mask, frames, h, w, newline_position, table)
    return pending.finish(int(pending.count))  # the one host sync
