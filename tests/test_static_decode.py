"""decode_mode "static" / "compiled" against eager decoding, on tiny random checkpoints (CPU, float32).

The static path must give the eager path's greedy ids and per-step logits (to float rounding), for one
row and for a left-padded batch of rows of different lengths, in both model families; the compiled step
must match too, and be reused (not recompiled) by a second request of the same shape.
"""

from __future__ import annotations

import collections
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from driver_calls import llava_generate, llava_prefill, qwen_generate, qwen_static_logits, static_decoder
from torch._dynamo.utils import counters

from llava.families_index import load_video_llm
from llava.model import static_decode
from llava.model.compression import CompressionSpec
from llava.model.families import LlavaVideoLLM
from llava.model.generate import llava_stack, static_step
from llava.model.lm_driver import LMInputs as BatchInputs
from llava.model.lm_driver import prefill as driver_prefill
from llava.model.loading import load_llava
from llava.model.prompt import split_prompt
from llava.model.static_decode import (
    StaticDecoder,
    cached_shapes,
    release_static_decode,
    start_static_decode,
    static_cache_length,
)
from llava.model.tiny import write_tiny_llava
from llava.runtime import FrameSampling, GenerationOptions, InferenceResult, StageTimer
from llava.synthetic_videos import make_videos
from llava.video_io import read_video
from transformers_patched import qwen_stages as stages
from transformers_patched.qwen_adapter import QwenVideoLLM
from transformers_patched.qwen_tiny import build_tiny_qwen

STEPS = 14  # generated tokens per request (>= 12), EOS ignored
QUESTIONS = ("Hi", "Describe every shape that moves in this video, and its colour.")
LLAVA_FRAMES = FrameSampling(num_frames=6)
QWEN_FRAMES = FrameSampling(num_frames=8)
ATOL = 1e-5


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_videos(out, seed=2)
    return out


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> LlavaVideoLLM:
    model, tokenizer, _ = load_llava(write_tiny_llava(tmp_path_factory.mktemp("ov"), arch="llava_ov", seed=3))
    return LlavaVideoLLM(model, tokenizer)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def qwen(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> QwenVideoLLM:
    return load_video_llm(build_tiny_qwen(request.param, tmp_path_factory.mktemp(request.param), seed=1))


@pytest.fixture
def step_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts StaticDecoder.step calls: proves a static request did not silently decode eagerly."""
    calls: collections.Counter = collections.Counter()
    original = StaticDecoder.step

    def counted(self: StaticDecoder, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        calls["step"] += 1
        return original(self, tokens, positions)

    monkeypatch.setattr(StaticDecoder, "step", counted)
    return calls


# ---------------------------------------------------------------- LLaVA


def llava_batch(llm: LlavaVideoLLM, videos: Path, names: list[str], questions: tuple[str, ...]) -> BatchInputs:
    prompts = []
    for name, question in zip(names, questions, strict=True):
        # exact_count: every video keeps the same number of tokens, so two requests share one shape whatever
        # the platform's float rounding does to the per-frame budgets
        spec = CompressionSpec("vidcom2", 0.5, {"exact_count": True})
        block, _ = llm.video_block(videos / name, spec, LLAVA_FRAMES, StageTimer())
        before, after = split_prompt(llm.tokenizer, question, llm.model.spec.placeholder)
        prompts.append((before, block, after))
    return llm.model.build_inputs(prompts, llm.position_mode)


def llava_ids(llm: LlavaVideoLLM, batch: BatchInputs, mode: str) -> list[list[int]]:
    lm = llm.model.language_model
    options = GenerationOptions(max_new_tokens=STEPS, decode_mode=mode)
    return llava_generate(lm, batch, options)


@torch.inference_mode()
def llava_logits(llm: LlavaVideoLLM, batch: BatchInputs, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """(steps, B, V): prefill logits, then one step per fed id (teacher forcing)."""
    lm = llm.model.language_model
    stack = llava_stack(lm)
    state = driver_prefill(stack, batch)
    logits, cache = state.logits, state.cache
    out = [logits]
    mask = batch.attention_mask
    decoder = None
    if mode != "eager":
        decoder = static_decoder(stack, state, ids.shape[1], mode)
    for t in range(ids.shape[1] - 1):
        positions = (batch.next_position[0] + t)[:, None]
        if decoder is not None:
            out.append(decoder.step(ids[:, t], positions))
            continue
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = lm(input_ids=ids[:, t : t + 1], attention_mask=mask, position_ids=positions, past_key_values=cache)
        cache = step.past_key_values
        out.append(step.logits[:, -1].float())
    return torch.stack(out)


@pytest.mark.parametrize("rows", [1, 2])
def test_llava_static_matches_eager(
    llava: LlavaVideoLLM, videos: Path, rows: int, step_calls: collections.Counter
) -> None:
    batch = llava_batch(llava, videos, ["moving.mp4", "mixed.mp4"][:rows], QUESTIONS[-rows:])
    if rows == 2:
        assert (batch.attention_mask == 0).any(), "the two prompts must differ in length (left padding)"
    eager = llava_ids(llava, batch, "eager")
    assert step_calls["step"] == 0
    static = llava_ids(llava, batch, "static")
    assert step_calls["step"] == STEPS - 1
    assert static == eager and all(len(r) == STEPS for r in eager)
    ids = torch.tensor(eager)
    reference = llava_logits(llava, batch, ids, "eager")
    torch.testing.assert_close(llava_logits(llava, batch, ids, "static"), reference, atol=ATOL, rtol=0)
    lm = llava.model.language_model
    length = static_cache_length(batch.attention_mask.shape[1], STEPS)
    assert any(k[1:4] == ("static", rows, length) for k in cached_shapes(lm))


@torch.inference_mode()
def test_static_mask_and_cache_layout(llava: LlavaVideoLLM, videos: Path) -> None:
    """The mask is (B, bucketed length): the prompt's, then 1 per filled slot, 0 beyond; the cache
    holds the prefill's keys and a stale tail from an earlier request is cleared."""
    lm = llava.model.language_model
    batch = llava_batch(llava, videos, ["moving.mp4", "static.mp4"], QUESTIONS)
    prompt = batch.attention_mask
    rows, length = prompt.shape
    assert static_cache_length(length, STEPS) == 256 and static_cache_length(250, 6) == 256
    assert static_cache_length(250, 7) == 512
    _, cache = llava_prefill(lm, batch)
    decoder = start_static_decode(lm, static_step, lm.config, cache, prompt, STEPS, "static")
    tokens = torch.zeros(rows, dtype=torch.long)
    for t in range(3):
        decoder.step(tokens, (batch.next_position[0] + t)[:, None])
    expected = torch.zeros(rows, 256, dtype=prompt.dtype)
    expected[:, :length] = prompt
    expected[:, length : length + 3] = 1
    assert torch.equal(decoder.attention_mask, expected) and decoder.next_slot == length + 3
    _, cache = llava_prefill(lm, batch)
    again = start_static_decode(lm, static_step, lm.config, cache, prompt, STEPS, "static")
    assert again.cache is decoder.cache  # same shape: the kept cache is reused
    for static, dynamic in zip(again.cache.layers, cache.layers, strict=True):
        assert torch.equal(static.keys[:, :, :length], dynamic.keys)
        assert not static.keys[:, :, length:].any() and int(static.cumulative_length) == length
    assert torch.equal(again.attention_mask[:, :length], prompt) and not again.attention_mask[:, length:].any()


# ---------------------------------------------------------------- Qwen


def qwen_prepared(llm: QwenVideoLLM, videos: Path, rows: int) -> stages.PrefillInputs:
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": read_video(videos / name, QWEN_FRAMES)},
                    {"type": "text", "text": question},
                ],
            }
        ]
        for name, question in zip(["moving.mp4", "mixed.mp4"][:rows], QUESTIONS[-rows:], strict=True)
    ]
    inputs = llm.prepare(conversations, QWEN_FRAMES).inputs
    vision = stages.encode_vision(llm.model, inputs)
    kept = stages.select_video_tokens(llm.model, inputs, vision, CompressionSpec("vidcom2", 0.5))
    return stages.build_prefill(llm.model, inputs, vision, kept)


def qwen_logits(llm: QwenVideoLLM, prepared: stages.PrefillInputs, ids: torch.Tensor, mode: str) -> torch.Tensor:
    return qwen_static_logits(llm.model, prepared, ids, mode)


@pytest.mark.parametrize("rows", [1, 2])
def test_qwen_static_matches_eager(
    qwen: QwenVideoLLM, videos: Path, rows: int, step_calls: collections.Counter
) -> None:
    prepared = qwen_prepared(qwen, videos, rows)
    assert prepared.position_ids.shape[:2] == (4, rows)
    if rows == 2:
        assert (prepared.attention_mask == 0).any(), "the two prompts must differ in length (left padding)"
    eager, _ = qwen_generate(qwen.model, prepared, GenerationOptions(STEPS, ignore_eos=True))
    static, _ = qwen_generate(qwen.model, prepared, GenerationOptions(STEPS, ignore_eos=True, decode_mode="static"))
    assert step_calls["step"] == STEPS - 1
    assert eager.shape == (rows, STEPS) and torch.equal(static, eager)
    reference = qwen_logits(qwen, prepared, eager, "eager")
    torch.testing.assert_close(qwen_logits(qwen, prepared, eager, "static"), reference, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- compiled


def test_compiled_graph_is_whole_and_host_sync_free(
    llava: LlavaVideoLLM, qwen: QwenVideoLLM, videos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both families' steps trace into one graph (fullgraph) with no host sync, and give eager's ids.
    A recording backend stands in for inductor here: it sees the graph inductor would get."""
    ops: collections.Counter = collections.Counter()

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        ops.update(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        ops["graphs"] += 1
        return gm.forward

    monkeypatch.setattr(static_decode, "_COMPILE_BACKEND", record)
    release_static_decode(llava.model)
    release_static_decode(qwen.model)
    batch = llava_batch(llava, videos, ["moving.mp4", "mixed.mp4"], QUESTIONS)
    assert llava_ids(llava, batch, "compiled") == llava_ids(llava, batch, "eager")
    prepared = qwen_prepared(qwen, videos, 2)
    eager, _ = qwen_generate(qwen.model, prepared, GenerationOptions(STEPS, ignore_eos=True))
    options = GenerationOptions(STEPS, ignore_eos=True, decode_mode="compiled")
    assert torch.equal(qwen_generate(qwen.model, prepared, options)[0], eager)
    assert ops["graphs"] == 2  # one per family, each traced once for all its steps
    syncs = {op for op in ops if op in ("item", "tolist") or "_local_scalar_dense" in op or "nonzero" in op}
    assert not syncs, f"host syncs in the compiled step: {syncs}"
    release_static_decode(llava.model)
    release_static_decode(qwen.model)


def test_compiled_matches_eager_and_is_reused(llava: LlavaVideoLLM, videos: Path) -> None:
    """Inductor on the CPU (no CUDA graphs there): same ids as eager; a second request of the same
    shape reuses the compiled step and its cache without compiling again."""
    lm = llava.model.language_model
    release_static_decode(llava.model)
    first = llava_batch(llava, videos, ["moving.mp4"], QUESTIONS[:1])
    second = llava_batch(llava, videos, ["scene_cut.mp4"], QUESTIONS[:1])
    assert first.attention_mask.shape == second.attention_mask.shape
    assert not torch.equal(first.embeds, second.embeds)
    eager_first, eager_second = llava_ids(llava, first, "eager"), llava_ids(llava, second, "eager")
    assert eager_first != eager_second, "the two requests must differ, or stale-cache reuse would go unseen"
    counters.clear()
    assert llava_ids(llava, first, "compiled") == eager_first
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    (key,) = cached_shapes(lm)
    assert llava_ids(llava, second, "compiled") == eager_second
    assert counters["stats"]["unique_graphs"] == graphs, "the second request of the same shape recompiled"
    assert cached_shapes(lm) == [key]
    release_static_decode(llava.model)
    assert cached_shapes(lm) == []


# ---------------------------------------------------------------- the knob and its errors


def test_bad_decode_mode_raises_naming_it() -> None:
    from vidcom2_lmms_eval.args import parse_model_args
    from vidcom2_lmms_eval.wrappers import generation_options

    with pytest.raises(ValueError, match="decode_mode must be one of auto, eager, static, compiled, got 'fast'"):
        GenerationOptions(decode_mode="fast")
    with pytest.raises(ValueError, match="decode_mode='fast'"):
        parse_model_args("qwen2_vl", {"pretrained": "m", "decode_mode": "fast"}, environ={})
    with pytest.raises(ValueError, match="decode_mode=compiled needs attn_implementation"):
        parse_model_args(
            "qwen2_vl", {"pretrained": "m", "decode_mode": "compiled", "use_flash_attention_2": "true"}, environ={}
        )
    settings = parse_model_args("llava_onevision", {"pretrained": "m", "decode_mode": "compiled"}, environ={})
    assert settings.decode_mode == "compiled"
    assert generation_options({"max_new_tokens": 4}, 16, settings.decode_mode).decode_mode == "compiled"
    assert parse_model_args("llava_onevision", {"pretrained": "m"}, environ={}).decode_mode == "auto"
    with pytest.raises(ValueError, match="needs attn_implementation sdpa or eager"):
        start_static_decode(
            torch.nn.Linear(1, 1),
            static_step,
            SimpleNamespace(_attn_implementation="flash_attention_2"),
            None,
            torch.ones(1, 4, dtype=torch.long),
            4,
            "compiled",
        )


def test_cli_and_bench_pass_decode_mode(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from llava.bench.efficiency import Case, environment, run_case
    from llava.cli import main

    assert main(["infer", "--model", "m", "--video", "v.mp4", "--question", "q", "--decode-mode", "fast"]) == 2
    assert "decode_mode must be one of auto, eager, static, compiled" in capsys.readouterr().err
    assert main(["bench", "--decode-mode", "fast", "--out", str(tmp_path / "x.csv")]) == 2
    assert "--decode-mode must be one of" in capsys.readouterr().err
    for command in ("infer", "bench"):
        extra = ["--model", "m", "--video", "v.mp4", "--question", "q"] if command == "infer" else []
        assert main([command, *extra, "--decode-mode", "compiled", "--attn", "flash_attention_2"]) == 2
        assert "needs attn_implementation sdpa or eager" in capsys.readouterr().err
    env = environment(torch.device("cpu"), "sdpa", "float32", "compiled")
    assert list(env)[-3:] == ["dtype", "decode_mode", "cuda_alloc_conf"] and env["decode_mode"] == "compiled"

    seen: list[GenerationOptions] = []

    class FakeLLM:
        device = "cpu"

        def answer_batch(self, videos: list, questions: list, *, generation: GenerationOptions, **_: object) -> list:
            seen.append(generation)
            return [InferenceResult("a", [1], 4, 2, timings={"decode": 0.1})] * len(videos)

    model = SimpleNamespace(sampling=lambda frames: FrameSampling(num_frames=frames))
    run_case(
        FakeLLM(), model, tmp_path / "v.mp4", Case("none", 1.0, 4, 1),
        decode_tokens=3, repeats=1, warmup=1, decode_mode="static",
    )
    assert [g.decode_mode for g in seen] == ["static", "static"]


def test_auto_decode_mode_resolution() -> None:
    """auto compiles only where one graph can serve every step: CUDA, sdpa / eager attention, no in-LLM
    method, more than one token; an explicit mode is kept as asked."""
    from llava.model.static_decode import resolve_decode_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_decode_mode("auto", cuda, "sdpa", False, 16) == "compiled"
    assert resolve_decode_mode("auto", cuda, "eager", False, 2) == "compiled"
    assert resolve_decode_mode("auto", cpu, "sdpa", False, 16) == "eager"
    assert resolve_decode_mode("auto", cuda, "sdpa", True, 16) == "eager"  # an in-LLM plan keeps shorter caches
    assert resolve_decode_mode("auto", cuda, "flash_attention_2", False, 16) == "eager"
    assert resolve_decode_mode("auto", cuda, "sdpa", False, 1) == "eager"
    assert resolve_decode_mode("static", cpu, "sdpa", True, 16) == "static"  # the driver then refuses it
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        resolve_decode_mode("fast", cpu, "sdpa", False, 16)


def test_results_report_the_resolved_decode_mode(llava: LlavaVideoLLM, videos: Path) -> None:
    """The default (auto) decodes eagerly on the CPU and every result says so."""
    assert GenerationOptions().decode_mode == "auto"
    result = llava.answer(videos / "moving.mp4", "What moves?", generation=GenerationOptions(max_new_tokens=3))
    assert result.extra["decode_mode"] == "eager"
    result = llava.answer(
        videos / "moving.mp4", "What moves?", generation=GenerationOptions(max_new_tokens=3, decode_mode="static")
    )
    assert result.extra["decode_mode"] == "static"
