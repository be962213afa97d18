"""Shortening a token sequence: packing, keep masks and DeepStack gathering (pure tensors, no model)."""

from __future__ import annotations

import pytest
import torch

from transformers_patched.qwen_sequence import (
    gather_packed,
    joint_visual_features,
    pack_left,
    packed_attention_mask,
    text_positions,
    token_keep_mask,
    video_keep_flags,
)


def test_pack_left_moves_kept_tokens_right_in_order():
    keep = torch.tensor([[False, True, True, False, True], [True, False, False, True, False]])
    index = pack_left(keep)
    values = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    assert index.length == 3
    assert gather_packed(values, index, fill=-1).tolist() == [[11, 12, 14], [-1, 20, 23]]
    assert packed_attention_mask(index, keep.device).tolist() == [[1, 1, 1], [0, 1, 1]]


def test_gather_packed_keeps_trailing_dims():
    keep = torch.tensor([[True, False, True]])
    values = torch.arange(12.0).reshape(1, 3, 4)
    out = gather_packed(values, pack_left(keep))
    assert torch.equal(out, values[:, [0, 2]])


def test_text_positions_run_over_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert text_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_video_keep_flags_concatenate_each_video():
    cpu = torch.device("cpu")
    flags = video_keep_flags([torch.tensor([True, False, True]), torch.tensor([False, True])], [3, 2], cpu)
    assert flags.tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="keep flags for 1 videos but the batch has 2"):
        video_keep_flags([torch.tensor([True, False, True])], [3, 2], cpu)
    with pytest.raises(ValueError, match=r"video 1: keep flags must be \(2,\) bool"):
        video_keep_flags([torch.tensor([True, False, True]), torch.tensor([0, 1])], [3, 2], cpu)


def test_token_keep_mask_drops_padding_and_unkept_video_tokens():
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    video = torch.tensor([[False, False, True, True, False]])
    keep = token_keep_mask(mask, video, torch.tensor([False, True]))
    assert keep.tolist() == [[False, True, False, True, True]]
    with pytest.raises(ValueError, match="3 video placeholder tokens but the videos give 2"):
        token_keep_mask(mask, torch.tensor([[False, True, True, True, False]]), torch.tensor([True, True]))


def test_joint_visual_features_follow_sequence_order():
    image = torch.tensor([[False, True, False, False]])
    video = torch.tensor([[True, False, True, False]])
    joint = joint_visual_features(image, video, torch.tensor([[5.0]]), torch.tensor([[1.0], [2.0]]))
    assert joint.squeeze(1).tolist() == [1.0, 5.0, 2.0]
