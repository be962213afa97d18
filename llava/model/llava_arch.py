"""LLaVA-OneVision / LLaVA-Video for inference: SigLIP -> projector -> 2x2 pooling -> (compression)
-> newline layout -> spliced into the Qwen2 prompt.

Built from installed transformers parts (SiglipVisionModel's embeddings and encoder, Qwen2ForCausalLM)
plus our projector, pooling and layout. Every stage is a separate method so a benchmark can time
them: :meth:`preprocess`, :meth:`encode_video`, :meth:`compress_video`, :meth:`build_inputs`, then
:func:`llava.model.generate.prefill` / :func:`~llava.model.generate.decode`.

Shapes: frames (F, H, W, 3) uint8; pixels (F, 3, S, S); encoded (F, h, w, D) after pooling
(OV: 27x27 -> 14x14 bilinear, LLaVA-Video: 27x27 -> 13x13 average); the visual block (N, D).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from llava.model.compression import CompressionSpec
from llava.model.generate import pad_left
from llava.model.layout import (
    PendingLayout,
    VisualLayout,
    block_keep_mask,
    block_sources,
    build_layout,
    full_length,
    pending_layout,
)
from llava.model.llava_config import LlavaSpec
from llava.model.lm_driver import LMInputs
from llava.model.method_api import FRAME_GLOBAL, VideoTokens
from llava.model.siglip_signals import pool_like_features, siglip_signals

POSITION_MODES = ("contiguous", "original")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA projectors: ``linear`` or ``mlp{N}x_gelu`` (Linear, then N-1 times GELU + Linear)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    if kind.startswith("mlp") and kind.endswith("x_gelu") and kind[3:-6].isdigit():
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(int(kind[3:-6]) - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unsupported mm_projector_type {kind!r} (expected linear or mlpNx_gelu)")


def pool_grid(features: torch.Tensor, mode: str, stride: int) -> torch.Tensor:
    """(F, h, w, D) -> (F, h', w', D). bilinear: ceil(h/stride) (OV); average / max: floor (LLaVA-Video)."""
    if stride == 1:
        return features
    x = features.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    if mode == "bilinear":
        x = F.interpolate(x, size=(math.ceil(h / stride), math.ceil(w / stride)), mode="bilinear", align_corners=False)
    elif mode == "average":
        x = F.avg_pool2d(x, stride)
    elif mode == "max":
        x = F.max_pool2d(x, stride)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return x.permute(0, 2, 3, 1)


@dataclass
class VisualBlock:
    """One video (or image) ready to splice: embeds (N, D) and its layout (indices, offsets, counts)."""

    embeds: torch.Tensor
    layout: VisualLayout


class LlavaVideoModel(nn.Module):
    """The whole model. Submodules: vision (SigLIP, only the layers used), projector, image_newline,
    language_model (Qwen2ForCausalLM)."""

    def __init__(self, spec: LlavaSpec, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.spec = spec
        vision_config, text_config = spec.vision_config, spec.text_config
        if attn_implementation == "sdpa_varlen":
            raise ValueError(
                "attn_implementation='sdpa_varlen' packs the Qwen vision towers' per-frame attention; LLaVA's "
                "SigLIP already attends all frames in one batched call: use sdpa"
            )
        vision_config._attn_implementation = "eager" if attn_implementation == "eager" else "sdpa"
        text_config._attn_implementation = attn_implementation
        self.vision = SiglipVisionModel(vision_config)
        self.projector = build_projector(spec.projector_type, vision_config.hidden_size, text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.zeros(text_config.hidden_size))
        self.language_model = Qwen2ForCausalLM(text_config)
        self.vision_head: nn.Module | None = None  # SigLIP's post_layernorm + attention-pooling head (FastVID)

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    # ---------------------------------------------------------------- stages
    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(F, H, W, 3) uint8 RGB -> (F, 3, S, S) normalised pixels on the model's device and dtype.

        Square resize (bicubic, antialiased, rounded to uint8 levels like an image processor),
        rescale to [0, 1], normalise with the checkpoint's mean/std.
        """
        if isinstance(frames, torch.Tensor):
            x = frames
        else:
            array = np.asarray(frames)
            x = torch.from_numpy(array if array.flags.writeable else array.copy())
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be (F, H, W, 3) RGB, got shape {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float()
        size = self.spec.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)
        mean = torch.tensor(self.spec.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.image_std, device=x.device).view(1, 3, 1, 1)
        return ((x / 255.0 - mean) / std).to(self.dtype)

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) -> projected, unpooled patch features (F, h, w, D)."""
        hidden = self.vision.embeddings(pixels)
        hidden = self.vision.encoder(inputs_embeds=hidden).last_hidden_state  # no post_layernorm
        side = self.spec.grid_size
        return self.projector(hidden).reshape(pixels.shape[0], side, side, -1)

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) -> pooled features (F, h', w', D): the tokens compression chooses from."""
        return self._pool(self.encode_frames(pixels))

    def encode_video_with_signals(
        self, pixels: torch.Tensor, names: Iterable[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(F, 3, S, S) -> (pooled features (F, h', w', D), {signal: float32 tensor on the token grid}).

        The signals come from the feature layer's queries and keys (captured while the tower runs on
        SDPA) and, for FastVID's, from SigLIP's attention-pooling head (:attr:`vision_head`); per-patch
        statistics are pooled exactly like the features (llava.model.siglip_signals).
        """
        names = sorted(names)
        if not names:
            return self.encode_video(pixels), {}
        hidden, raw = siglip_signals(self.vision, pixels, names, head=self.vision_head)
        side = self.spec.grid_size
        features = self.projector(hidden).reshape(pixels.shape[0], side, side, -1)
        signals = {
            name: value if name == FRAME_GLOBAL else pool_like_features(value, side, self._pool)
            for name, value in raw.items()
        }
        return self._pool(features), signals

    def _pool(self, grid: torch.Tensor) -> torch.Tensor:
        return pool_grid(grid, self.spec.pool_mode, self.spec.pool_stride)

    def compress_video(
        self,
        features: torch.Tensor,
        compression: CompressionSpec,
        grid_newlines: str = "frame",
        signals: Mapping[str, torch.Tensor] | None = None,
    ) -> VisualBlock:
        """(F, h, w, D) -> the visual block of one video (see :meth:`compress_videos`)."""
        return self.compress_videos([features], compression, grid_newlines, [signals or {}])[0]

    def compress_videos(
        self,
        features: Sequence[torch.Tensor],
        compression: CompressionSpec,
        grid_newlines: str = "frame",
        signals: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> list[VisualBlock]:
        """Each video's (F, h, w, D) -> its visual block: the method's output tokens with newlines.

        ``signals``: per video, the signals the method declared (:meth:`encode_video_with_signals`). A
        merging method's new values replace their source tokens; the layout (order, newlines, positions)
        follows the sources, exactly as for a select-only method.

        A request's videos are selected together (same-shape videos share one selection launch, each on
        its own budget) and their layouts share ONE host synchronisation, which reads every kept count.
        Everything, the row gathers included, is queued before it, and only views are taken after it:
        in the pipeline the GPU is still busy with the vision tower while the host queues this work,
        and nothing waits on the host after the sync (see llava.model.layout).
        """
        position = self.spec.newline_position
        if not compression.selects_before_llm:
            return [self._uncompressed_block(f) for f in features]
        signals = list(signals) if signals is not None else [{} for _ in features]
        if len(signals) != len(features):
            raise ValueError(f"{len(features)} videos but signals for {len(signals)}")
        family = self.spec.family
        pairs = zip(features, signals, strict=True)
        tokens = [VideoTokens(f.flatten(1, 2), tuple(f.shape[:3]), sig, family) for f, sig in pairs]
        selected = compression.select_videos(tokens)
        parts: list[PendingLayout | VisualBlock] = []
        for feats, choice in zip(features, selected, strict=True):
            frames, h, w, _ = feats.shape
            block_mask = block_keep_mask(choice.mask, h, w, position, grid_newlines)
            if block_mask is None:  # a layout that leaves uncompressed order (all_rows): from the indices
                table = self._rows_with_newline(feats if choice.table is None else choice.table)
                kept = choice.mask.reshape(-1).nonzero().squeeze(1)
                layout = build_layout(kept, frames, h, w, position, grid_newlines)
                parts.append(VisualBlock(table.index_select(0, layout.source), layout))
            elif choice.values is None:
                parts.append(pending_layout(block_mask, frames, h, w, position, self._rows_with_newline(feats)))
            else:  # merged: rows [values; newline], no copy of the whole video (the rank maps sources to rows)
                table = self._rows_with_newline(choice.values)
                parts.append(pending_layout(block_mask, frames, h, w, position, table, choice.rank))
        pending = [p for p in parts if isinstance(p, PendingLayout)]
        counts = iter(torch.stack([p.count for p in pending]).tolist() if pending else [])  # the one host sync
        blocks = []
        for part in parts:
            if isinstance(part, PendingLayout):
                layout, embeds = part.finish(next(counts))
                part = VisualBlock(embeds, layout)
            blocks.append(part)
        compression.check_kept([block.layout.length for block in blocks])
        return blocks

    def _rows_with_newline(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) tokens -> rows ``[tokens; newline]``: the table a layout's ``source`` indexes."""
        newline = self.image_newline.to(features.dtype)[None]
        return torch.cat([features.reshape(-1, features.shape[-1]), newline])

    def _uncompressed_block(self, features: torch.Tensor) -> VisualBlock:
        frames, h, w, _ = features.shape
        position = self.spec.newline_position
        table = self._rows_with_newline(features)
        size = full_length(frames, h, w, position)
        sources = block_sources(frames, h, w, position, features.device)
        total = frames * h * w
        layout = VisualLayout(sources, torch.arange(size, device=features.device), size, total, _kept=total)
        return VisualBlock(table.index_select(0, layout.source), layout)

    def image_block(self, pixels: torch.Tensor) -> VisualBlock:
        """One image (1, 3, S, S): all h*w unpooled tokens then one newline, never compressed."""
        features = self.encode_frames(pixels)
        _, h, w, _ = features.shape
        kept = torch.arange(h * w, device=features.device)
        layout = build_layout(kept, 1, h, w, "one_token")
        table = self._rows_with_newline(features)
        return VisualBlock(table.index_select(0, layout.source), layout)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.language_model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def build_inputs(
        self,
        prompts: list[tuple[list[int], VisualBlock, list[int]]],
        position_mode: str = "contiguous",
    ) -> LMInputs:
        """[(ids before, visual block, ids after)] -> left-padded LM inputs (video tokens flagged for
        in-LLM methods; newlines are not video tokens).

        contiguous: positions 0..L-1 over the shortened sequence (the paper's code).
        original: each visual entry keeps its uncompressed position and the text after the video
        continues from the uncompressed length, as if nothing had been dropped.
        """
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {', '.join(POSITION_MODES)}, got {position_mode!r}")
        sequences, positions, next_positions, visual, counts = [], [], [], [], []
        for before, block, after in prompts:
            n0, nv, n1 = len(before), block.layout.length, len(after)
            text = self.embed_ids([*before, *after])  # one copy and one lookup for both sides
            sequences.append(torch.cat([text[:n0], block.embeds.to(self.dtype), text[n0:]]))
            flags = torch.zeros(n0 + nv + n1, dtype=torch.bool, device=self.device)
            flags[n0 : n0 + nv] = block.layout.source < block.layout.total_tokens
            visual.append(flags)
            counts.append(block.layout.kept_tokens)
            if position_mode == "contiguous":
                pos = torch.arange(n0 + nv + n1, device=self.device)
                next_positions.append(n0 + nv + n1)
            else:
                offsets = n0 + block.layout.original_offsets.to(self.device)
                tail = n0 + block.layout.full_length + torch.arange(n1, device=self.device)
                pos = torch.cat([torch.arange(n0, device=self.device), offsets, tail])
                # the last original offset is below full_length, so text after the video (or, with none,
                # the first new token) continues from the uncompressed length; known on the host: no sync
                next_positions.append(n0 + block.layout.full_length + n1)
            positions.append(pos)
        return pad_left(sequences, positions, next_positions, visual, counts)
