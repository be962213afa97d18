"""Vision-tower signals (llava.model.siglip_signals, transformers_patched.qwen_vit_signals) against full
eager attention maps of the same layer, on tiny random towers.

References: the tower rerun with eager attention, the feature layer's weights recorded from transformers'
own eager attention function, then averaged / pooled by plain loops over frames and merge units written
from the signal definitions (llava.model.method_api).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from llava.model import siglip_signals as ss
from llava.model.llava_arch import pool_grid
from llava.model.llava_config import parse_spec
from llava.model.loading import build_random
from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, VIT_KEYS, VIT_RECEIVED_ATTENTION
from llava.model.tiny import TINY_VISION, tiny_lmms_lab_config, write_tiny_llava
from transformers_patched import qwen_stages
from transformers_patched import qwen_vit_signals as qs
from transformers_patched.qwen_arch import build_random_model
from transformers_patched.qwen_tiny import build_tiny_qwen

ALL = (VIT_RECEIVED_ATTENTION, VIT_KEYS, FRAME_SALIENCE, FRAME_GLOBAL)
QWEN_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_GRIDS = [[2, 4, 6], [3, 8, 4]]  # two videos of different sizes, several temporal patches each


# ------------------------------------------------------------------------------------ SigLIP


@pytest.fixture(scope="module")
def llava():
    return build_random(parse_spec(tiny_lmms_lab_config("llava_ov")), seed=0)


def _pixels(frames: int = 3, seed: int = 0) -> torch.Tensor:
    size = TINY_VISION["image_size"]
    return torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _head_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(**{**TINY_VISION, "num_hidden_layers": 1})


@torch.no_grad()
def _eager_last_layer(vision, pixels):
    """(attention map (F, H, N, N), keys (F, N, C)) of the last encoder layer, from an eager run."""
    keys = []
    layer = vision.encoder.layers[-1]
    handle = layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: keys.append(out))
    previous = vision.config._attn_implementation
    vision.config._attn_implementation = "eager"
    try:
        out = vision(pixel_values=pixels, output_attentions=True)
    finally:
        vision.config._attn_implementation = previous
        handle.remove()
    return out.attentions[-1], keys[-1]


def test_siglip_signals_match_the_eager_map_and_leave_the_tower_alone(llava):
    pixels = _pixels()
    want_features = llava.encode_frames(pixels)
    hidden, signals = ss.siglip_signals(llava.vision, pixels, [VIT_RECEIVED_ATTENTION, VIT_KEYS])
    assert torch.equal(llava.encode_frames(pixels), want_features)  # hooks removed, nothing changed
    with ss.capture_layer_input(ss.feature_layer(llava.vision)) as captured:
        got_features = llava.encode_frames(pixels)
    assert torch.equal(got_features, want_features)  # bit-identical with the capture on
    assert captured.hidden.shape == (3, 49, TINY_VISION["hidden_size"])
    assert torch.equal(llava.projector(hidden).reshape(want_features.shape), want_features)

    attention, keys = _eager_last_layer(llava.vision, pixels)
    frames, heads, n, _ = attention.shape
    head_dim = TINY_VISION["hidden_size"] // heads
    received = torch.zeros(frames, n)
    for f in range(frames):
        for j in range(n):
            received[f, j] = sum(attention[f, h, i, j] for h in range(heads) for i in range(n)) / (heads * n)
    got = signals[VIT_RECEIVED_ATTENTION]
    assert got.dtype == torch.float32 and got.shape == (frames, n)
    torch.testing.assert_close(got, received, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(frames))
    mean_keys = keys.reshape(frames, n, heads, head_dim).mean(2)
    torch.testing.assert_close(signals[VIT_KEYS], mean_keys, atol=1e-6, rtol=1e-5)


def test_siglip_chunk_size_does_not_change_the_received_attention(llava):
    layer = ss.feature_layer(llava.vision)
    hidden = torch.randn(4, 49, TINY_VISION["hidden_size"], generator=torch.Generator().manual_seed(1))
    whole = ss.received_attention(layer, hidden, chunk=10**6)
    for chunk in (1, 7, 49, 100):  # rows of one frame, a frame, two frames per step
        torch.testing.assert_close(ss.received_attention(layer, hidden, chunk=chunk), whole, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        ss.received_attention(layer, hidden, chunk=0)
    with pytest.raises(ValueError, match=r"\(F, N, C\)"):
        ss.received_attention(layer, hidden[0])


def test_siglip_signals_in_bfloat16_are_float32_and_close(llava):
    layer = ss.feature_layer(llava.vision)
    hidden = torch.randn(2, 49, TINY_VISION["hidden_size"], generator=torch.Generator().manual_seed(2))
    want = ss.received_attention(layer, hidden)
    low = ss.feature_layer(build_random(parse_spec(tiny_lmms_lab_config("llava_ov")), seed=0, dtype="bfloat16").vision)
    got = ss.received_attention(low, hidden.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-3, rtol=5e-2)
    assert ss.head_mean_keys(low, hidden.bfloat16()).dtype == torch.float32


@torch.no_grad()
def test_probe_attention_matches_multihead_attention_weights():
    torch.manual_seed(0)
    tower = SiglipVisionModel(_head_config()).eval()
    head = tower.head
    hidden = torch.randn(3, 49, TINY_VISION["hidden_size"])
    attention, pooled = ss.probe_attention(head, hidden)
    probe = head.probe.repeat(3, 1, 1)
    _, weights = head.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(attention, weights[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled, head(hidden))
    # the head on LLaVA's encoder output (post_layernorm first) is SigLIP's pooler output
    pixels = _pixels(2)
    encoded = tower.encoder(inputs_embeds=tower.embeddings(pixels)).last_hidden_state
    module = ss.SiglipHead(tower.config)
    module.post_layernorm.load_state_dict(tower.post_layernorm.state_dict())
    module.head.load_state_dict(head.state_dict())
    salience, global_ = module(encoded)
    torch.testing.assert_close(global_, tower(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(salience.sum(-1), torch.ones(2))
    _, names = ss.siglip_signals(tower, pixels, [FRAME_SALIENCE, FRAME_GLOBAL], head=module)
    torch.testing.assert_close(names[FRAME_SALIENCE], salience)
    with pytest.raises(ValueError, match="load_siglip_head"):
        ss.siglip_signals(tower, pixels, [FRAME_SALIENCE])


def _save_vision(tower: SiglipVisionModel, path, prefix: str) -> None:
    path.mkdir()
    state = {prefix + k: v.contiguous() for k, v in tower.state_dict().items()}
    state["text_model.head.weight"] = torch.zeros(2, 2)  # a SiglipModel's text head must not confuse it
    save_file(state, str(path / "model.safetensors"))
    config = {"model_type": "siglip", "vision_config": tower.config.to_dict(), "text_config": {}}
    (path / "config.json").write_text(json.dumps(config))


@torch.no_grad()
def test_load_siglip_head_round_trips_both_layouts(tmp_path):
    torch.manual_seed(1)
    tower = SiglipVisionModel(_head_config()).eval()
    tower.save_pretrained(tmp_path / "vision")  # transformers' own layout: unprefixed names
    _save_vision(tower, tmp_path / "siglip", "vision_model.")  # google/siglip-* (SiglipModel) layout
    for directory in (tmp_path / "vision", tmp_path / "siglip"):
        module = ss.load_siglip_head(directory)
        assert torch.equal(module.head.probe, tower.head.probe)
        assert torch.equal(module.head.attention.in_proj_weight, tower.head.attention.in_proj_weight)
        assert torch.equal(module.post_layernorm.weight, tower.post_layernorm.weight)
        hidden = torch.randn(2, 49, TINY_VISION["hidden_size"])
        torch.testing.assert_close(module(hidden)[1], tower.head(tower.post_layernorm(hidden)))
    half = ss.load_siglip_head(tmp_path / "siglip", dtype=torch.bfloat16)
    assert half.head.probe.dtype == torch.bfloat16


def test_load_siglip_head_names_the_file_and_the_missing_keys(tmp_path):
    llava_dir = write_tiny_llava(tmp_path / "llava", arch="llava_ov")
    with pytest.raises(ValueError) as error:
        ss.load_siglip_head(llava_dir)
    message = str(error.value)
    assert str(llava_dir / "model.safetensors") in message
    assert "head.probe" in message and "head.attention.in_proj_weight" in message and "post_layernorm" in message
    assert "google/siglip-so400m-patch14-384" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ss.load_siglip_head(tmp_path / "empty")


def test_pool_like_features_uses_the_given_pooling():
    stat = torch.arange(2 * 49, dtype=torch.float32).reshape(2, 49)
    bilinear = ss.pool_like_features(stat, 7, lambda x: pool_grid(x, "bilinear", 2))
    average = ss.pool_like_features(stat, 7, lambda x: pool_grid(x, "average", 2))
    assert bilinear.shape == (2, 16) and average.shape == (2, 9)
    grid = stat.reshape(2, 7, 7)
    assert average[1, 4] == grid[1, 2:4, 2:4].mean()  # token (1, 1) of the 3x3 grid
    keys = torch.randn(2, 49, 5)
    pooled = ss.pool_like_features(keys, 7, lambda x: pool_grid(x, "bilinear", 2))
    for channel in range(5):  # a (F, N, d) statistic is pooled channel by channel
        one = ss.pool_like_features(keys[..., channel], 7, lambda x: pool_grid(x, "bilinear", 2))
        torch.testing.assert_close(pooled[..., channel], one)
    with pytest.raises(ValueError, match=r"stat must be \(F, 49\)"):
        ss.pool_like_features(stat[:, :48], 7, lambda x: x)


def test_unknown_signal_names_list_the_valid_ones(llava):
    with pytest.raises(ValueError, match="cannot supply signal.*'grid'.*vit_received_attention, vit_keys"):
        ss.siglip_signals(llava.vision, _pixels(1), ["grid"])


# -------------------------------------------------------------------------------------- Qwen


@pytest.fixture(scope="module", params=QWEN_ARCHS)
def qwen(request, tmp_path_factory):
    path = build_tiny_qwen(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    return build_random_model(path, device="cpu", dtype="float32", seed=1)


def _qwen_inputs(model, grids=QWEN_GRIDS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config.vision_config
    thw = torch.tensor(grids)
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    return torch.randn(int(thw.prod(-1).sum()), width, generator=torch.Generator().manual_seed(seed)), thw


@torch.no_grad()
def _eager_reference(model, pixels, thw):
    """Per-item (received (F, P), keys (F, P, d), salience (F, P)) from the eager last block, by loops."""
    tower = model.model.visual
    block = tower.blocks[-1]
    modeling = sys.modules[type(block.attn).__module__]
    inner = modeling.eager_attention_forward
    segments, qkv = [], []

    def recording(module, query, key, value, *args, **kwargs):
        out, weights = inner(module, query, key, value, *args, **kwargs)
        if module is block.attn:
            segments.append((query[0], key[0], weights[0]))  # (H, n, d), (H, n, d), (H, n, n)
        return out, weights

    handle = block.attn.qkv.register_forward_hook(lambda _m, _i, out: qkv.append(out))
    modeling.eager_attention_forward = recording
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        tower(pixels, grid_thw=thw)
    finally:
        tower.config._attn_implementation = previous
        modeling.eager_attention_forward = inner
        handle.remove()

    grid = thw.tolist()
    m = tower.spatial_merge_size
    m2 = m * m
    heads = block.attn.num_heads
    total_units = sum(t * h * w for t, h, w in grid) // m2
    if hasattr(tower, "fullatt_block_indexes"):  # window order of merge units, from transformers
        from transformers.vision_utils import get_vision_window_index

        order = get_vision_window_index(thw, m, tower.window_size, tower.patch_size)[0].tolist()
    else:
        order = list(range(total_units))
    assert len(segments) == sum(t for t, _, _ in grid)  # one attention segment per frame
    # per-patch statistics in the blocks' order, then each back to its original patch position
    received_w = torch.cat([w.mean(0).mean(0) for _, _, w in segments])  # mean over heads, then rows
    keys_w = qkv[-1].reshape(len(received_w), 3, heads, -1)[:, 1].mean(1)
    received = torch.empty_like(received_w)
    keys = torch.empty_like(keys_w)
    for j, unit in enumerate(order):
        received[unit * m2 : (unit + 1) * m2] = received_w[j * m2 : (j + 1) * m2]
        keys[unit * m2 : (unit + 1) * m2] = keys_w[j * m2 : (j + 1) * m2]
    salience_w = []
    for query, key, _ in segments:  # FastVID: frame-mean query against merge-unit mean keys
        q_bar = query.mean(1)
        units = key.shape[1] // m2
        k_bar = torch.stack([key[:, u * m2 : (u + 1) * m2].mean(1) for u in range(units)], 1)  # (H, P, d)
        scores = [torch.softmax((k_bar[h] @ q_bar[h]) * block.attn.scaling, 0) for h in range(heads)]
        salience_w.append(sum(scores) / heads)
    salience_w = torch.cat(salience_w)
    salience = torch.empty_like(salience_w)
    salience[torch.tensor(order)] = salience_w

    out, start = [], 0
    for t, h, w in grid:
        units = h * w // m2
        rec = torch.zeros(t, units)
        key = torch.zeros(t, units, keys.shape[-1])
        for f in range(t):
            for u in range(units):
                first = start * m2 + (f * units + u) * m2
                rec[f, u] = received[first : first + m2].mean()
                key[f, u] = keys[first : first + m2].mean(0)
        out.append((rec, key, salience[start : start + t * units].reshape(t, units)))
        start += t * units
    return out


@torch.no_grad()
def test_qwen_signals_match_the_eager_last_block(qwen):
    pixels, thw = _qwen_inputs(qwen)
    want = qwen_stages._run_tower(qwen, pixels, thw)
    (embeds, deepstack, grid), signals = qs.vision_signals(qwen, pixels, thw, ALL)
    assert all(torch.equal(a, b) for a, b in zip(embeds, want[0], strict=True))  # capture changes nothing
    if want[1] is not None:
        assert all(torch.equal(a, b) for a, b in zip(deepstack, want[1], strict=True))
    assert grid == want[2]
    reference = _eager_reference(qwen, pixels, thw)
    for item, ((t, h, w), (received, keys, salience)) in enumerate(zip(grid, reference, strict=True)):
        units = h * w // 4
        got = signals[VIT_RECEIVED_ATTENTION][item]
        assert got.dtype == torch.float32 and got.shape == (t, units)
        torch.testing.assert_close(got, received, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(signals[VIT_KEYS][item], keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(signals[FRAME_SALIENCE][item], salience, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(signals[FRAME_SALIENCE][item].sum(-1), torch.ones(t))
        frame_mean = embeds[item].reshape(t, units, -1).mean(1)
        torch.testing.assert_close(signals[FRAME_GLOBAL][item], frame_mean)
    videos = qs.per_video(signals)
    assert len(videos) == 2 and set(videos[1]) == set(ALL) and videos[1][VIT_KEYS] is signals[VIT_KEYS][1]


@torch.no_grad()
def test_qwen_window_order_is_undone(qwen):
    """Qwen2.5-VL: the test grids really are reordered; without the tower's window index (tower called
    directly) the capture recomputes it and gives the same signals."""
    tower = qwen.model.visual
    pixels, thw = _qwen_inputs(qwen)
    if hasattr(tower, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        order = get_vision_window_index(thw, 2, tower.window_size, tower.patch_size)[0]
        assert not torch.equal(order, torch.arange(len(order)))
    _, want = qs.vision_signals(qwen, pixels, thw, ALL)
    with qs.capture_last_vision_block(qwen) as captured:
        out = tower(pixels, grid_thw=thw)
    assert captured.window_index is None
    embeds = list(torch.split(out.pooler_output, [t * h * w // 4 for t, h, w in QWEN_GRIDS]))
    got = qs.signals_from_capture(qwen, captured, [tuple(g) for g in QWEN_GRIDS], ALL, embeds)
    for name in ALL:
        for a, b in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@torch.no_grad()
def test_qwen_chunk_size_does_not_change_results(qwen):
    pixels, thw = _qwen_inputs(qwen, seed=3)
    with qs.capture_last_vision_block(qwen) as captured:
        _, _, grid = qwen_stages._run_tower(qwen, pixels, thw)
    whole = qs.signals_from_capture(qwen, captured, grid, [VIT_RECEIVED_ATTENTION], chunk=10**6)
    for chunk in (1, 5, 24, 50):  # rows of a frame, whole frames, several frames per step
        got = qs.signals_from_capture(qwen, captured, grid, [VIT_RECEIVED_ATTENTION], chunk=chunk)
        for a, b in zip(got[VIT_RECEIVED_ATTENTION], whole[VIT_RECEIVED_ATTENTION], strict=True):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_qwen_signals_refuse_what_they_cannot_compute(qwen, monkeypatch):
    pixels, thw = _qwen_inputs(qwen)
    with pytest.raises(ValueError, match="cannot supply signal.*'vit_cls'.*vit_received_attention"):
        qs.vision_signals(qwen, pixels, thw, ["vit_cls"])
    with pytest.raises(ValueError, match="nothing was captured"):
        qs.signals_from_capture(qwen, qs.BlockCall(), QWEN_GRIDS, [VIT_KEYS])
    with qs.capture_last_vision_block(qwen) as captured:
        embeds, _, grid = qwen_stages._run_tower(qwen, pixels, thw)
    with pytest.raises(ValueError, match="frame_global needs the tower's merged embeddings"):
        qs.signals_from_capture(qwen, captured, grid, [FRAME_GLOBAL])
    with pytest.raises(ValueError, match="the grid says"):
        qs.signals_from_capture(qwen, captured, grid[:1], [VIT_KEYS])
    tower = qwen.model.visual
    if hasattr(tower, "fullatt_block_indexes"):
        monkeypatch.setattr(tower, "fullatt_block_indexes", [0])
        with pytest.raises(ValueError, match="last block .* attends in windows"):
            qs.vision_signals(qwen, pixels, thw, [VIT_KEYS])
