"""The stages of one Qwen-VL request, each callable on its own (the GPU benchmark times them separately).

    inputs (processor output) -> encode_vision -> select_video_tokens -> build_prefill -> lm_inputs
                              -> llava.model.lm_driver.generate(qwen_stack(model), ...)

We drive the stock transformers modules ourselves (the vision tower ``model.model.visual``, called as
``get_video_features`` / ``get_image_features`` call it but without their host sync, see ``_run_tower``;
positions through ``get_rope_index``; then the text decoder's own layers, run by the shared layer-wise
driver) instead of patching their forward: the LM simply receives the shortened sequence with gathered
M-RoPE positions. No transformers code is copied or modified.

``inputs`` is a mapping with the processor's keys: input_ids, attention_mask, mm_token_type_ids and,
when present, pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw, second_per_grid_ts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache, PreTrainedModel

from llava.model.compression import CompressionSpec
from llava.model.lm_driver import DecoderStack, LMInputs
from llava.model.method_api import VideoTokens
from llava.placement import is_split
from transformers_patched.qwen_arch import QwenArch, arch_of_config
from transformers_patched.qwen_sequence import (
    gather_packed,
    joint_visual_features,
    pack_left,
    packed_attention_mask,
    text_positions,
    token_keep_mask,
    video_keep_flags,
)
from transformers_patched.qwen_vit_signals import per_video, vision_signals


@dataclass
class VisionOutputs:
    """Vision tower outputs (after the 2x2 merger) of a batch, in processor order.

    video_embeds / image_embeds: one (N, D) tensor per video / image.
    video_deepstack / image_deepstack (Qwen3-VL): one (sum N, D) tensor per DeepStack layer.
    video_grid: (T, H, W) patches per video, read on the host before the tower ran.
    video_signals: per video, the vision-tower signals a compression method asked for (see
        transformers_patched.qwen_vit_signals), or None.
    """

    video_embeds: list[torch.Tensor] = field(default_factory=list)
    image_embeds: list[torch.Tensor] = field(default_factory=list)
    video_deepstack: list[torch.Tensor] | None = None
    image_deepstack: list[torch.Tensor] | None = None
    video_grid: list[tuple[int, int, int]] = field(default_factory=list)  # host copy of video_grid_thw
    video_signals: list[dict[str, torch.Tensor]] | None = None  # per video, the signals the method declared


@dataclass
class PrefillInputs:
    """The shortened LM input of a batch (left padded to the longest row).

    inputs_embeds (B, L', D); position_ids (4, B, L'): a plain running text row, then the gathered
    temporal / height / width M-RoPE rows; attention_mask (B, L') int64; visual_pos_masks (B, L') and
    deepstack_embeds (one (N_visual_kept, D) per layer) for Qwen3-VL.
    tokens_before / tokens_after: (B,) video tokens per row before and after compression.
    video_mask (B, L') bool: the kept video tokens (what in-LLM methods may drop).
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens_before: torch.Tensor
    tokens_after: torch.Tensor
    video_mask: torch.Tensor | None = None
    visual_pos_masks: torch.Tensor | None = None
    deepstack_embeds: list[torch.Tensor] | None = None


def _arch(model: PreTrainedModel) -> QwenArch:
    return arch_of_config(model.config)


def merge_size(model: PreTrainedModel) -> int:
    return int(model.config.vision_config.spatial_merge_size)


def video_token_counts(
    model: PreTrainedModel, video_grid_thw: torch.Tensor | Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """(F, P) per video: F temporal patches ("frames"), P = h * w / merge^2 tokens per frame."""
    m2 = merge_size(model) ** 2
    rows = video_grid_thw.tolist() if torch.is_tensor(video_grid_thw) else video_grid_thw
    return [(int(t), int(h) * int(w) // m2) for t, h, w in rows]


def _run_tower(
    model: PreTrainedModel, pixels: torch.Tensor, grid_thw: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[tuple[int, int, int]]]:
    """The vision tower and merger on one modality: per-item (N, D) outputs, DeepStack features, host grid.

    What ``get_video_features`` / ``get_image_features`` do, except that the split sizes come from a host
    copy of the grid read before the tower is queued. Theirs read the device grid after it, a host sync
    that waits for the whole tower, so the compression step's kernels were launched onto an idle GPU;
    queued behind the tower instead, they cost their GPU time only.
    """
    grid = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]  # waits for the inputs only
    m2 = merge_size(model) ** 2
    tower = model.model.visual
    out = tower(pixels.type(tower.dtype), grid_thw=grid_thw, return_dict=True, **_window_inputs(model, grid, pixels))
    embeds = list(torch.split(out.pooler_output, [t * h * w // m2 for t, h, w in grid]))
    return embeds, getattr(out, "deepstack_features", None), grid


def _window_inputs(model: PreTrainedModel, grid: list[tuple[int, int, int]], pixels: torch.Tensor) -> dict[str, Any]:
    """A windowed tower's window index and boundaries, made from the host grid and put on the device before
    the tower is queued. Left to the tower, the index is a host tensor, and the final un-permutation
    of the tower's output copies it to the device: a copy from pageable host memory, which waits for the
    whole tower first. transformers' towers take both precomputed, as keyword arguments."""
    if not _arch(model).windowed_vision:
        return {}
    from transformers.vision_utils import get_vision_window_index

    tower = model.model.visual
    index, bounds = get_vision_window_index(
        torch.tensor(grid, dtype=torch.long),
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    return {"window_index": index.to(pixels.device), "cu_window_seqlens": bounds.to(pixels.device)}


@torch.inference_mode()
def encode_vision(
    model: PreTrainedModel, inputs: Mapping[str, Any], signals: frozenset[str] = frozenset()
) -> VisionOutputs:
    """Run the vision tower (and merger) on the batch's videos and images, without waiting for it.

    ``signals``: the vision-tower signals a compression method needs for each video (method_api names),
    computed from the last block's queries and keys while the tower runs on SDPA."""
    out = VisionOutputs()
    # images first: the tower starts with host reads of its grid, which would wait for a queued video tower
    if inputs.get("pixel_values") is not None:
        out.image_embeds, out.image_deepstack, _ = _run_tower(model, inputs["pixel_values"], inputs["image_grid_thw"])
    if inputs.get("pixel_values_videos") is not None:
        pixels, grid_thw = inputs["pixel_values_videos"], inputs["video_grid_thw"]
        if signals:  # the last block's queries and keys, captured while the tower runs as usual
            (out.video_embeds, out.video_deepstack, out.video_grid), stats = vision_signals(
                model, pixels, grid_thw, sorted(signals)
            )
            out.video_signals = per_video(stats)
        else:
            out.video_embeds, out.video_deepstack, out.video_grid = _run_tower(model, pixels, grid_thw)
    return out


@torch.inference_mode()
def select_video_tokens(
    model: PreTrainedModel, inputs: Mapping[str, Any], vision: VisionOutputs, compression: CompressionSpec
) -> list[torch.Tensor]:
    """Each video's keep flags (F*P,) bool over its sources, every video on its own budget.

    Same-shape videos of a select-only method are selected together (one launch sequence, one graph
    replay on CUDA); one host synchronisation then checks that every video kept a token (VidCom2 keeps
    none of non-finite features). A merging method's new values are written into
    ``vision.video_embeds`` at their sources, so the splice, the positions (the sources' (t, h, w)) and
    the DeepStack rows (the sources' rows) follow without further work.
    """
    if not vision.video_embeds:
        return []
    counts = video_token_counts(model, vision.video_grid or inputs["video_grid_thw"])
    grids = vision.video_grid or [tuple(int(v) for v in row) for row in inputs["video_grid_thw"].tolist()]
    m = merge_size(model)
    signals = vision.video_signals or [{} for _ in vision.video_embeds]
    family = _arch(model).name
    videos = []
    for embeds, (frames, per_frame), (_, gh, gw), sig in zip(vision.video_embeds, counts, grids, signals, strict=True):
        if embeds.shape[0] != frames * per_frame:
            raise ValueError(f"video features have {embeds.shape[0]} tokens, video_grid_thw says {frames}x{per_frame}")
        features = embeds.reshape(frames, per_frame, embeds.shape[-1])
        videos.append(VideoTokens(features, (frames, gh // m, gw // m), sig, family))
    if not compression.selects_before_llm:
        return [torch.ones(v.features.shape[:2].numel(), dtype=torch.bool, device=v.features.device) for v in videos]
    selected = compression.select_videos(videos)
    masks = [choice.mask.reshape(-1) for choice in selected]
    tables = [choice.table for choice in selected]  # built before the sync, while the GPU is still busy
    compression.check_kept(torch.stack([mask.sum() for mask in masks]).tolist())  # the one host sync
    for i, table in enumerate(tables):
        if table is not None:
            vision.video_embeds[i] = table
    return masks


def _rope_kwargs(arch: QwenArch, inputs: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {
        "mm_token_type_ids": inputs["mm_token_type_ids"],
        "image_grid_thw": inputs.get("image_grid_thw"),
        "video_grid_thw": inputs.get("video_grid_thw"),
        "attention_mask": inputs["attention_mask"],
    }
    if arch.timed_rope:
        seconds = inputs.get("second_per_grid_ts")
        if seconds is not None and not torch.is_tensor(seconds):
            seconds = torch.tensor(seconds, dtype=torch.float32)
        kwargs["second_per_grid_ts"] = seconds
    return kwargs


@torch.inference_mode()
def prompt_positions(model: PreTrainedModel, inputs: Mapping[str, Any]) -> torch.Tensor:
    """(4, B, L) positions of the uncompressed prompt: a running text row, then the M-RoPE rows.

    Depends on the token ids and grids only, so adapters compute it on the host from the processor's
    CPU output, before any GPU work: transformers' get_rope_index is host-heavy (loops and reads per
    visual item) and would otherwise run after the compression step's sync, with the GPU idle."""
    attention_mask = inputs["attention_mask"]
    text = text_positions(attention_mask)
    if inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None:
        return text[None].expand(4, -1, -1)  # text only: plain positions on every row
    if inputs.get("mm_token_type_ids") is None:
        raise ValueError("inputs lack mm_token_type_ids (the processor returns them): M-RoPE needs them")
    host = {k: v.cpu() if torch.is_tensor(v) else v for k, v in _rope_kwargs(_arch(model), inputs).items()}
    mrope, _ = model.model.get_rope_index(inputs["input_ids"].cpu(), **host)
    return torch.cat([text[None], mrope.to(text.device)], dim=0)


def placeholder_counts(model: PreTrainedModel, inputs: Mapping[str, Any]) -> dict[str, int]:
    """Image and video placeholder tokens in the prompt batch. Adapters count them on the host from the
    processor's CPU ids, so :func:`build_prefill` checks them against the features without a device read."""
    ids, config = inputs["input_ids"], model.config
    return {"image": int((ids == config.image_token_id).sum()), "video": int((ids == config.video_token_id).sum())}


@torch.inference_mode()
def build_prefill(
    model: PreTrainedModel,
    inputs: Mapping[str, Any],
    vision: VisionOutputs,
    keep_flags: list[torch.Tensor],
    positions: torch.Tensor | None = None,
    placeholders: Mapping[str, int] | None = None,
) -> PrefillInputs:
    """Assemble the full sequence, take its (4, B, L) positions (``positions``, from
    :func:`prompt_positions` on the host, or computed here), then keep only the kept tokens.
    ``placeholders``: :func:`placeholder_counts` from the host (else counted here, a device read)."""
    if inputs.get("mm_token_type_ids") is None:
        raise ValueError("inputs lack mm_token_type_ids (the processor returns them): M-RoPE needs them")
    arch = _arch(model)
    config = model.config
    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    device = input_ids.device
    embeds = model.get_input_embeddings()(input_ids)
    image_pos = input_ids == config.image_token_id
    video_pos = input_ids == config.video_token_id
    counts = placeholders if placeholders is not None else placeholder_counts(model, inputs)
    for name, pos, feats in (("image", image_pos, vision.image_embeds), ("video", video_pos, vision.video_embeds)):
        n_features = sum(int(f.shape[0]) for f in feats)
        if counts[name] != n_features:
            raise ValueError(
                f"the prompt holds {counts[name]} {name} placeholder tokens but the {name}s give {n_features}"
            )
        if feats:  # the features in placeholder order, no host sync
            embeds = embeds.masked_scatter(pos[..., None], torch.cat(feats).to(embeds.dtype))

    has_visual = bool(vision.video_embeds or vision.image_embeds)
    if positions is None:
        positions = prompt_positions(model, inputs)
    positions = positions.to(device)

    sizes = [int(f.shape[0]) for f in vision.video_embeds]
    flags = video_keep_flags(keep_flags, sizes, device)
    keep = token_keep_mask(attention_mask, video_pos, flags, counts["video"])
    index = pack_left(keep)
    packed_mask = packed_attention_mask(index, device)
    packed_positions = gather_packed(positions.permute(1, 2, 0), index).permute(2, 0, 1)
    packed_positions[0] = text_positions(packed_mask)

    visual_pos_masks = deepstack = None
    if arch.deepstack and has_visual:
        visual = image_pos | video_pos
        rows = keep[visual].nonzero().squeeze(1)  # the kept visual tokens in sequence order, for every layer
        image_ds = vision.image_deepstack or [None] * len(vision.video_deepstack or [])
        video_ds = vision.video_deepstack or [None] * len(image_ds)
        # one modality alone is every visual token already in sequence order (the placeholder counts were
        # checked above), so only a prompt with both interleaves them
        deepstack = [
            (vid if img is None else img if vid is None else joint_visual_features(image_pos, video_pos, img, vid))
            .index_select(0, rows)
            for img, vid in zip(image_ds, video_ds, strict=True)
        ]
        visual_pos_masks = gather_packed(visual, index, False)
    return PrefillInputs(
        inputs_embeds=gather_packed(embeds, index),
        position_ids=packed_positions,
        attention_mask=packed_mask,
        tokens_before=video_pos.sum(dim=1),
        tokens_after=(video_pos & keep).sum(dim=1),
        video_mask=gather_packed(video_pos, index, False),
        visual_pos_masks=visual_pos_masks,
        deepstack_embeds=deepstack,
    )


def static_step(
    model: PreTrainedModel, cache: Cache, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One decode token per row on a static cache: the stock text-model forward the static / compiled decode
    modes run (module level, so a compiled step is keyed by it). positions (4, B, 1); returns (B, V) float32."""
    out = model.model.language_model(
        input_ids=None,
        inputs_embeds=model.get_input_embeddings()(tokens[:, None]),
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return model.lm_head(out.last_hidden_state[:, -1]).float()


def qwen_stack(model: PreTrainedModel) -> DecoderStack:
    """The VL model's text decoder as a :class:`~llava.model.lm_driver.DecoderStack` (M-RoPE: 3 rows)."""
    text = model.model.language_model
    return DecoderStack(
        embed=text.embed_tokens,
        layers=text.layers,
        norm=text.norm,
        head=model.lm_head,
        rotary=text.rotary_emb,
        config=model.config.text_config,
        rope_rows=3,
        static_model=model,
        static_step=static_step,
        # the static forward takes a text row first (its mask code reads it), then the 3 M-RoPE rows
        static_positions=lambda nxt: torch.cat([nxt[:1], nxt])[..., None],
        split=is_split(model),
    )


def lm_inputs(prepared: PrefillInputs) -> LMInputs:
    """The packed prompt as the driver's inputs (one host read: the rows' lengths and video counts)."""
    valid = prepared.attention_mask.bool()
    counts = torch.stack([valid.sum(1), prepared.tokens_after.to(valid.device)]).tolist()
    positions = prepared.position_ids[1:]
    index = None
    if prepared.deepstack_embeds is not None:
        index = prepared.visual_pos_masks.reshape(-1).nonzero().squeeze(1)
    return LMInputs(
        embeds=prepared.inputs_embeds,
        valid=valid,
        positions=positions,
        next_position=positions[:, :, -1] + 1,
        visual=prepared.video_mask,
        lengths=tuple(counts[0]),
        visual_counts=tuple(counts[1]),
        deepstack=prepared.deepstack_embeds,
        deepstack_index=index,
    )


def eos_token_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
