"""In-LLM methods on the layer-wise driver: attention rows, FastV / PDrop against hand-built references
(prefill and every decode step), ragged batches, every family end to end, and the error cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from llava.families_index import load_video_llm, tiny_builders
from llava.model import fastv, pdrop
from llava.model.compression import CompressionSpec
from llava.model.generate import llava_stack
from llava.model.lm_driver import LMInputs, decode_step, generate, prefill
from llava.model.method_api import Boundary, InLLMPlan, LayerAction, LayerState
from llava.runtime import FrameSampling, GenerationOptions

LAYERS = 6
VISUAL = slice(3, 43)  # 40 video tokens after a 3-token prefix; 6 text tokens follow
LENGTH = 49


def tiny_lm(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=512, attn_implementation=attn,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def prompt(lm: Qwen2ForCausalLM, length: int = LENGTH, seed: int = 1) -> LMInputs:
    """One unpadded prompt of random embeddings; tokens 3..42 are video tokens."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, 64, generator=gen) * 0.5
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, VISUAL] = True
    positions = torch.arange(length)[None, None]
    n_visual = int(visual.sum())
    return LMInputs(embeds, torch.ones(1, length, dtype=torch.bool), positions, torch.tensor([[length]]), visual,
                    (length,), (n_visual,))  # fmt: skip


def stack_pad(rows: list[LMInputs]) -> LMInputs:
    """Left-pad single-row prompts into one batch."""
    longest = max(r.embeds.shape[1] for r in rows)

    def pad(t: torch.Tensor, fill: float | bool) -> torch.Tensor:
        extra = longest - t.shape[-2 if t.dim() == 3 and t.dtype.is_floating_point else -1]
        if t.dtype.is_floating_point:
            return torch.cat([t.new_zeros(t.shape[0], extra, t.shape[2]), t], dim=1)
        return torch.cat([t.new_full((*t.shape[:-1], extra), fill), t], dim=-1)

    return LMInputs(
        torch.cat([pad(r.embeds, 0) for r in rows]),
        torch.cat([pad(r.valid, False) for r in rows]),
        torch.cat([pad(r.positions, 0) for r in rows], dim=1),
        torch.cat([r.next_position for r in rows], dim=1),
        torch.cat([pad(r.visual, False) for r in rows]),
        tuple(r.lengths[0] for r in rows),
        tuple(r.visual_counts[0] for r in rows),
    )


@torch.inference_mode()
def eager_maps(lm: Qwen2ForCausalLM, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's full (B, H, L, L) attention map from the stock eager forward."""
    eager = tiny_lm("eager")
    eager.load_state_dict(lm.state_dict())
    return eager(inputs_embeds=embeds, output_attentions=True).attentions


class Recorder(InLLMPlan):
    """Keeps everything and records the scores it was given at each boundary."""

    def __init__(self, boundaries: tuple[Boundary, ...], marked: torch.Tensor | None = None, full_map: bool = False):
        self.boundaries, self.marked, self.full_map, self.seen = boundaries, marked, full_map, {}

    def mark_rows(self, embeds, visual, valid):
        return self.marked

    def act(self, boundary: Boundary, state: LayerState) -> LayerAction:
        self.seen[boundary.layer] = state.scores.clone()
        return LayerAction(state.visual.clone(), state.visual_now)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("full_map", [False, True])
def test_attention_rows_equal_the_full_eager_map(attn: str, full_map: bool) -> None:
    lm = tiny_lm(attn)
    inputs = prompt(lm)
    maps = eager_maps(lm, inputs.embeds)
    last = Recorder((Boundary(2, "last", "previous"), Boundary(4, "last", "probe")), full_map=full_map)
    prefill(llava_stack(lm), inputs, plan=last)
    torch.testing.assert_close(last.seen[2], maps[1][:, :, -1].float().mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(last.seen[4], maps[4][:, :, -1].float().mean(1), atol=1e-6, rtol=1e-5)
    marked = torch.zeros(1, LENGTH, dtype=torch.bool)
    marked[0, [43, 45, 47]] = True  # causal rows: each sees keys up to itself
    rows = Recorder((Boundary(3, "marked", "previous"),), marked=marked, full_map=full_map)
    prefill(llava_stack(lm), inputs, plan=rows)
    expected = maps[2][0, :, [43, 45, 47]].float().mean(0).mean(0, keepdim=True)
    torch.testing.assert_close(rows.seen[3], expected, atol=1e-6, rtol=1e-5)


def test_nothing_dropped_equals_the_stock_forward_and_generate() -> None:
    lm = tiny_lm("sdpa")
    inputs = prompt(lm)
    keep_all = Recorder((Boundary(2, "last", "previous"),))
    ours = prefill(llava_stack(lm), inputs, plan=keep_all).logits
    stock = lm(inputs_embeds=inputs.embeds).logits[:, -1].float()
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)
    ids = generate(llava_stack(lm), inputs, GenerationOptions(max_new_tokens=6, ignore_eos=True), stop_ids=[]).ids
    want = lm.generate(inputs_embeds=inputs.embeds, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert ids[0] == want[0].tolist()


@torch.inference_mode()
def reference_logits(
    lm: Qwen2ForCausalLM, inputs: LMInputs, k: int, kept: torch.Tensor, generated: list[int], compact: bool
) -> torch.Tensor:
    """No cache, no driver: layers < k on prompt + generated, then layers >= k on the kept prompt tokens
    + generated, each with its own positions; the last position's logits."""
    body = lm.model
    tail = body.embed_tokens(torch.tensor([generated], dtype=torch.long)) if generated else inputs.embeds[:, :0]
    h = torch.cat([inputs.embeds, tail], dim=1)
    n = h.shape[1]
    pos = torch.arange(n)[None]
    rope = body.rotary_emb(h, pos)
    for layer in body.layers[:k]:
        h = layer(h, attention_mask=None, position_embeddings=rope)
    text = torch.ones(LENGTH, dtype=torch.bool)
    text[VISUAL] = False
    keep_prompt = text.clone()
    keep_prompt[kept] = True
    index = torch.cat([keep_prompt.nonzero().squeeze(1), torch.arange(LENGTH, n)])
    h = h[:, index]
    pos2 = torch.arange(h.shape[1])[None] if compact else index[None]
    rope = body.rotary_emb(h, pos2)
    for layer in body.layers[k:]:
        h = layer(h, attention_mask=None, position_embeddings=rope)
    return lm.lm_head(body.norm(h))[:, -1].float()


@pytest.mark.parametrize("positions", ["inherit", "compact"])
def test_fastv_equals_a_hand_built_reference_in_prefill_and_every_decode_step(positions: str) -> None:
    lm = tiny_lm("sdpa")
    inputs = prompt(lm)
    spec = CompressionSpec("fastv", 0.5, {"layer": 2, "positions": positions})
    plan = spec.llm_plan(LAYERS)
    ratio = fastv.after_ratio(0.5, LAYERS, 2)
    n_keep = round(ratio * 40)
    maps = eager_maps(lm, inputs.embeds)
    scores = maps[1][0, :, -1].float().mean(0)[VISUAL]
    kept = VISUAL.start + torch.sort(scores, descending=True, stable=True).indices[:n_keep]
    stack = llava_stack(lm)
    state = prefill(stack, inputs, room=5, plan=plan)
    assert [c[0] for c in state.layer_visual] == [40, 40] + [n_keep] * (LAYERS - 2)
    torch.testing.assert_close(state.logits[0], reference_logits(lm, inputs, 2, kept, [], positions == "compact")[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    generated: list[int] = []
    logits = state.logits
    for _ in range(4):
        token = int(logits[0].argmax())
        generated.append(token)
        logits = decode_step(stack, state, torch.tensor([token]))
        expected = reference_logits(lm, inputs, 2, kept, generated, positions == "compact")
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # the check can fail: the other position rule gives other logits
    other = reference_logits(lm, inputs, 2, kept, generated, positions != "compact")
    assert not torch.allclose(logits, other, atol=1e-4)


def test_pdrop_first_stage_equals_a_hand_built_reference() -> None:
    lm = tiny_lm("sdpa")
    inputs = prompt(lm)
    spec = CompressionSpec("pdrop", 0.7, {"layers": "3", "shape": "1", "positions": "inherit"})
    plan = spec.llm_plan(LAYERS)
    rho = pdrop.solve_ratios(0.7, (3,), (1.0,), LAYERS)[0]
    assert rho == pytest.approx(0.4) and pdrop.layer_average((3,), (rho,), LAYERS) == pytest.approx(0.7)
    maps = eager_maps(lm, inputs.embeds)
    scores = maps[3][0, :, -1].float().mean(0)[VISUAL]  # layer 3's own projections on layer 2's output
    kept = VISUAL.start + torch.sort(scores, descending=True, stable=True).indices[: int(40 * rho)]
    ours = prefill(llava_stack(lm), inputs, plan=plan).logits
    torch.testing.assert_close(ours, reference_logits(lm, inputs, 3, kept, [], False), atol=1e-5, rtol=1e-5)


def test_pdrop_schedule_is_solved_from_r() -> None:
    rho = pdrop.solve_ratios(0.25, (2, 6, 15), (1.0, 0.5, 0.25), 28)
    assert rho == pytest.approx((0.4255, 0.2128, 0.1064), abs=1e-4)  # the spec's schedule
    assert pdrop.layer_average((2, 6, 15), rho, 28) == pytest.approx(0.25)
    assert fastv.after_ratio(0.25, 28, 2) == pytest.approx(0.1923, abs=1e-4)


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_batch_of_two_equals_two_single_runs(method: str) -> None:
    spec = CompressionSpec(method, 0.4, {"layers": "2/4", "shape": "1/0.5"} if method == "pdrop" else {})
    assert_batch_equals_single_rows(tiny_lm("sdpa"), spec)


def assert_batch_equals_single_rows(lm: Qwen2ForCausalLM, spec: CompressionSpec) -> None:
    """Two prompts of different lengths, left padded into one batch, give each row's single-run result:
    first logits, generated ids and video tokens per layer."""
    short, long = prompt(lm, LENGTH, seed=1), prompt(lm, LENGTH + 5, seed=2)
    options = GenerationOptions(max_new_tokens=5, ignore_eos=True)
    singles = [generate(llava_stack(lm), p, options, stop_ids=[], plan=spec.llm_plan(LAYERS)) for p in (short, long)]
    batch = generate(llava_stack(lm), stack_pad([short, long]), options, stop_ids=[], plan=spec.llm_plan(LAYERS))
    for row, single in enumerate(singles):
        torch.testing.assert_close(batch.first_logits[row], single.first_logits[0], atol=1e-5, rtol=1e-5)
        assert batch.ids[row] == single.ids[0]
        assert [c[row] for c in batch.layer_visual] == [c[0] for c in single.layer_visual]


def test_errors_name_the_option_and_the_limit() -> None:
    with pytest.raises(ValueError, match=r"layer=6: the language model has 6 layers"):
        CompressionSpec("fastv", 0.5, {"layer": 6}).llm_plan(LAYERS)
    with pytest.raises(ValueError, match=r"FastV cannot reach retention 0.3 with layer=2 on 6 layers"):
        CompressionSpec("fastv", 0.3).llm_plan(LAYERS)
    with pytest.raises(ValueError, match=r"reaches retentions in"):
        CompressionSpec("pdrop", 0.05).llm_plan(28)
    with pytest.raises(ValueError, match=r"average 0.7500 over 6 layers, but retention 0.3 was asked"):
        CompressionSpec("pdrop", 0.3, {"layers": "3", "shape": "1", "ratios": "0.5"}).llm_plan(LAYERS)
    with pytest.raises(ValueError, match=r"layers 0..5"):
        CompressionSpec("pdrop", 0.5, {"layers": "2/6"}).llm_plan(LAYERS)
    lm = tiny_lm("sdpa")
    with pytest.raises(ValueError, match=r"use decode_mode=eager"):
        generate(llava_stack(lm), prompt(lm), GenerationOptions(max_new_tokens=3, decode_mode="static"), stop_ids=[],
                 plan=CompressionSpec("fastv", 0.5).llm_plan(LAYERS))  # fmt: skip


FAMILIES = ["llava_ov", "llava_vid", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_answers_with_in_llm_methods(tmp_path: Path, videos: Path, family: str) -> None:
    llm = load_video_llm(tiny_builders()[family](tmp_path / family, seed=1))
    sampling, gen = FrameSampling(num_frames=4), GenerationOptions(max_new_tokens=3)
    for spec in (CompressionSpec("fastv", 0.25), CompressionSpec("pdrop", 0.25)):
        result = llm.answer(videos / "mixed.mp4", "What?", compression=spec, sampling=sampling, generation=gen)
        layer_average = result.extra["layer_average_retention"]
        assert abs(layer_average - 0.25) < 0.03, (spec.describe(), layer_average)
        assert result.visual_tokens_after == result.visual_tokens_before  # nothing dropped before the LM


@pytest.mark.parametrize("family", ["llava_ov", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_cli_infer_in_llm_method(tmp_path: Path, videos: Path, capsys, family: str, method: str) -> None:
    from llava.cli import main

    path = tiny_builders()[family](tmp_path / family, seed=0)
    argv = ["infer", "--model", str(path), "--video", str(videos / "mixed.mp4"), "--question", "What?", "--json",
            "--compressor", method, "--retention", "0.25", "--frames", "4", "--max-new-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["extra"]["compression"].startswith(method)
    assert abs(data["extra"]["layer_average_retention"] - 0.25) < 0.03
