"""The kept-token replay and picture: what they report is what the model runs, groups are the methods' own,
and a method that cannot run says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava.event_task import EventVideo, event_token_mask, make_event_videos, read_manifest
from llava.families_index import load_video_llm, tiny_builders
from llava.kept_tokens import DROPPED, encode_video, kept_tokens
from llava.model.compression import CompressionSpec
from llava.runtime import FrameSampling, GenerationOptions

EIGHT = FrameSampling(num_frames=8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("event_videos")
    make_event_videos(out, count=2, seed=5)
    return out


@pytest.fixture(scope="module", params=["llava_ov", "qwen2_vl"])
def llm(request, tmp_path_factory):
    return load_video_llm(tiny_builders()[request.param](tmp_path_factory.mktemp(request.param), seed=1))


@pytest.mark.parametrize("method", ["vidcom2", "visionzip", "holitom"])
def test_replay_keeps_what_the_model_keeps(llm, videos: Path, method: str) -> None:
    spec = CompressionSpec(method, 0.25)
    video = videos / read_manifest(videos)[0].path
    encoded = encode_video(llm, video, EIGHT, spec.signals)
    row = kept_tokens(llm, encoded, spec)
    result = llm.answer(video, "Which colour?", compression=spec, generation=GenerationOptions(max_new_tokens=1),
                        sampling=EIGHT)
    kept = result.extra.get("video_tokens_kept", result.visual_tokens_after)
    assert not row.error and int(row.kept.sum()) == kept and row.kept.size == encoded.tokens.features.shape[:2].numel()


def test_qwen_token_frames_are_temporal_patches_of_two_frames(videos: Path, tmp_path: Path) -> None:
    llm = load_video_llm(tiny_builders()["qwen2_5_vl"](tmp_path / "q", seed=1))
    encoded = encode_video(llm, videos / read_manifest(videos)[0].path, EIGHT)
    # 16-frame video, 8 uniform samples (0, 2, ..., 12, 15) paired into 4 temporal patches
    assert encoded.frame_groups == [[0, 2], [4, 6], [8, 10], [12, 15]]
    assert encoded.pictures.shape[0] == encoded.tokens.grid[0] == 4


def test_visionzip_groups_rebuild_its_merged_values(tmp_path: Path) -> None:
    """Contextual token = target + mean of its members: recomputed from the reported groups."""
    torch.manual_seed(0)
    from llava.kept_tokens import EncodedVideo
    from llava.model.method_api import VideoTokens

    features = torch.randn(3, 16, 8)
    signals = {"vit_received_attention": torch.rand(3, 16), "vit_keys": torch.randn(3, 16, 4)}
    tokens = VideoTokens(features, (3, 4, 4), signals, "llava_onevision")
    spec = CompressionSpec("visionzip", 0.25)

    class Model:
        family, supplied_signals = "llava_onevision", frozenset(signals)

    row = kept_tokens(Model(), EncodedVideo(tokens, np.zeros((3, 8, 8, 3), np.uint8), [[0], [1], [2]], ""), spec)
    [choice] = spec.select_videos([tokens])
    group, kept, flat = row.group.reshape(-1), row.kept.reshape(-1), features.reshape(48, 8)
    sources = np.flatnonzero(kept)
    assert row.merged.sum() == 3 and (group != DROPPED).all()  # one contextual token per frame; all tokens used
    for k in np.flatnonzero(row.merged):
        source = sources[k]
        members = [j for j in np.flatnonzero(group == k) if j != source]
        expected = flat[source] + flat[members].mean(dim=0)
        torch.testing.assert_close(choice.table[source], expected)
        assert len(members) == 16 - 4  # S = 4 per frame: 3 dominant, 1 contextual holding the other 12
    for k in np.flatnonzero(~row.merged):
        assert np.flatnonzero(group == k).tolist() == [sources[k]]  # a dominant token reaches only itself


def test_select_only_groups_and_budgets(videos: Path, tmp_path: Path) -> None:
    llm = load_video_llm(tiny_builders()["llava_ov"](tmp_path / "ov", seed=1))
    encoded = encode_video(llm, videos / read_manifest(videos)[0].path, EIGHT)
    row = kept_tokens(llm, encoded, CompressionSpec("uniform", 0.25))
    assert row.per_frame.tolist() == [4] * 8 and row.achieved_retention == 0.25 and not row.merged.any()
    assert (row.group[row.kept] == np.arange(32)).all() and (row.group[~row.kept] == DROPPED).all()


def test_methods_that_cannot_run_say_why(videos: Path, tmp_path: Path) -> None:
    llm = load_video_llm(tiny_builders()["llava_ov"](tmp_path / "ov", seed=1))
    encoded = encode_video(llm, videos / read_manifest(videos)[0].path, EIGHT)
    fastvid = kept_tokens(llm, encoded, CompressionSpec("fastvid", 0.25))
    dycoke = kept_tokens(llm, encoded, CompressionSpec("dycoke", 0.25))
    assert "--vision-head" in fastvid.error and fastvid.kept.size == 0
    assert "R must be >= 3/8" in dycoke.error


def test_event_token_mask_from_the_box() -> None:
    video = EventVideo("v", "v.mp4", 112, 112, 8, 16, start=4, length=2, colour="red", box=(20, 60, 36, 76))
    mask = event_token_mask(video, [[0], [4], [5], [15]], (4, 4))
    # cells of 28 px: x 20-36 spans columns 0 and 1, y 60-76 spans row 2 only
    expected = np.zeros((4, 4), bool)
    expected[2, 0:2] = True
    assert not mask[0].any() and (mask[1] == expected).all() and (mask[2] == expected).all() and not mask[3].any()
    assert event_token_mask(video, [[2, 3], [4, 5]], (7, 7))[1].sum() == 4  # 16 px cells: 2 x 2 (touching edges)


def test_visualize_cli_draws_one_row_per_method(videos: Path, tmp_path: Path, capsys) -> None:
    from llava.cli import main

    model = tiny_builders()["llava_ov"](tmp_path / "ov", seed=1)
    video = videos / read_manifest(videos)[0].path
    base = ["visualize", "--model", str(model), "--video", str(video)]
    assert main([*base, "--compressor", "vidcom2", "--out", str(tmp_path / "one.png")]) == 0
    assert main([*base, "--compressors", "none,vidcom2,fastvid", "--out", str(tmp_path / "grid.png")]) == 0
    assert "cannot run" in capsys.readouterr().err
    small, large = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "grid.png")
    assert small.width == large.width and 1.8 * small.height < large.height < 2.5 * small.height  # + 1 row, 1 short
    assert main([*base, "--compressor", "fastvid", "--out", str(tmp_path / "f.png")]) == 2
    assert "vision-head" in capsys.readouterr().err
