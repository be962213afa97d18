"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL with VidCom2, on tiny random checkpoints (CPU, offline).

References are built independently of our stages: the stock transformers forward / generate, and a
hand-built LM forward over the kept embeddings with gathered positions captured from the stock forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from driver_calls import qwen_generate, qwen_prefill, qwen_step
from transformers import AutoModelForImageTextToText

from llava.families_index import load_video_llm
from llava.model.compression import CompressionSpec
from llava.runtime import FrameSampling, GenerationOptions
from llava.video_io import VideoReadError, read_video
from transformers_patched import qwen_stages as stages
from transformers_patched.qwen_adapter import QwenVideoLLM, video_question_messages
from transformers_patched.qwen_arch import build_random_model, full_size_config
from transformers_patched.qwen_bench import synthetic_video_inputs
from transformers_patched.qwen_tiny import build_tiny_qwen, full_size_processor

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FRAMES = FrameSampling(num_frames=8)
VIDCOM2 = CompressionSpec("vidcom2", 0.25)
GREEDY = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module", params=ARCHS)
def qwen(request, tmp_path_factory) -> QwenVideoLLM:
    path = build_tiny_qwen(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    llm = load_video_llm(path)
    llm.path = path  # for tests that load a second copy
    return llm


def conversation(videos: Path, question: str, *items: str) -> list[dict]:
    """One user turn: the named videos / an image, then the question."""
    content = []
    for item in items:
        if item == "image":
            content.append(
                {"type": "image", "image": read_video(videos / "frames", FrameSampling(num_frames=1)).frames[0]}
            )
        else:
            content.append({"type": "video", "video": read_video(videos / item, FRAMES)})
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def run_stages(llm: QwenVideoLLM, inputs: dict, spec: CompressionSpec, options: GenerationOptions = GREEDY):
    vision = stages.encode_vision(llm.model, inputs)
    kept = stages.select_video_tokens(llm.model, inputs, vision, spec)
    prepared = stages.build_prefill(llm.model, inputs, vision, kept)
    ids, logits = qwen_generate(llm.model, prepared, options)
    return ids, logits, prepared


def decode_logits(llm: QwenVideoLLM, prepared, ids: torch.Tensor) -> torch.Tensor:
    """(steps, B, V) logits of the prefill and every decode step, feeding ``ids`` (teacher forcing)."""
    state = qwen_prefill(llm.model, prepared)
    out = [state.logits]
    for step in range(ids.shape[1] - 1):
        out.append(qwen_step(llm.model, state, ids[:, step]))
    return torch.stack(out)


def stock_lm_kwargs(model, inputs: dict) -> dict:
    """What the stock forward hands the language model (full sequence, stock M-RoPE positions)."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured


def reference_keep(model, inputs: dict, spec: CompressionSpec) -> torch.Tensor:
    """(L,) kept tokens of a one-row batch, from the compressor applied to each stock video feature."""
    feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    merge = model.config.vision_config.spatial_merge_size
    flags = []
    for feat, (t, h, w) in zip(feats, inputs["video_grid_thw"].tolist(), strict=True):
        per_frame = h * w // merge**2
        flag = torch.zeros(t * per_frame, dtype=torch.bool)
        flag[spec.keep_indices(feat.reshape(t, per_frame, -1))] = True
        flags.append(flag)
    input_ids = inputs["input_ids"][0]
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[input_ids == model.config.video_token_id] = torch.cat(flags)
    return keep


def reference_logits(model, lm: dict, keep: torch.Tensor, new_tokens: list[int], renumber: bool = False):
    """Hand-built forward, no cache: kept embeddings + gathered positions, then the generated tokens at
    positions last prompt position + 1, + 2, ... Returns the last logits (V,)."""
    embeds = lm["inputs_embeds"][0, keep]
    positions = lm["position_ids"]
    positions = (positions[1:] if positions.shape[0] == 4 else positions)[:, 0, keep]  # (3, K)
    if renumber:  # the naive layout: kept tokens renumbered 0..K-1 (must NOT match)
        positions = torch.arange(positions.shape[1])[None].expand(3, -1)
    if new_tokens:
        tokens = torch.tensor(new_tokens)
        embeds = torch.cat([embeds, model.get_input_embeddings()(tokens)])
        steps = positions[:, -1:] + 1 + torch.arange(len(new_tokens))[None]
        positions = torch.cat([positions, steps], dim=1)
    extra = {}
    if lm.get("visual_pos_masks") is not None:
        visual = lm["visual_pos_masks"][0]
        mask = torch.cat([visual[keep], torch.zeros(len(new_tokens), dtype=torch.bool)])
        extra = {
            "visual_pos_masks": mask[None],
            "deepstack_visual_embeds": [d[keep[visual]] for d in lm["deepstack_visual_embeds"]],
        }
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=embeds[None],
            position_ids=positions[:, None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),  # explicit: no packed detection
            use_cache=False,
            **extra,
        )
        return model.lm_head(out.last_hidden_state[0, -1]).float()


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("spec", [CompressionSpec(), CompressionSpec("vidcom2", 1.0)], ids=["none", "vidcom2@1"])
def test_keep_all_equals_stock_transformers(qwen, videos, spec):
    convs = [conversation(videos, "What?", "mixed.mp4"), conversation(videos, "Describe it please", "scene_cut.mp4")]
    inputs = qwen.prepare(convs, FRAMES).inputs
    assert inputs["attention_mask"][0].sum() != inputs["attention_mask"][1].sum()  # really padded
    ids, logits, prepared = run_stages(qwen, inputs, spec)
    stock = qwen.model.generate(
        **inputs,
        max_new_tokens=GREEDY.max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(ids, stock.sequences[:, inputs["input_ids"].shape[1] :])
    torch.testing.assert_close(logits, stock.logits[0].float(), atol=1e-5, rtol=1e-5)
    # every decode step, not only the argmax: positions after the prompt must match stock
    state = qwen_prefill(qwen.model, prepared)
    for step in range(ids.shape[1] - 1):
        step_logits = qwen_step(qwen.model, state, ids[:, step])
        torch.testing.assert_close(step_logits, stock.logits[step + 1].float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(prepared.tokens_before, prepared.tokens_after)


def test_compressed_prefill_and_greedy_equal_hand_built_forward(qwen, videos):
    inputs = qwen.prepare([conversation(videos, "What happens?", "mixed.mp4")], FRAMES).inputs
    ids, logits, prepared = run_stages(qwen, inputs, VIDCOM2, GenerationOptions(max_new_tokens=5))
    keep = reference_keep(qwen.model, inputs, VIDCOM2)
    lm = stock_lm_kwargs(qwen.model, inputs)
    assert int(prepared.tokens_after[0]) < int(prepared.tokens_before[0])
    assert int(keep.sum()) == int(prepared.attention_mask.sum())
    expected = reference_logits(qwen.model, lm, keep, [])
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=1e-5)
    # the check can fail: renumbered positions give other logits
    assert not torch.allclose(reference_logits(qwen.model, lm, keep, [], renumber=True), expected, atol=1e-4)
    # greedy decoding, step by step: logits of every decode step against the no-cache reference
    generated = ids[0].tolist()
    state = qwen_prefill(qwen.model, prepared)
    step_logits = state.logits
    for step, token in enumerate(generated):
        expected = reference_logits(qwen.model, lm, keep, generated[:step])
        torch.testing.assert_close(step_logits[0], expected, atol=1e-5, rtol=1e-5, msg=f"decode step {step}")
        assert int(step_logits[0].argmax()) == token, f"step {step}"
        step_logits = qwen_step(qwen.model, state, torch.tensor([token]))


def test_eager_and_sdpa_agree(qwen, videos):
    eager = QwenVideoLLM(
        AutoModelForImageTextToText.from_pretrained(qwen.path, attn_implementation="eager"), qwen.processor
    )
    assert eager.model.config._attn_implementation == "eager"
    convs = [conversation(videos, "What?", "mixed.mp4"), conversation(videos, "Describe it please", "static.mp4")]
    inputs = qwen.prepare(convs, FRAMES).inputs
    ids_s, _, prep_s = run_stages(qwen, inputs, VIDCOM2)
    ids_e, _, prep_e = run_stages(eager, inputs, VIDCOM2)
    assert torch.equal(ids_e, ids_s)
    torch.testing.assert_close(
        decode_logits(eager, prep_e, ids_s), decode_logits(qwen, prep_s, ids_s), atol=1e-4, rtol=1e-4
    )


def test_two_videos_and_an_image_in_one_prompt(qwen, videos):
    conv = conversation(videos, "Compare them.", "mixed.mp4", "image", "scene_cut.mp4")
    inputs = qwen.prepare([conv], FRAMES).inputs
    assert inputs["video_grid_thw"].shape[0] == 2 and inputs["image_grid_thw"].shape[0] == 1
    ids, logits, prepared = run_stages(qwen, inputs, VIDCOM2)
    # each video on its own budget: the kept count of each equals compressing it alone
    vision = stages.encode_vision(qwen.model, inputs)
    counts = stages.video_token_counts(qwen.model, inputs["video_grid_thw"])
    alone = [
        VIDCOM2.keep_indices(e.reshape(f, p, -1)).numel() for e, (f, p) in zip(vision.video_embeds, counts, strict=True)
    ]
    assert int(prepared.tokens_before[0]) == sum(f * p for f, p in counts)
    assert int(prepared.tokens_after[0]) == sum(alone)
    # the image is untouched: all its tokens are in the shortened sequence, with their stock embeddings
    image_rows = (inputs["input_ids"][0] == qwen.model.config.image_token_id).sum()
    packed_image = torch.isin(prepared.inputs_embeds[0], torch.cat(vision.image_embeds)).all(dim=-1).sum()
    assert int(packed_image) == int(image_rows) > 0
    keep = reference_keep(qwen.model, inputs, VIDCOM2)
    expected = reference_logits(qwen.model, stock_lm_kwargs(qwen.model, inputs), keep, [])
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_vision_stage_equals_transformers_and_queues_compression_behind_the_tower(qwen, videos, monkeypatch):
    conv = conversation(videos, "Compare them.", "mixed.mp4", "image", "scene_cut.mp4")
    inputs = qwen.prepare([conv], FRAMES).inputs
    stock_video = qwen.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    stock_image = qwen.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    # host reads of tensor values once the video tower is queued (it runs last, after the image's): each
    # would wait for the whole tower on a GPU
    tower, original, reads = qwen.model.model.visual, qwen.model.model.visual.forward, []
    queued = []

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        queued.append(kwargs)
        return out

    monkeypatch.setattr(tower, "forward", forward)
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):

        def spy(self, *args, _name=name, _read=getattr(torch.Tensor, name), **kwargs):
            if len(queued) == 2:
                reads.append(_name)
            return _read(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    vision = stages.encode_vision(qwen.model, inputs)
    assert len(queued) == 2 and not reads
    # a windowed tower gets its window index on the device (its own would be a host tensor, and the
    # un-permutation of its output would copy it over, waiting for the tower)
    windowed = qwen.model.config.model_type == "qwen2_5_vl"
    for kwargs in queued:
        assert ("window_index" in kwargs) == windowed
        assert not windowed or kwargs["window_index"].device == inputs["pixel_values_videos"].device
    stages.select_video_tokens(qwen.model, inputs, vision, VIDCOM2)
    assert reads == ["tolist"]  # the kept counts, after every selection kernel is queued
    monkeypatch.undo()
    for ours, theirs in ((vision.video_embeds, stock_video), (vision.image_embeds, stock_image)):
        assert len(ours) == len(theirs.pooler_output)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs.pooler_output, strict=True))
    deepstack = getattr(stock_video, "deepstack_features", None)
    assert (vision.video_deepstack is None) == (deepstack is None)
    if deepstack is not None:
        assert all(torch.equal(a, b) for a, b in zip(vision.video_deepstack, deepstack, strict=True))
    assert vision.video_grid == [tuple(row) for row in inputs["video_grid_thw"].tolist()]


def test_batch_of_two_equals_two_single_runs(qwen, videos):
    convs = [conversation(videos, "What?", "mixed.mp4"), conversation(videos, "Tell me more please", "scene_cut.mp4")]
    ids_b, logits_b, prep_b = run_stages(qwen, qwen.prepare(convs, FRAMES).inputs, VIDCOM2)
    assert prep_b.attention_mask.sum(1).unique().numel() == 2  # rows of different lengths: padding
    steps_b = decode_logits(qwen, prep_b, ids_b)
    for row, conv in enumerate(convs):
        ids_1, logits_1, prep_1 = run_stages(qwen, qwen.prepare([conv], FRAMES).inputs, VIDCOM2)
        assert int(prep_b.tokens_after[row]) == int(prep_1.tokens_after[0])
        n = ids_1.shape[1]
        assert ids_b[row, :n].tolist() == ids_1[0].tolist()
        # every step, decode masks included: the padded row must see exactly what the single run sees
        steps_1 = decode_logits(qwen, prep_1, ids_b[row : row + 1, :n])
        torch.testing.assert_close(steps_b[:n, row], steps_1[:, 0], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- adapter API


def test_answer_and_answer_batch_report_tokens_and_timings(qwen, videos):
    result = qwen.answer(videos / "mixed.mp4", "What?", compression=VIDCOM2, generation=GREEDY, sampling=FRAMES)
    assert set(result.timings) >= {"read_video", "preprocess", "vision", "compress", "prefill", "decode"}
    assert 0 < result.visual_tokens_after < result.visual_tokens_before
    assert result.achieved_retention < 0.5
    assert result.extra["frames"] == [8]
    batch = qwen.answer_batch(
        [videos / "mixed.mp4", videos / "static.mp4"],
        ["What?", "Why?"],
        compression=VIDCOM2,
        generation=GREEDY,
        sampling=FRAMES,
    )
    assert batch[0].output_ids == result.output_ids
    assert batch[0].visual_tokens_after == result.visual_tokens_after


def test_sampling_is_seeded_and_stop_strings_cut(qwen, videos):
    options = GenerationOptions(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    first = qwen.answer(videos / "moving.mp4", "Hi", generation=options, sampling=FRAMES)
    again = qwen.answer(videos / "moving.mp4", "Hi", generation=options, sampling=FRAMES)
    assert first.output_ids == again.output_ids
    greedy = qwen.answer(videos / "moving.mp4", "Hi", generation=GenerationOptions(max_new_tokens=8), sampling=FRAMES)
    assert len(greedy.answer) >= 2, "the tiny model should say something"
    stop = greedy.answer[1]
    cut = qwen.answer(
        videos / "moving.mp4", "Hi", generation=GenerationOptions(max_new_tokens=8, stop=(stop,)), sampling=FRAMES
    )
    assert cut.answer == greedy.answer[: greedy.answer.index(stop)]


def test_frame_timing_reaches_the_model(qwen, videos):
    clip = read_video(videos / "mixed.mp4", FrameSampling(num_frames=4))  # 40 frames at 10 fps
    prepared = qwen.prepare([video_question_messages(clip, "When?")], FrameSampling())
    inputs = prepared.inputs
    if qwen.arch.name == "qwen2_5_vl":
        spacing = (clip.timestamps[-1] - clip.timestamps[0]) / 3
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 * spacing])
    if qwen.arch.name == "qwen3_vl":
        text = qwen.processor.tokenizer.decode(inputs["input_ids"][0])
        for first, second in (clip.timestamps[0:2], clip.timestamps[2:4]):
            assert f"<{(first + second) / 2:.1f} seconds>" in text
    # Qwen defaults (2 fps) when the caller sets neither a count nor a rate: 4 s -> 8 frames
    result = qwen.answer(videos / "mixed.mp4", "When?", generation=GenerationOptions(max_new_tokens=1))
    assert result.extra["frames"] == [8]


def test_pixel_budget_changes_the_token_count(qwen, videos):
    small = FrameSampling(num_frames=4, max_pixels=32 * 32)
    large = FrameSampling(num_frames=4, min_pixels=100 * 100, max_pixels=128 * 128)
    grid_small = qwen.prepare([conversation(videos, "q", "mixed.mp4")], small).inputs["video_grid_thw"]
    grid_large = qwen.prepare([conversation(videos, "q", "mixed.mp4")], large).inputs["video_grid_thw"]
    assert grid_small[0, 1:].prod() < grid_large[0, 1:].prod()


def test_preprocess_device_reaches_the_video_processor(qwen, videos, monkeypatch):
    sampling = FrameSampling(num_frames=4)
    default = qwen.prepare([conversation(videos, "q", "mixed.mp4")], sampling).inputs["pixel_values_videos"]
    seen = []
    original = type(qwen.processor.video_processor).preprocess

    def spy(self, videos_in, **kwargs):
        seen.append(kwargs.get("device"))
        return original(self, videos_in, **kwargs)

    monkeypatch.setattr(type(qwen.processor.video_processor), "preprocess", spy)
    monkeypatch.setattr(qwen, "preprocess_device", "cpu")
    moved = qwen.prepare([conversation(videos, "q", "mixed.mp4")], sampling).inputs["pixel_values_videos"]
    assert seen == ["cpu"]
    assert torch.equal(default, moved)


def test_bfloat16_runs(qwen, videos):
    model = AutoModelForImageTextToText.from_pretrained(qwen.path, dtype=torch.bfloat16)
    llm = QwenVideoLLM(model, qwen.processor)
    result = llm.answer(videos / "mixed.mp4", "What?", compression=VIDCOM2, generation=GREEDY, sampling=FRAMES)
    assert result.visual_tokens_after < result.visual_tokens_before and len(result.output_ids) > 0


# --------------------------------------------------------------------------- errors


def test_errors_are_clear(qwen, videos, tmp_path):
    with pytest.raises(ValueError, match="unknown compressor 'fastvv'"):
        CompressionSpec("fastvv", 0.25)
    for retention in (0.0, 1.5):
        with pytest.raises(ValueError, match="retention"):
            CompressionSpec("vidcom2", retention)
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoReadError, match="missing.mp4"):
        qwen.answer(missing, "What?")
    with pytest.raises(VideoReadError, match="missing.mp4"):  # batch videos are read in parallel
        qwen.answer_batch([videos / "mixed.mp4", missing], ["What?", "What?"], sampling=FRAMES)
    with pytest.raises(ValueError, match="2 videos but 1 questions"):
        qwen.answer_batch([videos / "mixed.mp4", videos / "static.mp4"], ["What?"])
    with pytest.raises(TypeError, match="CompressionSpec"):
        qwen.answer(videos / "mixed.mp4", "What?", compression="vidcom2", sampling=FRAMES)
    with pytest.raises(ValueError, match="min_pixels"):
        qwen.answer(
            videos / "mixed.mp4", "What?", sampling=FrameSampling(num_frames=4, min_pixels=10**6, max_pixels=10)
        )
    with pytest.raises(ValueError, match="no 'video'"):
        qwen.answer_messages([[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]])


class EmptySpec(CompressionSpec):
    """A compressor that keeps nothing (a broken plug-in): must fail loudly, not run uncompressed."""

    def keep_indices(self, features: torch.Tensor) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64)


def test_broken_compressor_fails_loudly(qwen, videos):
    with pytest.raises(ValueError, match="compressor 'random' returned"):
        qwen.answer(videos / "mixed.mp4", "What?", compression=EmptySpec("random", 0.5), sampling=FRAMES)


# --------------------------------------------------------------------------- CLI and benchmark hooks


def test_cli_infer_json(qwen, videos, capsys):
    from llava.cli import main

    argv = ["infer", "--model", str(qwen.path), "--video", str(videos / "mixed.mp4"), "--question", "What?"]
    argv += ["--compressor", "vidcom2", "--retention", "0.25", "--frames", "8", "--max-new-tokens", "3", "--json"]
    argv += ["--preprocess-device", "cpu"]  # accepted by the Qwen families (the CUDA path is benchmarked)
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["extra"]["family"] == qwen.family
    assert 0 < data["visual_tokens_after"] < data["visual_tokens_before"]
    assert data["achieved_retention"] == pytest.approx(data["visual_tokens_after"] / data["visual_tokens_before"])


def test_cli_make_tiny(tmp_path, capsys):
    from llava.cli import main

    assert main(["make-tiny", "--arch", "qwen2_5_vl", "--seed", "3", "--out", str(tmp_path / "m")]) == 0
    assert load_video_llm(tmp_path / "m").family == "qwen2_5_vl"


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_architecture_builds_with_random_weights(arch):
    config = full_size_config(arch)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    model = build_random_model(arch, device="meta", dtype="bfloat16")
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx({"qwen2_vl": 8.29, "qwen2_5_vl": 8.29, "qwen3_vl": 8.77}[arch], abs=0.01)


def test_random_model_and_synthetic_inputs_run_every_stage(qwen):
    model = build_random_model(qwen.path, device="cpu", dtype="float32", seed=1)
    patch = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    inputs = synthetic_video_inputs(model, num_frames=4, height=2 * patch, width=3 * patch, batch_size=2)
    llm = QwenVideoLLM(model, qwen.processor)
    ids, logits, prepared = run_stages(llm, inputs, VIDCOM2, GenerationOptions(max_new_tokens=3, ignore_eos=True))
    assert prepared.tokens_before.tolist() == [2 * 2 * 3 * 4 // 4] * 2  # t * (h * w) / merge^2 per row
    assert (prepared.tokens_after < prepared.tokens_before).all() and ids.shape == (2, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_processor_names_its_vision_tokens(arch):
    processor, token_ids = full_size_processor(arch)
    assert token_ids["video_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert set(token_ids) == {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"}
    assert processor.video_processor.patch_size == (16 if arch == "qwen3_vl" else 14)
