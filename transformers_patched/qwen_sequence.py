"""Shortening a Qwen multimodal token sequence to the kept video tokens: pure tensor functions.

The layout rule (VidCom2 on M-RoPE models): positions are computed on the UNCOMPRESSED sequence and
then gathered, so every kept token - video or text - keeps its original (t, h, w) position; text after
a video keeps its original position, and decoding continues from the last prompt position + 1, exactly
as if nothing had been dropped. The KV cache and the 2-D attention mask use the compacted indices.

Rows of a batch keep different numbers of tokens, so the kept tokens of every row are re-packed to the
right of a fresh left-padded layout (length = the longest row). Everything here is vectorised over
tokens and rows; the only host syncs are the packed length and the token-count checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackIndex:
    """Where each kept token of a (B, L) layout goes in the packed (B, length) layout.

    rows, src, dst: (K,) int64 - token (rows[k], src[k]) moves to (rows[k], dst[k]).
    counts: (B,) kept tokens per row. length: max(counts).
    columns: a batch of one: its kept columns (K,) in order, the whole move (no padding), so the gathers
    are one index_select each rather than a scatter into a padded layout (fewer launches on the host).
    """

    rows: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    counts: torch.Tensor
    length: int
    columns: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.counts.shape[0])


def pack_left(keep: torch.Tensor) -> PackIndex:
    """(B, L) bool of kept tokens -> the index moving them, in order, to the right end of each row."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, L) bool tensor, got {tuple(keep.shape)} {keep.dtype}")
    counts = keep.sum(dim=1)
    if keep.shape[0] == 1:  # one row: the packed layout is its kept columns, in order (one device read)
        columns = keep[0].nonzero().squeeze(1)
        length = int(columns.shape[0])
        rows = torch.zeros_like(columns)
        return PackIndex(rows, columns, torch.arange(length, device=keep.device), counts, length, columns)
    length = int(counts.max().item()) if keep.numel() else 0
    rank = keep.long().cumsum(dim=1) - 1
    rows, src = keep.nonzero(as_tuple=True)
    dst = (length - counts)[rows] + rank[rows, src]
    return PackIndex(rows=rows, src=src, dst=dst, counts=counts, length=length)


def gather_packed(values: torch.Tensor, index: PackIndex, fill: float | bool = 0) -> torch.Tensor:
    """(B, L, *rest) -> (B, index.length, *rest): kept entries moved, the rest ``fill`` (left padding)."""
    if index.columns is not None:
        return values.index_select(1, index.columns)
    out = values.new_full((index.batch_size, index.length, *values.shape[2:]), fill)
    out[index.rows, index.dst] = values[index.rows, index.src]
    return out


def packed_attention_mask(index: PackIndex, device: torch.device) -> torch.Tensor:
    """(B, length) int64: 1 on the packed tokens, 0 on the left padding."""
    if index.columns is not None:
        return torch.ones(1, index.length, dtype=torch.long, device=device)
    cols = torch.arange(index.length, device=device)
    return (cols[None, :] >= (index.length - index.counts.to(device))[:, None]).long()


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L) plain running positions of the real tokens (0 on padding).

    Passed as the first row of the 4-row position ids: attention kernels that detect packed sequences
    from position ids (flash-attention without a mask) must see contiguous positions, never the gapped
    M-RoPE ones.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0) * attention_mask.long()


def video_keep_flags(keep_masks: list[torch.Tensor], sizes: list[int], device: torch.device) -> torch.Tensor:
    """Per-video keep flags (N_i,) bool -> one (sum sizes,) bool over all video tokens, in video order."""
    if len(keep_masks) != len(sizes):
        raise ValueError(f"got keep flags for {len(keep_masks)} videos but the batch has {len(sizes)}")
    for i, (mask, size) in enumerate(zip(keep_masks, sizes, strict=True)):
        if mask.dtype != torch.bool or tuple(mask.shape) != (size,):
            raise ValueError(f"video {i}: keep flags must be ({size},) bool, got {tuple(mask.shape)} {mask.dtype}")
    if not keep_masks:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.cat([mask.to(device) for mask in keep_masks])


def token_keep_mask(
    attention_mask: torch.Tensor,
    video_positions: torch.Tensor,
    video_flags: torch.Tensor,
    n_placeholders: int | None = None,
) -> torch.Tensor:
    """(B, L) real tokens, (B, L) video placeholders, (N,) kept video tokens -> (B, L) kept tokens.

    Padding is dropped (the packed layout re-pads); non-video tokens are always kept. ``n_placeholders``:
    the placeholder count when the caller knows it on the host (else it is read from the device)."""
    if n_placeholders is None:
        n_placeholders = int(video_positions.sum().item())
    if n_placeholders != video_flags.numel():
        raise ValueError(
            f"the prompt holds {n_placeholders} video placeholder tokens but the videos give "
            f"{video_flags.numel()} tokens: the processor output and the vision features disagree"
        )
    return attention_mask.bool().masked_scatter(video_positions, video_flags)  # in order, no host sync


def joint_visual_features(
    image_positions: torch.Tensor,
    video_positions: torch.Tensor,
    image_features: torch.Tensor | None,
    video_features: torch.Tensor | None,
) -> torch.Tensor:
    """One (N_visual, D) tensor over the image and video placeholders in sequence order (row major)."""
    visual = image_positions | video_positions
    sample = image_features if image_features is not None else video_features
    if sample is None:
        raise ValueError("joint_visual_features needs image or video features")
    joint = sample.new_zeros(int(visual.sum().item()), sample.shape[-1])
    if image_features is not None:
        joint[image_positions[visual]] = image_features.to(joint.dtype)
    if video_features is not None:
        joint[video_positions[visual]] = video_features.to(joint.dtype)
    return joint
