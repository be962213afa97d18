"""Packed attention for the Qwen vision towers: one kernel call per layer, not one per frame or window.

With ``sdpa`` or ``eager``, transformers runs each Qwen vision layer's attention once per segment of
``cu_seqlens`` (a frame; for Qwen2.5-VL's windowed layers a window, 16 per frame at 448x448), in a
Python loop after a host sync (``lengths.tolist()``). For a 32-frame video that is hundreds of small
kernel launches per layer. Only implementations whose name contains "flash" get the packed sequence
and ``cu_seqlens`` instead. PyTorch ships such a kernel (``torch.nn.attention.varlen.varlen_attn``,
torch >= 2.10: FlashAttention-2 inside libtorch, CUDA, fp16 / bf16), so registering it with transformers'
``AttentionInterface`` under :data:`VISION_ATTENTION` gives the towers the packed path without the
flash-attn package. The language model keeps ``sdpa`` (its masks are unchanged).

The attention computed is the same (block-diagonal over the segments, not causal); only the kernel
differs, so values may differ from the per-segment path in the last bits. Where the kernel cannot
run (CPU, float32) the segments are attended one by one with SDPA, as transformers' own sdpa path does.

Public switch: ``attn_implementation="sdpa_varlen"`` wherever a Qwen model is loaded or built.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

VISION_ATTENTION = "torch_varlen_flash_vision"
SDPA_VARLEN = "sdpa_varlen"  # the user-facing attn_implementation: LM sdpa + packed vision attention
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def packed_vision_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(1, H, N, d) query/key/value packed over segments -> ((1, N, H, d), None), transformers' convention."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None or is_causal or dropout:
        raise ValueError(
            f"{VISION_ATTENTION} serves the Qwen vision towers only (one packed, non-causal sequence with "
            "cu_seqlens, no mask, no dropout); use sdpa for other modules"
        )
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    if query.is_cuda and query.dtype in _KERNEL_DTYPES:
        from torch.nn.attention.varlen import varlen_attn

        if max_length_q is None:  # transformers passes them (computed once per forward); else one sync here
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max().item())
        if max_length_k is None:
            max_length_k = int((cu_k[1:] - cu_k[:-1]).max().item())
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, d)
        options = {}
        if scaling is not None and abs(scaling * query.shape[-1] ** 0.5 - 1.0) > 1e-9:
            if not _takes_scale(varlen_attn):  # early versions only scale by the default 1/sqrt(d)
                raise ValueError(f"this torch's varlen_attn has no scale argument; the tower asks for {scaling}")
            options["scale"] = scaling
        out = varlen_attn(
            q,
            k,
            v,
            cu_seq_lens_q.to(torch.int32),
            cu_k.to(torch.int32),
            int(max_length_q),
            int(max_length_k),
            **options,
        )
        return out.unsqueeze(0), None
    q_bounds, k_bounds = cu_seq_lens_q.tolist(), cu_k.tolist()
    outputs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, c:d], value[:, :, c:d], scale=scaling)
        for a, b, c, d in zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2), None


@lru_cache(maxsize=1)
def _takes_scale(fn: Any) -> bool:
    return "scale" in inspect.signature(fn).parameters


def register_vision_attention() -> str:
    """Make :data:`VISION_ATTENTION` known to transformers (idempotent); returns its name."""
    AttentionInterface.register(VISION_ATTENTION, packed_vision_attention)
    return VISION_ATTENTION


def use_packed_vision_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch the vision tower of a loaded Qwen model to packed attention; the LM is left as it is."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        raise ValueError(
            f"attn_implementation={SDPA_VARLEN!r} needs torch >= 2.10 (torch.nn.attention.varlen), "
            f"found torch {torch.__version__}"
        )
    register_vision_attention()
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        raise ValueError(f"{type(model).__name__} has no vision_config: packed vision attention is for Qwen VL models")
    model.set_attn_implementation({"vision_config": VISION_ATTENTION})
    if model.config.vision_config._attn_implementation != VISION_ATTENTION:
        raise RuntimeError("transformers did not switch the vision tower to packed attention")
    return model
