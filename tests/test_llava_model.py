"""LLaVA-OneVision / LLaVA-Video on tiny random checkpoints: exactness of the compression path,
format equivalence, an independent check against transformers, batching and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llava.model.compression import CompressionSpec, register_compressor
from llava.model.families import LlavaVideoLLM
from llava.model.lm_driver import LMInputs as BatchInputs
from llava.model.loading import build_random, load_llava
from llava.model.prompt import split_prompt
from llava.model.tiny import tiny_lmms_lab_config, write_tiny_llava
from llava.model.vidcom2 import VidCom2Config, vidcom2_keep_indices
from llava.runtime import FrameSampling, GenerationOptions
from llava.synthetic_videos import make_videos
from llava.video_io import VideoReadError, read_video

FRAMES = FrameSampling(num_frames=6)
GEN = GenerationOptions(max_new_tokens=6)
QUESTION = "What moves?"

try:  # a compressor that keeps every token but is not short-circuited as the identity
    register_compressor("test_keep_all")(lambda feats, r, opts: torch.arange(feats.shape[0] * feats.shape[1]))
except ValueError:
    pass


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "ov": write_tiny_llava(root / "ov", arch="llava_ov", seed=7),
        "ov_hf": write_tiny_llava(root / "ov_hf", arch="llava_ov", seed=7, fmt="hf"),
        "vid": write_tiny_llava(root / "vid", arch="llava_vid", seed=7),
    }


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_videos(out, seed=1)
    return out


def adapter(path: Path, **kw) -> LlavaVideoLLM:
    model, tokenizer, _ = load_llava(path, **kw)
    return LlavaVideoLLM(model, tokenizer)


def lm_inputs(llm: LlavaVideoLLM, video: Path, compression: CompressionSpec, question: str = QUESTION) -> BatchInputs:
    """The exact LM inputs of one request, via the adapter's own stages."""
    from llava.runtime import StageTimer

    block, _ = llm.video_block(video, compression, FRAMES, StageTimer())
    before, after = split_prompt(llm.tokenizer, question, llm.model.spec.placeholder)
    return llm.model.build_inputs([(before, block, after)], llm.position_mode)


@torch.inference_mode()
def logits_of(llm: LlavaVideoLLM, batch: BatchInputs) -> torch.Tensor:
    return llm.model.language_model(
        inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits


@pytest.mark.parametrize("name", ["ov", "vid"])
def test_keep_everything_equals_uncompressed(ckpts: dict[str, Path], videos: Path, name: str) -> None:
    llm = adapter(ckpts[name])
    video = videos / "mixed.mp4"
    base = lm_inputs(llm, video, CompressionSpec())
    for spec in (CompressionSpec("vidcom2", 1.0), CompressionSpec("test_keep_all", 0.5)):
        other = lm_inputs(llm, video, spec)
        assert torch.equal(base.embeds, other.embeds) and torch.equal(base.position_ids, other.position_ids)
    a = llm.answer(video, QUESTION, sampling=FRAMES, generation=GEN)
    b = llm.answer(video, QUESTION, compression=CompressionSpec("test_keep_all", 0.5), sampling=FRAMES, generation=GEN)
    assert a.output_ids == b.output_ids and a.answer == b.answer
    assert a.visual_tokens_before == a.visual_tokens_after == b.visual_tokens_after
    # the uncompressed block sizes of the real layouts: OV 6*16 + 1, LLaVA-Video 6 * 3 * (3 + 1)
    assert a.visual_tokens_before == {"ov": 6 * 16 + 1, "vid": 6 * 3 * 4}[name]


def test_lmms_lab_and_hf_formats_give_the_same_logits(ckpts: dict[str, Path], videos: Path) -> None:
    a, b = adapter(ckpts["ov"]), adapter(ckpts["ov_hf"])
    for spec in (CompressionSpec(), CompressionSpec("vidcom2", 0.25)):
        la = logits_of(a, lm_inputs(a, videos / "scene_cut.mp4", spec))
        lb = logits_of(b, lm_inputs(b, videos / "scene_cut.mp4", spec))
        assert la.shape == lb.shape
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)


def test_ov_matches_transformers_llava_onevision(ckpts: dict[str, Path], videos: Path) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    ours = adapter(ckpts["ov_hf"])
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(str(ckpts["ov_hf"]), attn_implementation="sdpa").eval()
    clip = read_video(videos / "moving.mp4", FRAMES)
    pixels = ours.model.preprocess(clip.frames)
    before, after = split_prompt(ours.tokenizer, QUESTION, "<video>")
    n_video = clip.num_frames * 16 + 1
    ids = torch.tensor([before + [ref.config.video_token_index] * n_video + after])
    with torch.inference_mode():
        expected = ref(input_ids=ids, pixel_values_videos=pixels[None], attention_mask=torch.ones_like(ids)).logits
    got = logits_of(ours, lm_inputs(ours, videos / "moving.mp4", CompressionSpec()))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the model really depends on the video (the check could fail)
    other = logits_of(ours, lm_inputs(ours, videos / "static.mp4", CompressionSpec()))
    assert not torch.allclose(other, expected, atol=1e-3)


@pytest.mark.parametrize("name", ["ov", "vid"])
def test_llm_receives_exactly_the_kept_tokens(ckpts: dict[str, Path], videos: Path, name: str) -> None:
    llm = adapter(ckpts[name])
    model = llm.model
    video = videos / "mixed.mp4"
    spec = CompressionSpec("vidcom2", 0.25)
    # hand-built: our own encode, the core's kept indices, the documented newline layout
    clip = read_video(video, FRAMES)
    with torch.inference_mode():
        feats = model.encode_video(model.preprocess(clip.frames))
        frames, h, w, dim = feats.shape
        flat = feats.reshape(frames, h * w, dim)
        kept = vidcom2_keep_indices(flat, 0.25, VidCom2Config())
        tokens = flat.reshape(-1, dim)
        pieces = []
        if name == "ov":
            pieces = [tokens[kept], model.image_newline[None]]
        else:  # grid checkpoint, default grid_newlines="frame": one newline after each frame's kept tokens
            for f in range(frames):
                mine = kept[(kept // (h * w)) == f]
                pieces += [tokens[mine], model.image_newline[None]]
        before, after = split_prompt(llm.tokenizer, QUESTION, model.spec.placeholder)
        embed = model.language_model.get_input_embeddings()
        seq = torch.cat([embed(torch.tensor(before)), *pieces, embed(torch.tensor(after))])[None]
        expected = model.language_model(inputs_embeds=seq).logits
    captured: list[torch.Tensor] = []
    hook = model.language_model.model.layers[0].register_forward_pre_hook(  # what the first layer receives
        lambda mod, args: captured.append(args[0])
    )
    try:
        result = llm.answer(video, QUESTION, compression=spec, sampling=FRAMES, generation=GEN)
    finally:
        hook.remove()
    assert torch.equal(captured[0], seq)
    torch.testing.assert_close(logits_of(llm, lm_inputs(llm, video, spec)), expected, rtol=0, atol=1e-5)
    assert result.extra["video_tokens_kept"] == kept.numel()
    assert result.visual_tokens_after == seq.shape[1] - len(before) - len(after)
    assert result.extra["achieved_retention_without_newlines"] == pytest.approx(kept.numel() / (frames * h * w))


@pytest.mark.parametrize("name", ["ov", "vid"])
def test_batch_of_two_equals_two_single_runs(ckpts: dict[str, Path], videos: Path, name: str) -> None:
    llm = adapter(ckpts[name])
    spec = CompressionSpec("vidcom2", 0.5)
    vids, questions = [videos / "moving.mp4", videos / "mixed.mp4"], ["What moves?", "Is there a scene cut here?"]
    gen = GenerationOptions(max_new_tokens=8)
    batch = llm.answer_batch(vids, questions, compression=spec, sampling=FRAMES, generation=gen)
    singles = [
        llm.answer(v, q, compression=spec, sampling=FRAMES, generation=gen)
        for v, q in zip(vids, questions, strict=True)
    ]
    assert [r.output_ids for r in batch] == [r.output_ids for r in singles]
    assert [r.visual_tokens_after for r in batch] == [r.visual_tokens_after for r in singles]
    assert all(r.extra["batch_size"] == 2 for r in batch)


def test_original_positions_continue_from_the_uncompressed_length(ckpts: dict[str, Path], videos: Path) -> None:
    llm = adapter(ckpts["vid"])
    llm.position_mode = "original"
    full = lm_inputs(llm, videos / "mixed.mp4", CompressionSpec())
    pruned = lm_inputs(llm, videos / "mixed.mp4", CompressionSpec("vidcom2", 0.25))
    assert pruned.embeds.shape[1] < full.embeds.shape[1]
    assert int(pruned.next_position[0, 0]) == int(full.next_position[0, 0]) == full.embeds.shape[1]
    assert pruned.position_ids[0, -1] == full.position_ids[0, -1]
    assert torch.all(pruned.position_ids[0, 1:] > pruned.position_ids[0, :-1])


def test_generation_options(ckpts: dict[str, Path], videos: Path) -> None:
    llm = adapter(ckpts["ov"])
    video = videos / "moving.mp4"
    sampled = [
        llm.answer(video, QUESTION, sampling=FRAMES, generation=GenerationOptions(8, do_sample=True, seed=5))
        for _ in range(2)
    ]
    assert sampled[0].output_ids == sampled[1].output_ids
    greedy = llm.answer(video, QUESTION, sampling=FRAMES, generation=GenerationOptions(8))
    stop = greedy.answer[2:3]
    cut = llm.answer(video, QUESTION, sampling=FRAMES, generation=GenerationOptions(8, stop=(stop,)))
    assert cut.answer == greedy.answer[: greedy.answer.index(stop)]
    assert set(greedy.timings) == {"read_video", "preprocess", "vision", "compress", "prefill", "decode"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(ckpts: dict[str, Path], videos: Path, dtype: str) -> None:
    llm = adapter(ckpts["vid"], dtype=dtype)
    assert llm.model.dtype == getattr(torch, dtype)
    result = llm.answer(
        videos / "moving.mp4", QUESTION, compression=CompressionSpec("vidcom2", 0.25), sampling=FRAMES, generation=GEN
    )
    assert 0 < result.visual_tokens_after < result.visual_tokens_before


def test_frames_array_and_image_inputs(ckpts: dict[str, Path], videos: Path) -> None:
    llm = adapter(ckpts["ov"])
    clip = read_video(videos / "moving.mp4", FRAMES)
    from_path = llm.answer(videos / "moving.mp4", QUESTION, sampling=FRAMES, generation=GEN)
    from_array = llm.answer(clip.frames, QUESTION, generation=GEN)
    assert from_path.output_ids == from_array.output_ids
    from PIL import Image

    Image.fromarray(clip.frames[0]).save(videos / "still.png")
    image = llm.answer_image(videos / "still.png", QUESTION, generation=GEN)
    assert image.visual_tokens_before == image.visual_tokens_after == 7 * 7 + 1  # unpooled, uncompressed


def test_family_default_sampling(ckpts: dict[str, Path], videos: Path) -> None:
    ov, vid = adapter(ckpts["ov"]), adapter(ckpts["vid"])
    assert ov.answer(videos / "mixed.mp4", QUESTION, generation=GEN).extra["frames"] == 32
    assert vid.answer(videos / "mixed.mp4", QUESTION, generation=GEN).extra["frames"] == 64


def test_errors_name_the_problem(ckpts: dict[str, Path], tmp_path: Path) -> None:
    llm = adapter(ckpts["ov"])
    with pytest.raises(VideoReadError, match="missing.mp4"):
        llm.answer(tmp_path / "missing.mp4", QUESTION)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(VideoReadError, match="broken.mp4"):
        llm.answer(bad, QUESTION)
    with pytest.raises(VideoReadError, match="missing.mp4"):  # batch videos are read in parallel
        llm.answer_batch([np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "missing.mp4", bad], [QUESTION] * 3)
    empty = tmp_path / "empty_frames"
    empty.mkdir()
    with pytest.raises(VideoReadError, match="empty_frames"):
        llm.answer(empty, QUESTION)
    with pytest.raises(ValueError, match="unknown compressor 'no_such_method'"):
        CompressionSpec("no_such_method", 0.25)
    with pytest.raises(ValueError, match="placeholders"):
        llm.answer(np.zeros((2, 8, 8, 3), np.uint8), "<image> and <image>")
    with pytest.raises(ValueError, match="llava_ov"):
        write_tiny_llava(tmp_path / "x", arch="llava_vid", fmt="hf")
    vid = adapter(ckpts["vid"])
    for model, grid_newlines in ((llm.model, "frame"), (vid.model, "frame"), (vid.model, "all_rows")):
        features = torch.randn(2, 3, 3, model.spec.text_config.hidden_size)
        features[1, 0, 2, 0] = float("nan")
        with pytest.raises(ValueError, match=r"vidcom2@0.5 kept no video token: features contain NaN"):
            model.compress_video(features, CompressionSpec("vidcom2", 0.5), grid_newlines)


@pytest.mark.parametrize("name,grid_newlines", [("ov", "frame"), ("vid", "frame"), ("vid", "all_rows")])
def test_compressing_videos_together_equals_one_at_a_time(ckpts: dict[str, Path], name: str, grid_newlines: str):
    model = adapter(ckpts[name]).model
    generator = torch.Generator().manual_seed(0)
    dim = model.spec.text_config.hidden_size
    shapes = [(3, 4, 4), (2, 4, 4), (3, 4, 4)]  # two share a shape (one selection launch), one does not
    features = [torch.randn(*shape, dim, generator=generator) * (1 + i) for i, shape in enumerate(shapes)]
    for spec in (CompressionSpec("vidcom2", 0.3), CompressionSpec("uniform", 0.3), CompressionSpec()):
        together = model.compress_videos(features, spec, grid_newlines)
        for feats, block in zip(features, together, strict=True):
            alone = model.compress_video(feats, spec, grid_newlines)
            assert torch.equal(block.layout.source, alone.layout.source)
            assert torch.equal(block.layout.original_offsets, alone.layout.original_offsets)
            assert torch.equal(block.embeds, alone.embeds)
    bad = [f.clone() for f in features]
    bad[2][0, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"video 2 of 3: vidcom2@0.3 kept no video token"):
        model.compress_videos(bad, CompressionSpec("vidcom2", 0.3), grid_newlines)


def test_adapter_template_and_pool_mode_override(ckpts: dict[str, Path], videos: Path) -> None:
    """What the lmms-eval wrapper checks (conv_template) and sets (mm_spatial_pool_mode) on the adapter."""
    llm = adapter(ckpts["ov"])
    assert llm.conv_template == "qwen_1_5" and llm.mm_spatial_pool_mode == "bilinear"
    pixels = llm.model.preprocess(read_video(videos / "mixed.mp4", FRAMES).frames)
    with torch.inference_mode():
        bilinear = llm.model.encode_video(pixels)
        llm.mm_spatial_pool_mode = "average"
        average = llm.model.encode_video(pixels)
    assert llm.model.spec.pool_mode == "average" and not torch.equal(bilinear, average)
    with pytest.raises(ValueError, match="mm_spatial_pool_mode='mean'"):
        llm.mm_spatial_pool_mode = "mean"


def test_same_seed_same_weights_and_build_random() -> None:
    from llava.model.llava_config import parse_spec

    spec = parse_spec(tiny_lmms_lab_config("llava_vid"))
    a, b = build_random(spec, seed=3), build_random(spec, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert spec.family == "llava_video" and spec.vision_layers == 2


def test_real_7b_configs_parse_without_network() -> None:
    """The published lmms-lab OV config (trimmed) and our LLaVA-Video reference: family and tower."""
    from llava.model.families import _detect
    from llava.model.llava_config import parse_spec, reference_config

    ov = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "mm_newline_position": "one_token",
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
        "use_sliding_window": False, "vocab_size": 152064, "mm_hidden_size": 1152, "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": "bilinear", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "image_aspect_ratio": "anyres_max_9",
    }  # fmt: skip
    spec = parse_spec(ov)
    assert (spec.family, spec.vision_layers, spec.grid_size, spec.pool_mode) == ("llava_onevision", 26, 27, "bilinear")
    assert spec.text_config.rope_parameters["rope_theta"] == 1e6 and spec.text_config.hidden_size == 3584
    assert _detect("llava_onevision")(ov) and not _detect("llava_video")(ov)
    vid = reference_config("llava_vid_7b")
    assert _detect("llava_video")(vid) and not _detect("llava_onevision")(vid)
    assert parse_spec(vid).newline_position == "grid"
    assert _detect("llava_onevision")({"model_type": "llava_onevision"})
    with pytest.raises(ValueError, match="mm_vision_tower"):
        parse_spec({**ov, "mm_vision_tower": "org/unknown-tower"})
