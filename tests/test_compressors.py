"""The compressor registry: lookup, one signature for all, baselines' budgets and errors."""

from __future__ import annotations

import pytest
import torch

from llava.model.compression import (
    CompressionSpec,
    available_compressors,
    compress_video,
    get_compressor,
    register_compressor,
)


def video(frames=4, tokens=25, dim=8, seed=0):
    return torch.randn(frames, tokens, dim, generator=torch.Generator().manual_seed(seed))


def test_registered_names():
    assert {"vidcom2", "random", "uniform", "none"} <= set(available_compressors())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown compressor 'fastvv'") as info:
        get_compressor("fastvv")
    listed = str(info.value).split("valid names: ")[1].split(", ")
    assert {"none", "random", "uniform", "vidcom2"} <= set(listed) and listed == sorted(listed)
    with pytest.raises(ValueError, match="unknown compressor"):
        CompressionSpec("fastvv", 0.25)


@pytest.mark.parametrize("name", ["vidcom2", "random", "uniform", "none"])
def test_every_compressor_shares_the_signature(name):
    x = video()
    idx = get_compressor(name)(x, 0.25, {})
    assert idx.dtype == torch.int64
    assert torch.all(idx[1:] > idx[:-1]) and idx.min() >= 0 and idx.max() < 100
    kept, same = compress_video(x, CompressionSpec(name, 0.25))
    assert torch.equal(same, idx)
    assert torch.equal(kept, x.reshape(-1, 8)[idx])


@pytest.mark.parametrize("name", ["random", "uniform"])
@pytest.mark.parametrize("retention,expected", [(0.25, 6), (0.3, 8), (0.01, 1), (1.0, 25)])
def test_baselines_uniform_budget(name, retention, expected):
    idx = get_compressor(name)(video(), retention, {})
    counts = torch.bincount(idx // 25, minlength=4)
    assert counts.tolist() == [expected] * 4


def test_uniform_is_evenly_spaced():
    idx = get_compressor("uniform")(video(frames=1, tokens=20), 0.25, {})
    assert idx.tolist() == [2, 6, 10, 14, 18]


def test_random_is_seeded_and_varies_with_seed():
    x = video()
    a = get_compressor("random")(x, 0.25, {"seed": 1})
    assert torch.equal(a, get_compressor("random")(x, 0.25, {"seed": 1}))
    assert not torch.equal(a, get_compressor("random")(x, 0.25, {"seed": 2}))
    # Frames do not all keep the same positions.
    per_frame = (a.reshape(4, -1) % 25).tolist()
    assert len({tuple(p) for p in per_frame}) > 1


def test_none_keeps_everything_at_any_retention():
    assert get_compressor("none")(video(), 0.1, {}).tolist() == list(range(100))
    assert CompressionSpec("none", 0.1).is_identity
    assert CompressionSpec("vidcom2", 1.0).is_identity
    assert not CompressionSpec("vidcom2", 0.5).is_identity


def test_spec_validates_early():
    with pytest.raises(ValueError, match="retention"):
        CompressionSpec("vidcom2", 0.0)
    with pytest.raises(ValueError, match="unknown VidCom2 option"):
        CompressionSpec("vidcom2", 0.25, {"temp": "0.1"})
    with pytest.raises(ValueError, match=r"unknown uniform option\(s\) \['seed'\]; valid options: none"):
        CompressionSpec("uniform", 0.25, {"seed": 3})


def test_spec_passes_options_to_vidcom2():
    x = video(frames=8, tokens=30, dim=16, seed=3)
    default = CompressionSpec("vidcom2", 0.25).keep_indices(x)
    equal = CompressionSpec("vidcom2", 0.25, {"frame_score": "equal"}).keep_indices(x)
    assert torch.bincount(equal // 30).tolist() == [8] * 8
    assert not torch.equal(default, equal)


def test_registry_refuses_duplicates_and_accepts_new_methods():
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("random")(lambda f, r, o: f)

    @register_compressor("_test_first_token")
    def first_token(features, retention, options):
        return torch.arange(features.shape[0]) * features.shape[1]

    kept, idx = compress_video(video(), CompressionSpec("_test_first_token", 0.5))
    assert idx.tolist() == [0, 25, 50, 75]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["vidcom2", "random", "uniform", "none"])
def test_same_indices_on_cuda_and_on_the_device(name):
    x = video(frames=8, tokens=49, dim=16, seed=4)
    cpu = get_compressor(name)(x, 0.25, {})
    gpu = get_compressor(name)(x.cuda(), 0.25, {})
    assert gpu.is_cuda and torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("name", ["vidcom2", "random", "uniform", "none"])
def test_keep_mask_marks_exactly_the_kept_indices(name):
    x = video(frames=6, tokens=30, dim=16, seed=5)
    spec = CompressionSpec(name, 0.3)
    mask = spec.keep_mask(x)
    assert mask.shape == (6, 30) and mask.dtype == torch.bool
    assert mask.reshape(-1).nonzero().squeeze(1).tolist() == spec.keep_indices(x).tolist()


def test_keep_mask_of_non_finite_features_is_empty_and_indices_raise():
    x = video(frames=4, tokens=20, dim=8, seed=6)
    x[2, 3, 1] = float("inf")
    for retention in (0.25, 1.0):
        assert not CompressionSpec("vidcom2", retention).keep_mask(x).any()
        with pytest.raises(ValueError, match="NaN or Inf"):
            CompressionSpec("vidcom2", retention).keep_indices(x)


@pytest.mark.parametrize("name", ["vidcom2", "random", "uniform", "none"])
def test_keep_masks_of_mixed_shapes_equal_each_video_alone(name):
    videos = [video(frames=6, tokens=30, dim=16, seed=1), video(frames=4, tokens=30, dim=16, seed=2)]
    videos.append(video(frames=6, tokens=30, dim=16, seed=3))  # shares the first one's shape: selected with it
    spec = CompressionSpec(name, 0.3)
    masks = spec.keep_masks(videos)
    assert [m.shape for m in masks] == [(6, 30), (4, 30), (6, 30)]
    for got, one in zip(masks, videos, strict=True):
        assert torch.equal(got, spec.keep_mask(one))
    with pytest.raises(ValueError, match=r"video 1: features must be a \(F, P, D\) tensor"):
        spec.keep_masks([videos[0], videos[0][0]])


def test_a_registered_mask_form_gets_each_shape_group_once():
    calls = []

    def first_token_masks(videos, retention, options):
        calls.append([tuple(v.shape) for v in videos])
        masks = torch.zeros(len(videos), *videos[0].shape[:2], dtype=torch.bool)
        masks[:, :, 0] = True
        return masks

    @register_compressor("_test_first_token_masks", mask=first_token_masks)
    def first_token(features, retention, options):
        return torch.arange(features.shape[0]) * features.shape[1]

    spec = CompressionSpec("_test_first_token_masks", 0.5)
    videos = [video(frames=4, seed=1), video(frames=2, seed=2), video(frames=4, seed=3)]
    masks = spec.keep_masks(videos)
    assert calls == [[(4, 25, 8), (4, 25, 8)], [(2, 25, 8)]]  # one call per shape, in first-seen order
    for mask, one in zip(masks, videos, strict=True):
        assert mask.reshape(-1).nonzero().squeeze(1).tolist() == first_token(one, 0.5, {}).tolist()
