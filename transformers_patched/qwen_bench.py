"""Model inputs without a processor or tokenizer, for speed benchmarks of full-size random models.

A full-size model built by :func:`transformers_patched.qwen_arch.build_random_model` has the real
vocabulary ids in its config but no tokenizer on the benchmark machine, so the prompt layout is built
here from the config's special token ids, with the processor's layout: text, then for each video
``<|vision_start|>`` + its placeholders + ``<|vision_end|>`` (Qwen3-VL: a short timestamp text and its own
start / end pair around every temporal patch, as the 5.17 processor emits), then text.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from transformers_patched.qwen_arch import arch_of_config

TEXT_TOKEN = 100  # any ordinary vocabulary id
TIMESTAMP_TOKENS = 6  # "<0.0 seconds>" is about this long in Qwen's tokenizer


def synthetic_video_inputs(
    model: PreTrainedModel,
    *,
    num_frames: int = 32,
    height: int = 448,
    width: int = 448,
    prompt_tokens: int = 32,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Processor-shaped inputs of ``batch_size`` identical prompts, each with one random video.

    height / width must be multiples of patch_size * merge_size; num_frames a multiple of the temporal
    patch size. Returns input_ids, attention_mask, mm_token_type_ids, pixel_values_videos,
    video_grid_thw (and second_per_grid_ts for Qwen2.5-VL: 1 s per temporal patch), on the model's device.
    """
    arch = arch_of_config(model.config)
    vc = model.config.vision_config
    patch, merge, tp = int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
    if height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"height and width must be multiples of {patch * merge}, got {height}x{width}")
    if num_frames < tp or num_frames % tp:
        raise ValueError(f"num_frames must be a positive multiple of {tp}, got {num_frames}")
    t, h, w = num_frames // tp, height // patch, width // patch
    per_frame = h * w // merge**2
    cfg = model.config
    half = torch.full((prompt_tokens // 2,), TEXT_TOKEN)
    start, end = torch.tensor([cfg.vision_start_token_id]), torch.tensor([cfg.vision_end_token_id])
    pads = torch.full((per_frame,), cfg.video_token_id)
    if arch.deepstack:  # Qwen3-VL: timestamps and a start / end pair per temporal patch
        stamp = torch.full((TIMESTAMP_TOKENS,), TEXT_TOKEN)
        frame = torch.cat([stamp, start, pads, end])
        video = torch.cat([start, frame.repeat(t), end])
    else:
        video = torch.cat([start, pads.repeat(t), end])
    row = torch.cat([half, video, half])
    input_ids = row[None].repeat(batch_size, 1)
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    channels = int(getattr(vc, "in_channels", 3)) * tp * patch * patch
    pixels = torch.randn(batch_size * t * h * w, channels, generator=generator)
    inputs: dict[str, Any] = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "mm_token_type_ids": (input_ids == cfg.video_token_id).int().mul(2).to(device),
        "pixel_values_videos": pixels.to(device=device, dtype=model.dtype),
        "video_grid_thw": torch.tensor([[t, h, w]] * batch_size, device=device),
    }
    if arch.timed_rope:
        inputs["second_per_grid_ts"] = torch.ones(batch_size)
    return inputs
