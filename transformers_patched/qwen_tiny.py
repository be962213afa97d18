"""Tiny random-init checkpoints of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``vidcom2 make-tiny --arch ...``).

Same architectures as the real models, shrunk (hidden 64, 16 LM layers, 2 ViT layers), with a
char-level tokenizer that holds the Qwen special tokens and a Qwen-style chat template, and the
processor files, so ``from_pretrained`` / ``AutoProcessor`` load the directory offline.
Pixel budgets are small (frames of at most 112x112 / 128x128 pixels) so CPU tests stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig

from llava.tiny_tokenizer import build_char_tokenizer
from transformers_patched.qwen_arch import get_arch

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's chat layout: each image / video item becomes <|vision_start|><|X_pad|><|vision_end|>; the
# processor then expands the pad token to the item's real token count (and, on Qwen3-VL, timestamps).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=16,  # deep enough for the in-LLM methods' default layers (FastV 2, PDrop / SparseVLM 2-6-15)
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)


def _tiny_config(arch: str, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """config.json dict of the tiny model: head_dim 16, so mrope_section sums to 8."""
    text = {**TINY_TEXT, "vocab_size": vocab_size, "rope_theta": 10000.0}
    text.update(bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    if arch == "qwen3_vl":
        text.update(
            head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
    elif arch == "qwen2_5_vl":
        text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
    else:
        text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    return {
        "model_type": arch,
        "text_config": {"model_type": f"{arch}_text", **text},
        "vision_config": vision,
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def char_tokenizer() -> Any:
    """The char-level stand-in tokenizer with Qwen's special tokens and chat template."""
    return build_char_tokenizer(
        QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def vision_token_ids(tokenizer: Any) -> dict[str, int]:
    """Config attribute -> the tokenizer's id, for the four vision tokens a Qwen config names."""
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {key: int(tokenizer.convert_tokens_to_ids(token)) for key, token in names.items()}


def full_size_processor(arch: str) -> tuple[Any, dict[str, int]]:
    """(processor, vision token ids) for benchmarking a full-size random model without downloads.

    Image / video processors are the real classes with their default (full-size) pixel settings; the
    tokenizer is the char-level stand-in, so set the returned ids on the model config
    (``setattr(config, key, value)``) before building the model.
    """
    import transformers as tf

    get_arch(arch)
    tokenizer = char_tokenizer()
    if arch == "qwen3_vl":
        image = tf.Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video = tf.Qwen3VLVideoProcessor(cap_pixels_per_frame=False)
        processor = tf.Qwen3VLProcessor(image, tokenizer, video, chat_template=CHAT_TEMPLATE)
    else:
        cls = tf.Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else tf.Qwen2VLProcessor
        processor = cls(
            tf.Qwen2VLImageProcessor(),
            tokenizer,
            tf.Qwen2VLVideoProcessor(cap_pixels_per_frame=False),
            chat_template=CHAT_TEMPLATE,
        )
    return processor, vision_token_ids(tokenizer)


def _processor(arch: str, tokenizer: Any) -> Any:
    """The real processor classes with small pixel budgets (per frame: 4..16 merged tokens)."""
    import transformers as tf

    if arch == "qwen3_vl":
        factor = 32  # patch 16 x merge 2
        image = tf.Qwen2VLImageProcessor(
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        video = tf.Qwen3VLVideoProcessor(
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            cap_pixels_per_frame=False,
            size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor * 16},
        )
        return tf.Qwen3VLProcessor(image, tokenizer, video, chat_template=CHAT_TEMPLATE)
    factor = 28
    image = tf.Qwen2VLImageProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor},
    )
    video = tf.Qwen2VLVideoProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        cap_pixels_per_frame=False,
        size={"shortest_edge": factor * factor, "longest_edge": 16 * factor * factor},
    )
    cls = tf.Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else tf.Qwen2VLProcessor
    return cls(image, tokenizer, video, chat_template=CHAT_TEMPLATE)


def build_tiny_qwen(arch: str, out_dir: str | Path, *, seed: int = 0, fmt: str | None = None) -> Path:
    """Write a random-init tiny ``arch`` checkpoint (weights, config, tokenizer, processor) to ``out_dir``.

    ``fmt`` exists for the shared make-tiny signature; Qwen checkpoints have one format (``hf`` or None).
    """
    spec = get_arch(arch)
    if fmt not in (None, "hf", "lmms-lab"):
        raise ValueError(f"fmt={fmt!r} does not apply to {arch}; Qwen checkpoints are written in HF format")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    ids.update(eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
    config = AutoConfig.for_model(**_tiny_config(arch, ids, len(tokenizer)))
    torch.manual_seed(seed)
    model = spec.transformers_class()(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["pad"], do_sample=False
    )
    model.save_pretrained(out)
    _processor(arch, tokenizer).save_pretrained(out)
    return out
