"""Vision-tower signals of pre-LLM compression methods for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, with the
tower's attention implementation (SDPA / packed flash) left as it is.

A forward pre-hook on the LAST vision block keeps its call's inputs (hidden states, ``cu_seqlens``,
``position_embeddings`` = the rotary (cos, sin); transformers 5.17 passes the same keywords to the blocks
of all three towers). That block's queries and keys are recomputed from them (``norm1``, ``attn.qkv``,
rotary), and each statistic is computed per temporal patch ("frame": its patches form one
``cu_seqlens`` segment of a full-attention block), in float32, with the received attention summed over
query chunks so that no more than a chunk of the attention map exists at a time.

Signals, per video of F frames, n patches per frame, P = n / m^2 merged tokens per frame (Qwen orders a
frame's patches by m x m merge unit, so a merge unit is m^2 consecutive patches):

- ``vit_received_attention`` (F, P): per patch the mean over heads and query rows of
  softmax(q k^T * scale) within its frame (q, k after RoPE, as the block attends), then the mean over
  each merge unit;
- ``vit_keys`` (F, P, head_dim): the block's keys BEFORE RoPE (VisionZip's raw keys), head mean, merge
  unit mean;
- ``frame_salience`` (F, P): FastVID's salience: q_bar = the frame's mean RoPE'd query, k_bar = the
  RoPE'd keys averaged over each merge unit, head mean of softmax(q_bar k_bar^T * scale) over the P units;
- ``frame_global`` (F, D): the mean of the frame's merged embeddings (the tower output).

Qwen2.5-VL's blocks see the patches in window order (merge units permuted by the window index); its last
block attends whole frames, so the per-frame statistics are computed in window order and the merge units
are put back in the order of the merged embeddings. All outputs are in the order of the tower output
that ``qwen_stages._run_tower`` returns.

Two ways in:

    (embeds, deepstack, grid), signals = vision_signals(model, pixels_videos, video_grid_thw, names)

or, around any call of the tower::

    with capture_last_vision_block(model) as captured:
        embeds, deepstack, grid = _run_tower(model, pixels_videos, video_grid_thw)
    signals = signals_from_capture(model, captured, grid, names, embeds)

``signals[name]`` is one float32 tensor per video, on the tower's device; :func:`per_video` turns the
mapping into one {name: tensor} per video (``VideoTokens.signals``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, VIT_KEYS, VIT_RECEIVED_ATTENTION
from llava.model.siglip_signals import DEFAULT_CHUNK, check_names, received_from_qk

QWEN_SIGNALS = (VIT_RECEIVED_ATTENTION, VIT_KEYS, FRAME_SALIENCE, FRAME_GLOBAL)
TowerOutput = tuple[list[torch.Tensor], list[torch.Tensor] | None, list[tuple[int, int, int]]]
"""What ``qwen_stages._run_tower`` returns: per-item merged embeddings, DeepStack features, host grid."""


@dataclass
class BlockCall:
    """What the last vision block was called with (set by :func:`capture_last_vision_block`).

    hidden: (N, C) input hidden states, all items of the call packed (Qwen2.5-VL: in window order).
    cu_seqlens: (segments + 1,) the block's attention segments (one per frame).
    cos, sin: (N, head_dim) the rotary embedding of each patch.
    window_index: (N / m^2,) Qwen2.5-VL's merge-unit window order, when the caller passed it to the tower.
    """

    hidden: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    window_index: torch.Tensor | None = None


def _tower(model: PreTrainedModel | nn.Module) -> nn.Module:
    """The vision tower of a Qwen VL model (or the tower itself)."""
    if hasattr(model, "blocks") and hasattr(model, "merger"):
        return model
    inner = getattr(model, "model", None)
    tower = getattr(inner, "visual", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no Qwen vision tower (model.model.visual)")
    return tower


def _check_last_block_full(tower: nn.Module) -> None:
    """A windowed tower's statistics need its last block to attend whole frames."""
    full = getattr(tower, "fullatt_block_indexes", None)
    if full is not None and len(tower.blocks) - 1 not in full:
        raise ValueError(
            f"the vision tower's last block ({len(tower.blocks) - 1}) attends in windows (full-attention blocks: "
            f"{list(full)}); per-frame signals need a full-attention last block"
        )


@contextmanager
def capture_last_vision_block(model: PreTrainedModel | nn.Module) -> Iterator[BlockCall]:
    """Record the last vision block's inputs (and the window index given to the tower) during a normal
    forward. Hooks only keep references: the tower's computation and output are unchanged. The last
    tower call inside the context wins."""
    tower = _tower(model)
    _check_last_block_full(tower)
    captured = BlockCall()

    def on_block(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.hidden = args[0] if args else kwargs["hidden_states"]
        captured.cu_seqlens = args[1] if len(args) > 1 else kwargs["cu_seqlens"]
        rotary = args[2] if len(args) > 2 else kwargs.get("position_embeddings")
        if rotary is None:
            raise ValueError("the last vision block was called without position_embeddings (cos, sin)")
        captured.cos, captured.sin = rotary

    def on_tower(_module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.window_index = kwargs.get("window_index")

    handles = [
        tower.blocks[-1].register_forward_pre_hook(on_block, with_kwargs=True),
        tower.register_forward_pre_hook(on_tower, with_kwargs=True),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (N, H, d) by (N, d) cos / sin (pairs (i, i + d/2)), float32."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _window_order(tower: nn.Module, captured: BlockCall, grid: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Qwen2.5-VL's window index of the captured call (merge units, window order -> original unit)."""
    if captured.window_index is not None:
        return captured.window_index
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        torch.tensor(grid, dtype=torch.long),
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    return index.to(captured.hidden.device)


@torch.no_grad()
def signals_from_capture(
    model: PreTrainedModel | nn.Module,
    captured: BlockCall,
    grid: Sequence[tuple[int, int, int]],
    names: Iterable[str],
    embeds: Sequence[torch.Tensor] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, list[torch.Tensor]]:
    """The named signals of every item of the captured tower call, {name: [per-video float32 tensor]}.

    grid: the call's (t, h, w) patches per item, on the host (``_run_tower``'s third output); embeds: its
    per-item merged embeddings (N_i, D), needed for frame_global only.
    """
    names = check_names(names, QWEN_SIGNALS, "the Qwen vision tower")
    if captured.hidden is None:
        raise ValueError("nothing was captured: run the vision tower inside capture_last_vision_block")
    tower = _tower(model)
    block = tower.blocks[-1]
    attn = block.attn
    m2 = int(tower.spatial_merge_size) ** 2
    grid = [(int(t), int(h), int(w)) for t, h, w in grid]
    total = sum(t * h * w for t, h, w in grid)
    if captured.hidden.shape[0] != total:
        raise ValueError(f"the captured call has {captured.hidden.shape[0]} patches, the grid says {total}")
    frames = sum(t for t, _, _ in grid)
    if captured.cu_seqlens.numel() - 1 != frames:  # shapes only: no host sync
        raise ValueError(
            f"the last vision block attended {captured.cu_seqlens.numel() - 1} segments, not the {frames} frames "
            "of the grid: it is not a per-frame full-attention block"
        )
    if FRAME_GLOBAL in names and embeds is None:
        raise ValueError("frame_global needs the tower's merged embeddings (embeds)")
    unwindow = None
    if getattr(tower, "fullatt_block_indexes", None) is not None:
        _check_last_block_full(tower)
        unwindow = _window_order(tower, captured, grid)

    heads, head_dim = attn.num_heads, attn.head_dim
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    start = 0
    # one iteration per item of the call: items differ in frame size, and every item's frames are batched
    for item, (t, h, w) in enumerate(grid):
        n, units = h * w, h * w // m2
        stop = start + t * n
        x = block.norm1(captured.hidden[start:stop])
        qkv = attn.qkv(x).reshape(t * n, 3, heads, head_dim)
        q, k = qkv[:, 0].float(), qkv[:, 1].float()  # (t*n, H, d); the values are not needed
        cos, sin = captured.cos[start:stop].float(), captured.sin[start:stop].float()
        stats: dict[str, torch.Tensor] = {}
        if VIT_KEYS in names:
            stats[VIT_KEYS] = k.mean(dim=1).reshape(t, units, m2, head_dim).mean(dim=2)
        if VIT_RECEIVED_ATTENTION in names or FRAME_SALIENCE in names:
            q_rope = _rotate(q, cos, sin).reshape(t, n, heads, head_dim).transpose(1, 2)  # (t, H, n, d)
            k_rope = _rotate(k, cos, sin).reshape(t, n, heads, head_dim).transpose(1, 2)
            if VIT_RECEIVED_ATTENTION in names:
                per_patch = received_from_qk(q_rope, k_rope, attn.scaling, chunk)  # (t, n)
                stats[VIT_RECEIVED_ATTENTION] = per_patch.reshape(t, units, m2).mean(dim=-1)
            if FRAME_SALIENCE in names:
                q_bar = q_rope.mean(dim=2)  # (t, H, d)
                k_bar = k_rope.reshape(t, heads, units, m2, head_dim).mean(dim=3)  # (t, H, P, d)
                logits = torch.einsum("thd,thpd->thp", q_bar, k_bar) * attn.scaling
                stats[FRAME_SALIENCE] = logits.softmax(dim=-1).mean(dim=1)
        if unwindow is not None:
            # window order -> original order of this item's merge units (the index is global over items)
            offset = start // m2
            local = unwindow[offset : offset + t * units] - offset
            for name, stat in stats.items():
                flat = stat.reshape(t * units, *stat.shape[2:])
                stats[name] = torch.empty_like(flat).index_copy_(0, local, flat).reshape(stat.shape)
        if FRAME_GLOBAL in names:
            stats[FRAME_GLOBAL] = embeds[item].float().reshape(t, units, -1).mean(dim=1)
        for name in names:
            out[name].append(stats[name])
        start = stop
    return out


def per_video(signals: dict[str, list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """{name: [per-video tensor]} -> [{name: tensor}] (one mapping per video, VideoTokens.signals' form)."""
    counts = {len(tensors) for tensors in signals.values()}
    if len(counts) > 1:
        raise ValueError(f"signals cover different numbers of videos: {sorted(counts)}")
    videos = counts.pop() if counts else 0
    return [{name: tensors[i] for name, tensors in signals.items()} for i in range(videos)]


@torch.no_grad()
def vision_signals(
    model: PreTrainedModel,
    pixels: torch.Tensor,
    grid_thw: torch.Tensor,
    names: Iterable[str],
    chunk: int = DEFAULT_CHUNK,
) -> tuple[TowerOutput, dict[str, list[torch.Tensor]]]:
    """``qwen_stages._run_tower(model, pixels, grid_thw)`` with the named signals of its items.

    Returns (_run_tower's (embeds, deepstack, grid), {name: [per-item float32 tensor]}); the tower output is
    exactly what ``_run_tower`` gives without the capture.
    """
    from transformers_patched.qwen_stages import _run_tower  # here: qwen_stages may import this module

    names = check_names(names, QWEN_SIGNALS, "the Qwen vision tower")  # before the tower runs
    with capture_last_vision_block(model) as captured:
        embeds, deepstack, grid = _run_tower(model, pixels, grid_thw)
    return (embeds, deepstack, grid), signals_from_capture(model, captured, grid, names, embeds, chunk)
