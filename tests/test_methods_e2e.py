"""Every pre-LLM method on every tiny checkpoint: runs, batches like single runs, splices merged tokens
at their sources (LLaVA blocks, Qwen positions and logits against hand-built references), and refuses
unsupported pairs before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from driver_calls import qwen_prefill

from llava.families_index import load_video_llm, tiny_builders
from llava.model.compression import CompressionSpec
from llava.model.method_api import VideoTokens
from llava.runtime import FrameSampling, GenerationOptions
from transformers_patched import qwen_stages as stages
from transformers_patched.qwen_adapter import video_question_messages
from transformers_patched.qwen_vit_signals import per_video, vision_signals

FAMILIES = ["llava_ov", "llava_vid", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# "name:static": the method's static-shape execution (a padded selection, spliced by the registry), which
# CUDA runs compiled by default; on the CPU the default is eager
METHODS = ["visionzip", "dycoke", "fastvid", "holitom", "fastvid:static", "holitom:static"]
MERGING = ["visionzip", "fastvid", "holitom", "fastvid:static", "holitom:static"]
FRAMES = FrameSampling(num_frames=8)
GEN = GenerationOptions(max_new_tokens=4)
# DyCoke keeps whole anchor frames: with 8 frames (Qwen: 4 temporal patches) its floor is 0.5
RETENTION = {"dycoke": 0.6}


def spec_of(method: str) -> CompressionSpec:
    name, _, execution = method.partition(":")
    options = {f"{name}.execution": execution} if execution else {}
    return CompressionSpec(name, RETENTION.get(name, 0.25), options)


@pytest.fixture(scope="module", params=FAMILIES)
def llm(request, tmp_path_factory, siglip_head):
    path = tiny_builders()[request.param](tmp_path_factory.mktemp(request.param), seed=1)
    model = load_video_llm(path)
    if hasattr(model, "load_vision_head"):
        model.load_vision_head(siglip_head)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_family(llm, videos: Path, method: str) -> None:
    result = llm.answer(videos / "mixed.mp4", "What happens?", compression=spec_of(method), generation=GEN,
                        sampling=FRAMES)
    assert 0 < result.visual_tokens_after < result.visual_tokens_before
    assert result.extra["compression"].startswith(method.partition(":")[0])
    assert 0 < result.achieved_retention < 1


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_equals_two_single_runs(llm, videos: Path, method: str) -> None:
    spec = spec_of(method)
    clips, questions = [videos / "moving.mp4", videos / "mixed.mp4"], ["What moves?", "Is there a cut?"]
    if hasattr(llm, "answer_batch"):
        batch = llm.answer_batch(clips, questions, compression=spec, generation=GEN, sampling=FRAMES)
    else:
        messages = [video_question_messages(c, q) for c, q in zip(clips, questions, strict=True)]
        batch = llm.answer_messages(messages, compression=spec, generation=GEN, sampling=FRAMES)
    pairs = zip(clips, questions, strict=True)
    singles = [llm.answer(c, q, compression=spec, generation=GEN, sampling=FRAMES) for c, q in pairs]
    assert [r.visual_tokens_after for r in batch] == [r.visual_tokens_after for r in singles]
    assert [r.output_ids for r in batch] == [r.output_ids for r in singles]


# ------------------------------------------------------------------------------------ LLaVA splice


@pytest.mark.parametrize("method", MERGING)
def test_llava_block_is_the_merged_table_at_the_sources(llm, videos: Path, method: str) -> None:
    """One_token / grid blocks: the output tokens are the method's values at its sources, in video order."""
    if not llm.family.startswith("llava"):
        pytest.skip("LLaVA families only")
    from llava.video_io import read_video

    spec = spec_of(method)
    model = llm.model
    pixels = model.preprocess(read_video(videos / "mixed.mp4", FRAMES).frames)
    with torch.inference_mode():
        features, signals = model.encode_video_with_signals(pixels, spec.signals)
        block = model.compress_videos([features], spec, "frame", [signals])[0]
        f, h, w, d = features.shape
        [choice] = spec.select_videos([VideoTokens(features.flatten(1, 2), (f, h, w), signals, llm.family)])
    assert choice.table is not None
    tokens = block.layout.source < f * h * w
    sources = choice.mask.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(block.layout.source[tokens], sources)
    torch.testing.assert_close(block.embeds[tokens], choice.table[sources].to(block.embeds.dtype))
    newline = model.image_newline.to(block.embeds.dtype)
    assert torch.equal(block.embeds[~tokens], newline.expand(int((~tokens).sum()), -1))


# ------------------------------------------------------------------------------------ Qwen splice


@pytest.mark.parametrize("method", MERGING)
def test_qwen_merged_tokens_take_their_sources_positions(llm, videos: Path, method: str) -> None:
    """Prefill = a hand-built forward: the stock sequence with each video row replaced by the method's
    value at its source, kept at the sources, with the stock M-RoPE positions gathered there."""
    if llm.family.startswith("llava"):
        pytest.skip("Qwen families only")
    from test_qwen_vl import reference_logits, stock_lm_kwargs

    spec = spec_of(method)
    model = llm.model
    inputs = llm.prepare([video_question_messages(videos / "mixed.mp4", "What?")], FRAMES).inputs
    vision = stages.encode_vision(model, inputs, spec.signals)
    keep_flags = stages.select_video_tokens(model, inputs, vision, spec)
    prepared = stages.build_prefill(model, inputs, vision, keep_flags)
    logits = qwen_prefill(model, prepared).logits

    # reference: the stock forward's LM inputs, and the method run on the stock tower output
    lm = stock_lm_kwargs(model, inputs)
    (embeds, _, grid), stats = vision_signals(model, inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                              sorted(spec.signals))
    m = model.config.vision_config.spatial_merge_size
    tokens = [
        VideoTokens(e.reshape(t, h * w // m**2, -1), (t, h // m, w // m), sig, llm.family)
        for e, (t, h, w), sig in zip(embeds, grid, per_video(stats), strict=True)
    ]
    [choice] = spec.select_videos(tokens)
    video = inputs["input_ids"][0] == model.config.video_token_id
    lm["inputs_embeds"] = lm["inputs_embeds"].clone()
    lm["inputs_embeds"][0, video] = choice.table.to(lm["inputs_embeds"].dtype)
    keep = torch.ones_like(video)
    keep[video] = choice.mask.reshape(-1)
    expected = reference_logits(model, lm, keep, [])
    torch.testing.assert_close(logits[0], expected.float(), rtol=1e-4, atol=1e-4)
    stock = lm["position_ids"][1:] if lm["position_ids"].shape[0] == 4 else lm["position_ids"]
    assert torch.equal(prepared.position_ids[1:, 0], stock[:, 0, keep])


# ------------------------------------------------------------------------------------ errors, CLI


def test_fastvid_on_llava_without_the_head_fails_before_reading(tmp_path: Path) -> None:
    llm = load_video_llm(tiny_builders()["llava_ov"](tmp_path / "ov", seed=0))
    with pytest.raises(ValueError, match=r"'fastvid' needs the signal\(s\) \['frame_global', 'frame_salience'\], "
                       r"which model family 'llava_onevision' cannot supply.*--vision-head DIR"):
        llm.answer(tmp_path / "missing.mp4", "q", compression=CompressionSpec("fastvid", 0.25))


def test_dycoke_below_its_floor_names_the_floor(tmp_path: Path, videos: Path) -> None:
    llm = load_video_llm(tiny_builders()["qwen2_vl"](tmp_path / "q", seed=0))
    with pytest.raises(ValueError, match=r"R must be >= 2/4 = 0.500 at F = 4"):
        llm.answer(videos / "mixed.mp4", "q", compression=CompressionSpec("dycoke", 0.3), sampling=FRAMES)


@pytest.mark.parametrize("arch", ["llava_ov", "qwen2_5_vl"])
@pytest.mark.parametrize("method", METHODS)
def test_cli_infer_every_method(tmp_path: Path, videos: Path, siglip_head: Path, capsys, arch: str, method: str):
    from llava.cli import main

    path = tiny_builders()[arch](tmp_path / arch, seed=0)
    argv = ["infer", "--model", str(path), "--video", str(videos / "mixed.mp4"), "--question", "What?", "--json"]
    name, _, execution = method.partition(":")
    argv += ["--compressor", name, "--retention", str(RETENTION.get(name, 0.25)), "--frames", "8"]
    option = f"{name}.execution={execution}" if execution else "port=original"
    argv += ["--max-new-tokens", "2", "--option", f"{name}.seed=1" if method in ("fastvid", "holitom") else option]
    if arch.startswith("llava"):
        argv += ["--vision-head", str(siglip_head)]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < data["visual_tokens_after"] < data["visual_tokens_before"]
    assert data["extra"]["compression"].startswith(name)


def test_lmms_model_args_reach_the_method_under_its_name() -> None:
    from vidcom2_lmms_eval.args import parse_model_args

    args = {"pretrained": "x", "compressor": "visionzip", "retention": "0.25", "visionzip.dominant_ratio": "0.6",
            "vision_head": "/siglip"}
    settings = parse_model_args("llava_onevision", args, environ={})
    assert settings.compression.config.dominant_ratio == 0.6 and settings.vision_head == "/siglip"
    with pytest.raises(ValueError, match="option 'holitom.tau' is a 'holitom' knob, but the compressor is 'visionzip'"):
        parse_model_args("llava_onevision", {**args, "holitom.tau": "0.7"}, environ={})
    with pytest.raises(ValueError, match=r"unknown visionzip option\(s\) \['dominant'\]"):
        parse_model_args("llava_onevision", {**args, "visionzip.dominant": "0.6"}, environ={})


@pytest.mark.parametrize("method", ["visionzip", "holitom"])
def test_non_finite_signals_fail_loudly_in_the_adapter(llm, videos: Path, method: str) -> None:
    """The methods check their inputs on the device; the adapter's one count read raises, naming the cause."""
    if not llm.family.startswith("llava"):
        pytest.skip("LLaVA families only (Qwen shares the registry's check, tests/test_method_protocol.py)")
    from llava.video_io import read_video

    spec = spec_of(method)
    pixels = llm.model.preprocess(read_video(videos / "mixed.mp4", FRAMES).frames)
    with torch.inference_mode():
        features, signals = llm.model.encode_video_with_signals(pixels, spec.signals)
        signals = {name: torch.full_like(value, float("nan")) for name, value in signals.items()}
        with pytest.raises(ValueError, match="NaN or Inf"):
            llm.model.compress_videos([features], spec, "frame", [signals])
