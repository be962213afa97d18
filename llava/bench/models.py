"""Full-size architectures with random weights, wrapped in the same adapters the evaluation uses.

Speed does not depend on weight values, so the benchmark needs no download: each builder makes the
published architecture directly on the device, a char-level tokenizer stands in for the real one
(its special-token ids are written into the config so the model finds its video tokens), and the
adapter (LlavaVideoLLM / QwenVideoLLM) is the one `vidcom2 infer` and lmms-eval run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llava.runtime import FrameSampling, VideoLLM


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: how to build it and the frame sampling its evaluation uses."""

    name: str
    build: Callable[[str, str, str], VideoLLM]  # (device, dtype, attn) -> adapter
    sampling: Callable[[int], FrameSampling]  # frames -> sampling


def _build_llava(reference: str) -> Callable[[str, str, str], VideoLLM]:
    def build(device: str, dtype: str, attn: str) -> VideoLLM:
        from llava.model.families import LlavaVideoLLM
        from llava.model.llava_config import reference_config
        from llava.model.loading import build_random
        from llava.model.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS
        from llava.tiny_tokenizer import build_char_tokenizer

        model = build_random(reference_config(reference), device=device, dtype=dtype, attn_implementation=attn)
        model.vision_head = random_siglip_head(model, device)  # FastVID's signals (LLaVA checkpoints lack the head)
        tokenizer = build_char_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
        return LlavaVideoLLM(model, tokenizer, source=f"random:{reference}")

    return build


def random_siglip_head(model: Any, device: str) -> torch.nn.Module:
    """A random-weight SigLIP post_layernorm + attention-pooling head of the tower's size, in its dtype."""
    from llava.model.siglip_signals import SiglipHead

    with torch.device(device):
        head = SiglipHead(model.spec.vision_config)
    return head.to(model.dtype).eval()


def _build_qwen(
    arch: str, config_source: Any = None, preprocess_device: str | None = None
) -> Callable[[str, str, str], VideoLLM]:
    def build(device: str, dtype: str, attn: str) -> VideoLLM:
        from transformers_patched.qwen_adapter import QwenVideoLLM
        from transformers_patched.qwen_arch import build_random_model, full_size_config
        from transformers_patched.qwen_tiny import full_size_processor

        processor, token_ids = full_size_processor(arch)
        config = full_size_config(arch) if config_source is None else config_source
        for key, value in token_ids.items():  # the stand-in tokenizer's ids for the vision tokens
            setattr(config, key, value)
        model = build_random_model(config, device=device, dtype=dtype, attn_implementation=attn)
        llm = QwenVideoLLM(model, processor, family=arch)
        llm.preprocess_device = preprocess_device
        return llm

    return build


def _uniform(frames: int) -> FrameSampling:
    return FrameSampling(num_frames=frames)


# Qwen: a fixed per-frame pixel budget (448 x 448 -> 256 merged tokens per temporal patch at patch 14,
# 196 at patch 16), so the token count depends on the frame count alone.
def _qwen(frames: int) -> FrameSampling:
    return FrameSampling(num_frames=frames, min_pixels=448 * 448, max_pixels=448 * 448)


BENCH_MODELS: dict[str, BenchModel] = {
    "llava_ov_7b": BenchModel("llava_ov_7b", _build_llava("llava_ov_7b"), _uniform),
    "llava_vid_7b": BenchModel("llava_vid_7b", _build_llava("llava_vid_7b"), _uniform),
    "qwen2_vl_7b": BenchModel("qwen2_vl_7b", _build_qwen("qwen2_vl"), _qwen),
    "qwen2_5_vl_7b": BenchModel("qwen2_5_vl_7b", _build_qwen("qwen2_5_vl"), _qwen),
    "qwen3_vl_8b": BenchModel("qwen3_vl_8b", _build_qwen("qwen3_vl"), _qwen),
    # The same with the HF video processor run on the GPU (QwenVideoLLM.preprocess_device).
    "qwen2_vl_7b_gpu_preprocess": BenchModel(
        "qwen2_vl_7b_gpu_preprocess", _build_qwen("qwen2_vl", None, "cuda"), _qwen
    ),
}


def get_bench_model(name: str) -> BenchModel:
    if name not in BENCH_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; valid: {', '.join(BENCH_MODELS)}")
    return BENCH_MODELS[name]


def text_prefill(llm: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The bare language model of an adapter as f(embeds (B,L,D), mask (B,L), positions (B,L)) -> logits.

    Used for the 'ideal' rows: the same LM on the kept length with no vision or compression step.
    """
    from llava.model.kv_arena import arena_cache

    if hasattr(llm, "processor"):  # Qwen: the text decoder inside the VL model, then the head
        vl = llm.model
        decoder = vl.model.language_model

        def qwen(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            cache = arena_cache(vl.config.get_text_config(), 0)
            hidden = decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions[None].expand(3, -1, -1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            return vl.lm_head(hidden[:, -1:])

        return qwen
    lm = llm.model.language_model

    def llava(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache = arena_cache(lm.config, 0)
        return lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits

    return llava


def hidden_size(llm: Any) -> int:
    if hasattr(llm, "processor"):
        return int(llm.model.config.get_text_config().hidden_size)
    return int(llm.model.language_model.config.hidden_size)
