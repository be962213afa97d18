"""Packed vision attention (attn_implementation="sdpa_varlen"): same outputs, one call per layer."""

from __future__ import annotations

import pytest
import torch

import transformers_patched.vision_attention as va
from llava.model.llava_config import reference_config
from llava.model.loading import build_random
from transformers_patched.qwen_arch import build_random_model, load_model
from transformers_patched.qwen_tiny import build_tiny_qwen

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    return build_tiny_qwen(request.param, tmp_path_factory.mktemp(request.param), seed=0)


def _vision_inputs(model, frames: int = 4, grid: tuple[int, int] = (4, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config.vision_config
    thw = torch.tensor([[frames // cfg.temporal_patch_size, *grid], [1, *grid]])  # a video and an image
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    generator = torch.Generator().manual_seed(0)
    return torch.randn(int(thw.prod(-1).sum()), width, generator=generator), thw


def _tower_output(model, pixels, thw):
    out = model.model.visual(pixels.to(model.device, model.dtype), grid_thw=thw.to(model.device))
    features = out.pooler_output
    extra = getattr(out, "deepstack_features", None)
    return features, extra


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    inner = va.packed_vision_attention

    def counted(module, query, *args, **kwargs):
        calls.append(int(kwargs["cu_seq_lens_q"].numel()) - 1)
        return inner(module, query, *args, **kwargs)

    monkeypatch.setitem(va.AttentionInterface._global_mapping, va.VISION_ATTENTION, counted)
    return calls


@torch.inference_mode()
def test_packed_tower_equals_stock_and_attends_once_per_layer(tiny, monkeypatch):
    stock = build_random_model(tiny, device="cpu", dtype="float32", seed=1)
    packed = build_random_model(tiny, device="cpu", dtype="float32", seed=1, attn_implementation="sdpa_varlen")
    assert packed.config.text_config._attn_implementation == "sdpa"  # the LM is untouched
    assert packed.config.vision_config._attn_implementation == va.VISION_ATTENTION
    assert stock.config.vision_config._attn_implementation == "sdpa"
    pixels, thw = _vision_inputs(stock)
    calls = _count_calls(monkeypatch)
    want, want_extra = _tower_output(stock, pixels, thw)
    got, got_extra = _tower_output(packed, pixels, thw)
    depth = packed.config.vision_config.depth
    assert len(calls) == depth and all(n >= 3 for n in calls)  # one call per layer, >= 3 segments each
    assert torch.equal(got, want)  # on the CPU the segments run through the same SDPA calls
    if want_extra is not None:
        assert all(torch.equal(a, b) for a, b in zip(got_extra, want_extra, strict=True))


def test_load_model_takes_sdpa_varlen(tiny):
    model = load_model(tiny, attn_implementation="sdpa_varlen")
    assert model.config.vision_config._attn_implementation == va.VISION_ATTENTION
    assert model.config.text_config._attn_implementation == "sdpa"


def test_packed_attention_refuses_what_it_does_not_serve():
    q = torch.randn(1, 2, 6, 4)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="vision towers only"):
        va.packed_vision_attention(None, q, q, q, torch.ones(1, 1, 6, 6, dtype=torch.bool), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="vision towers only"):
        va.packed_vision_attention(None, q, q, q, None)  # no cu_seqlens
    out, _ = va.packed_vision_attention(None, q, q, q, None, cu_seq_lens_q=cu)
    segments = [
        torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], q[:, :, a:b], q[:, :, a:b])
        for a, b in ((0, 3), (3, 6))
    ]
    assert torch.equal(out, torch.cat(segments, 2).transpose(1, 2))


def test_llava_refuses_sdpa_varlen():
    with pytest.raises(ValueError, match="sdpa_varlen.*use sdpa"):
        build_random(reference_config("llava_ov_7b"), device="meta", dtype="float32", attn_implementation="sdpa_varlen")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's varlen flash kernel needs CUDA")
@torch.inference_mode()
def test_cuda_packed_kernel_matches_stock_in_bfloat16(tiny, monkeypatch):
    from torch.nn.attention import varlen

    stock = build_random_model(tiny, device="cuda", dtype="bfloat16", seed=1)
    packed = build_random_model(tiny, device="cuda", dtype="bfloat16", seed=1, attn_implementation="sdpa_varlen")
    kernel_calls = []
    inner = varlen.varlen_attn
    monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: kernel_calls.append(1) or inner(*a, **k))
    pixels, thw = _vision_inputs(stock)
    want, _ = _tower_output(stock, pixels, thw)
    got, _ = _tower_output(packed, pixels, thw)
    assert len(kernel_calls) == packed.config.vision_config.depth
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
