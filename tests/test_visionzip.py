"""VisionZip (both ports) against plain per-frame, per-token references written from the spec, plus its
counts, output properties, hand-checked merges, dtype behaviour and errors."""

from __future__ import annotations

import math

import pytest
import torch

from llava.model import compression
from llava.model.method_api import VIT_KEYS, VIT_RECEIVED_ATTENTION, VideoSelection, VideoTokens, parse_options
from llava.model.visionzip import (
    METHOD,
    VisionZipOptions,
    authors_select_counts,
    visionzip_counts,
    visionzip_select,
    visionzip_select_counts,
)

# ----------------------------------------------------------------------------------- references


def reference_original(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, retention: float, ratio: float = 54 / 64
) -> tuple[list[int], torch.Tensor]:
    """The SigLIP port as the spec words it, frame by frame and token by token (float64 values)."""
    n_frames, per_frame, _ = features.shape
    x = features.double()
    sources, rows = [], []
    for f in range(n_frames):
        s = max(1, min(per_frame, round(retention * per_frame)))
        n_dom = int(s * ratio)
        n_ctx = s - n_dom
        by_score = sorted(range(per_frame), key=lambda j: (-float(attention[f, j]), j))
        dominant = sorted(by_score[:n_dom])
        rest = [j for j in range(per_frame) if j not in dominant]
        n_ctx = min(n_ctx, len(rest))
        metric = [keys[f, j].double() / keys[f, j].double().norm() for j in range(per_frame)]
        out = {j: x[f, j].clone() for j in dominant}
        if n_ctx:
            step = max(1, len(rest) // n_ctx)
            targets = [rest[i * step] for i in range(n_ctx)]
            members: dict[int, list[int]] = {t: [] for t in targets}
            for j in rest:
                if j in targets:
                    continue
                best, best_dot = None, -math.inf
                for t in targets:  # ascending: a strict '>' keeps the lowest target on ties
                    dot = float((metric[j] * metric[t]).sum())
                    if dot > best_dot:
                        best, best_dot = t, dot
                members[best].append(j)
            for t in targets:
                mean = torch.stack([x[f, j] for j in members[t]]).mean(0) if members[t] else torch.zeros_like(x[f, t])
                out[t] = x[f, t] + mean
        for j in sorted(out):
            sources.append(f * per_frame + j)
            rows.append(out[j])
    return sources, torch.stack(rows)


def reference_authors(
    features: torch.Tensor, retention: float, ratio: float = 0.6, k_neighbors: int = 5
) -> tuple[list[int], torch.Tensor]:
    """The VidCom2 authors' port as the spec words it (zero-padding bug not reproduced), float64."""
    n_frames, per_frame, _ = features.shape
    x = features.double()
    sources, rows = [], []
    for f in range(n_frames):
        keep = max(1, min(per_frame, int(per_frame * retention)))
        n_dom = max(1, int(keep * ratio))
        n_ctx = keep - n_dom
        norm = [float(x[f, j].norm()) for j in range(per_frame)]
        dominant = sorted(sorted(range(per_frame), key=lambda j: (-norm[j], j))[:n_dom])
        rest = [j for j in range(per_frame) if j not in dominant]
        n_ctx = min(n_ctx, len(rest))
        out = {j: x[f, j].clone() for j in dominant}
        if n_ctx:
            unit = {j: x[f, j] / x[f, j].norm() for j in rest}
            cos = lambda i, j, unit=unit: float((unit[i] * unit[j]).sum())  # noqa: E731

            density = {}
            for i in rest:
                others = sorted((cos(i, j) for j in rest if j != i), reverse=True)[:k_neighbors]
                density[i] = sum(others) / len(others) if others else 0.0
            anchors = sorted(sorted(rest, key=lambda i: (-density[i], i))[:n_ctx])
            cluster: dict[int, list[int]] = {a: [a] for a in anchors}
            for i in rest:
                if i in anchors:
                    continue
                best, best_sim = None, -math.inf
                for a in anchors:
                    sim = cos(i, a)
                    if sim > best_sim:
                        best, best_sim = a, sim
                cluster[best].append(i)
            for a in anchors:
                out[a] = torch.stack([x[f, j] for j in cluster[a]]).mean(0)
        for j in sorted(out):
            sources.append(f * per_frame + j)
            rows.append(out[j])
    return sources, torch.stack(rows)


# ----------------------------------------------------------------------------------- inputs


def random_inputs(frames: int, h: int, w: int, dim: int, kdim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    per_frame = h * w
    features = torch.randn(frames, per_frame, dim, generator=g)
    attention = torch.rand(frames, per_frame, generator=g)
    keys = torch.randn(frames, per_frame, kdim, generator=g)
    return features, attention, keys


def static_with_cut(frames: int, h: int, w: int, dim: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """One scene for the first half of the clip, another after a cut; optional per-token noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, h * w, dim, generator=g)
    video = torch.stack([a if t < frames // 2 else b for t in range(frames)])
    return video + noise * torch.randn(video.shape, generator=g)


def moving_object(frames: int, h: int, w: int, dim: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """A dim flat background with a bright 2x2 object moving one token right per frame."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(dim, generator=g) * 0.1
    bright = torch.randn(dim, generator=g) * 3.0
    video = background.expand(frames, h, w, dim).clone()
    for t in range(frames):
        c = t % (w - 1)
        video[t, 1:3, c : c + 2] = bright
    video = video.reshape(frames, h * w, dim)
    return video + noise * torch.randn(video.shape, generator=g)


def video_of(features, attention, keys, h: int, w: int) -> VideoTokens:
    grid = (features.shape[0], h, w)
    return VideoTokens(features, grid, {VIT_RECEIVED_ATTENTION: attention, VIT_KEYS: keys})


def assert_matches(selection, expected_sources, expected_rows) -> None:
    assert selection.source.dtype == torch.int64
    assert selection.source.tolist() == expected_sources
    assert selection.features.dtype == torch.float32
    torch.testing.assert_close(selection.features.double(), expected_rows, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- counts


def test_counts_follow_the_spec_mapping() -> None:
    assert visionzip_counts(196, 0.25) == (41, 8)  # LLaVA-OV: 49 per frame
    assert visionzip_counts(196, 0.15) == (24, 5)  # 29
    assert visionzip_counts(196, 0.10) == (16, 4)  # 20
    assert visionzip_counts(169, 0.25) == (35, 7)  # LLaVA-Video: 42
    assert visionzip_counts(196, 1.0) == (165, 31)  # S = P
    assert visionzip_counts(196, 0.001) == (0, 1)  # at least one token: a lone contextual one
    assert visionzip_counts(196, 0.25, VisionZipOptions(dominant_ratio=1.0)) == (49, 0)
    authors = VisionZipOptions(port="authors")
    assert visionzip_counts(196, 0.25, authors) == (29, 20)  # keep = 49, int(29.4)
    assert visionzip_counts(196, 0.15, authors) == (17, 12)  # keep = int(29.4) = 29
    assert visionzip_counts(196, 0.001, authors) == (1, 0)


# ----------------------------------------------------------------------------------- original port


@pytest.mark.parametrize(
    ("frames", "h", "w", "retention", "ratio", "seed"),
    [
        (3, 14, 14, 0.25, 54 / 64, 0),
        (2, 14, 14, 0.15, 54 / 64, 1),
        (2, 13, 13, 0.25, 54 / 64, 2),
        (4, 5, 6, 0.4, 0.5, 3),
        (2, 4, 4, 0.3, 0.0, 4),  # no dominant token
        (2, 4, 4, 0.5, 1.0, 5),  # no contextual token
        (1, 3, 3, 0.01, 54 / 64, 6),  # S = 1
        (2, 6, 6, 0.9, 0.25, 7),  # step = 1: nearly every remaining token a target
    ],
)
def test_original_matches_reference_on_random_inputs(frames, h, w, retention, ratio, seed) -> None:
    features, attention, keys = random_inputs(frames, h, w, 12, 7, seed)
    options = VisionZipOptions(dominant_ratio=ratio)
    selection = visionzip_select(video_of(features, attention, keys, h, w), retention, options)
    assert_matches(selection, *reference_original(features, attention, keys, retention, ratio))


@pytest.mark.parametrize("maker", [static_with_cut, moving_object])
@pytest.mark.parametrize("retention", [0.25, 0.1])
def test_original_matches_reference_on_structured_clips(maker, retention) -> None:
    frames, h, w = 6, 7, 7
    features = maker(frames, h, w, 16, seed=11)
    _, attention, keys = random_inputs(frames, h, w, 1, 9, seed=12)
    selection = visionzip_select(video_of(features, attention, keys, h, w), retention)
    assert_matches(selection, *reference_original(features, attention, keys, retention))


def test_original_with_structured_signals_and_attention_ties() -> None:
    """Keys derived from the features (plus noise) and coarse attention with many exact ties."""
    frames, h, w = 4, 7, 7
    features = moving_object(frames, h, w, 16, seed=3)
    g = torch.Generator().manual_seed(4)
    keys = features[..., :8] + 0.05 * torch.randn(frames, h * w, 8, generator=g)
    attention = torch.randint(0, 3, (frames, h * w), generator=g).float()  # ties -> lower index
    selection = visionzip_select(video_of(features, attention, keys, h, w), 0.3)
    assert_matches(selection, *reference_original(features, attention, keys, 0.3))


def test_ties_in_attention_prefer_the_lower_index() -> None:
    features, _, keys = random_inputs(1, 2, 4, 3, 2, seed=0)
    attention = torch.ones(1, 8)
    selection = visionzip_select_counts(features, attention, keys, n_dom=3, n_ctx=0)
    assert selection.source.tolist() == [0, 1, 2]


@pytest.mark.parametrize("retention", [0.25, 0.1, 0.6])
def test_properties_counts_validity_and_determinism(retention) -> None:
    frames, h, w = 5, 13, 13
    features, attention, keys = random_inputs(frames, h, w, 8, 5, seed=21)
    video = video_of(features, attention, keys, h, w)
    first = visionzip_select(video, retention)
    again = visionzip_select(video, retention)
    assert torch.equal(first.source, again.source) and torch.equal(first.features, again.features)
    per_frame = h * w
    s = sum(visionzip_counts(per_frame, retention))
    assert s == max(1, round(retention * per_frame))
    source = first.source
    assert source.numel() == frames * s and first.features.shape == (frames * s, 8)
    assert bool((source[1:] > source[:-1]).all()) and int(source[0]) >= 0 and int(source[-1]) < frames * per_frame
    assert torch.bincount(source // per_frame, minlength=frames).tolist() == [s] * frames


def test_merged_feature_is_target_plus_member_mean_by_hand() -> None:
    # P = 6, S = round(4/6 * 6) = 4, dominant_ratio 0.5: n_dom = 2, n_ctx = 2.
    attention = torch.tensor([[0.9, 0.1, 0.2, 0.8, 0.3, 0.05]])  # dominant: 0 and 3
    # remaining [1, 2, 4, 5], step = 2: targets 1 and 4; members 2 and 5.
    keys = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.1, 1.0], [3.0, -1.0], [0.0, 1.0], [1.0, 1.0]]])
    # token 2 is closest to target 4; token 5 ties between targets 1 and 4 -> the lower, 1.
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0]]])
    options = VisionZipOptions(dominant_ratio=0.5)
    video = VideoTokens(x, (1, 2, 3), {VIT_RECEIVED_ATTENTION: attention, VIT_KEYS: keys})
    selection = visionzip_select(video, 4 / 6, options)
    assert selection.source.tolist() == [0, 1, 3, 4]
    expected = torch.tensor([[1.0, 2.0], [3.0 + 11.0, 4.0 + 12.0], [7.0, 8.0], [9.0 + 5.0, 10.0 + 6.0]])
    torch.testing.assert_close(selection.features, expected)


def test_target_without_members_keeps_its_own_value() -> None:
    attention = torch.tensor([[0.9, 0.1, 0.2, 0.3]])  # dominant: 0; remaining [1, 2, 3]
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    x = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2)
    # n_ctx = 2: step = 3 // 2 = 1, targets 1 and 2; member 3 joins target 2 (same key), target 1 has none
    selection = visionzip_select_counts(x, attention, keys, n_dom=1, n_ctx=2)
    assert selection.source.tolist() == [0, 1, 2]
    torch.testing.assert_close(selection.features, torch.stack([x[0, 0], x[0, 1], x[0, 2] + x[0, 3]]))


def test_pure_dominant_keeps_raw_features() -> None:
    features, attention, keys = random_inputs(3, 4, 5, 6, 3, seed=8)
    selection = visionzip_select(video_of(features, attention, keys, 4, 5), 0.5, VisionZipOptions(dominant_ratio=1.0))
    expected = sorted(f * 20 + j for f in range(3) for j in attention[f].topk(10).indices.tolist())
    assert selection.source.tolist() == expected
    torch.testing.assert_close(selection.features, features.reshape(-1, 6)[selection.source])


def test_full_budget_is_identity_like() -> None:
    features, attention, keys = random_inputs(2, 14, 14, 6, 4, seed=9)
    selection = visionzip_select(video_of(features, attention, keys, 14, 14), 1.0)
    assert selection.source.tolist() == list(range(2 * 196))
    assert torch.equal(selection.features, features.reshape(-1, 6))


def test_contextual_count_larger_than_the_remaining_set_is_clamped() -> None:
    features, attention, keys = random_inputs(2, 3, 3, 4, 3, seed=10)
    # n_dom = 6 leaves 3 remaining tokens; n_ctx = 5 is clamped to 3: every token kept as it is
    selection = visionzip_select_counts(features, attention, keys, n_dom=6, n_ctx=5)
    assert selection.source.tolist() == list(range(18))
    torch.testing.assert_close(selection.features, features.reshape(-1, 4))
    authors = authors_select_counts(features, n_dom=6, n_ctx=5)
    assert authors.source.tolist() == list(range(18))
    torch.testing.assert_close(authors.features, features.reshape(-1, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_features_select_as_float32(dtype) -> None:
    features, attention, keys = random_inputs(3, 14, 14, 16, 8, seed=13)
    low = features.to(dtype)
    got = visionzip_select(video_of(low, attention, keys, 14, 14), 0.25)
    want = visionzip_select(video_of(low.float(), attention, keys, 14, 14), 0.25)
    assert torch.equal(got.source, want.source)
    assert got.features.dtype == torch.float32
    torch.testing.assert_close(got.features, want.features)
    assert_matches(got, *reference_original(low.float(), attention, keys, 0.25))


# ----------------------------------------------------------------------------------- authors' port


@pytest.mark.parametrize(
    ("frames", "h", "w", "retention", "ratio", "k", "seed"),
    [
        (3, 14, 14, 0.25, 0.6, 5, 0),
        (2, 7, 7, 0.15, 0.6, 5, 1),
        (2, 5, 5, 0.5, 0.3, 2, 2),
        (2, 3, 4, 0.6, 0.5, 40, 3),  # k larger than the remaining set
        (1, 3, 3, 0.05, 0.6, 5, 4),  # keep = 1: a single dominant token
        (2, 4, 4, 0.5, 0.0, 1, 5),  # n_dom = max(1, 0) = 1
    ],
)
def test_authors_matches_reference_on_random_inputs(frames, h, w, retention, ratio, k, seed) -> None:
    features, _, _ = random_inputs(frames, h, w, 10, 1, seed)
    options = VisionZipOptions(port="authors", authors_dominant_ratio=ratio, k_neighbors=k)
    selection = visionzip_select(VideoTokens(features, (frames, h, w)), retention, options)  # no signals needed
    assert_matches(selection, *reference_authors(features, retention, ratio, k))


@pytest.mark.parametrize("maker", [static_with_cut, moving_object])
def test_authors_matches_reference_on_structured_clips(maker) -> None:
    frames, h, w = 6, 7, 7
    features = maker(frames, h, w, 16, seed=5, noise=0.05)  # noise: no exact ties between near-duplicates
    options = VisionZipOptions(port="authors")
    selection = visionzip_select(VideoTokens(features, (frames, h, w)), 0.25, options)
    assert_matches(selection, *reference_authors(features, 0.25))


def test_authors_single_cluster_is_the_mean_of_all_remaining_tokens() -> None:
    x = torch.tensor([[[10.0, 0.0], [1.0, 1.0], [2.0, 0.5], [0.5, 2.0]]])
    # keep = int(4 * 0.5) = 2, n_dom = max(1, int(2 * 0.5)) = 1 (token 0, largest norm), n_ctx = 1
    options = VisionZipOptions(port="authors", authors_dominant_ratio=0.5)
    selection = visionzip_select(VideoTokens(x, (1, 2, 2)), 0.5, options)
    assert selection.features.shape == (2, 2) and selection.source[0] == 0
    torch.testing.assert_close(selection.features[0], x[0, 0])
    torch.testing.assert_close(selection.features[1], x[0, 1:].mean(0))  # anchor included


def test_authors_duplicate_anchors_each_keep_their_own_cluster_by_hand() -> None:
    # token 0 has the largest norm: dominant. Remaining [1, 2, 3, 4]; tokens 1 and 2 are identical, so with
    # k_neighbors = 1 both have density 1 and become the two anchors; 3 and 4 tie between them -> anchor 1.
    x = torch.tensor([[[10.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.2], [1.0, -0.3]]])
    # keep = int(5 * 0.6) = 3, n_dom = max(1, int(3 * 0.34)) = 1, n_ctx = 2
    options = VisionZipOptions(port="authors", authors_dominant_ratio=0.34, k_neighbors=1)
    selection = visionzip_select(VideoTokens(x, (1, 1, 5)), 0.6, options)
    assert selection.source.tolist() == [0, 1, 2]
    expected = torch.tensor([[10.0, 0.0], [2.0 / 3.0, 0.3], [0.0, 1.0]])  # anchor 2 is its own (one-token) cluster
    torch.testing.assert_close(selection.features, expected)


# ----------------------------------------------------------------------------------- errors and wiring


def test_method_declaration() -> None:
    assert METHOD.name == "visionzip" and METHOD.merges
    assert METHOD.signals == frozenset({VIT_RECEIVED_ATTENTION, VIT_KEYS})
    assert METHOD.options is VisionZipOptions


def test_option_errors_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid options: port, dominant_ratio, authors_dominant_ratio, k_neighbors"):
        parse_options("visionzip", VisionZipOptions, {"dominant_rate": 0.5})
    with pytest.raises(ValueError, match="port='qwen' is not one of original, authors"):
        VisionZipOptions(port="qwen")
    with pytest.raises(ValueError, match=r"dominant_ratio must be in \[0.0, 1.0\], got 1.5"):
        VisionZipOptions(dominant_ratio=1.5)
    with pytest.raises(ValueError, match=r"authors_dominant_ratio must be in \[0.0, 1.0\], got -0.1"):
        VisionZipOptions(authors_dominant_ratio=-0.1)
    with pytest.raises(ValueError, match="k_neighbors must be an integer >= 1, got 0"):
        VisionZipOptions(k_neighbors=0)
    parsed = parse_options("visionzip", VisionZipOptions, {"port": "authors", "k_neighbors": "3"})
    assert parsed == VisionZipOptions(port="authors", k_neighbors=3)


def test_missing_signal_and_bad_shapes() -> None:
    features, attention, keys = random_inputs(2, 3, 3, 4, 3, seed=0)
    with pytest.raises(ValueError, match="signal 'vit_keys' was not supplied"):
        visionzip_select(VideoTokens(features, (2, 3, 3), {VIT_RECEIVED_ATTENTION: attention}), 0.5)
    with pytest.raises(ValueError, match="signal 'vit_received_attention' was not supplied"):
        visionzip_select(VideoTokens(features, (2, 3, 3), {VIT_KEYS: keys}), 0.5)
    with pytest.raises(ValueError, match=r"'vit_received_attention' must have shape \(2, 9\), got \(2, 8\)"):
        visionzip_select(video_of(features, attention[:, :8], keys, 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"'vit_keys' must have shape \(2, 9, d\), got \(2, 9\)"):
        visionzip_select(video_of(features, attention, keys[..., 0], 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"grid \(2, 2, 3\) does not match"):
        visionzip_select(VideoTokens(features, (2, 2, 3), {VIT_RECEIVED_ATTENTION: attention, VIT_KEYS: keys}), 0.5)
    with pytest.raises(ValueError, match=r"features must be a \(F, P, D\) tensor"):
        visionzip_select(video_of(features[0], attention, keys, 3, 3), 0.5)


@pytest.mark.parametrize("retention", [0.0, -0.1, 1.5])
def test_retention_out_of_range(retention) -> None:
    features, attention, keys = random_inputs(1, 2, 2, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        visionzip_select(video_of(features, attention, keys, 2, 2), retention)
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        visionzip_select(video_of(features, attention, keys, 2, 2), retention, VisionZipOptions(port="authors"))
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        visionzip_counts(4, retention)


def test_non_finite_input_is_refused() -> None:
    features, attention, keys = random_inputs(2, 2, 2, 3, 2, seed=0)
    bad = attention.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        visionzip_select(video_of(features, bad, keys, 2, 2), 0.5)
    features[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        visionzip_select(VideoTokens(features, (2, 2, 2)), 0.5, VisionZipOptions(port="authors"))


@pytest.mark.skipif("visionzip" not in compression.available_compressors(), reason="not registered yet")
def test_through_the_registry() -> None:
    features, attention, keys = random_inputs(2, 7, 7, 8, 4, seed=1)
    spec = compression.CompressionSpec("visionzip", 0.25, {"visionzip.dominant_ratio": 0.75})
    (out,) = spec.select_videos([video_of(features, attention, keys, 7, 7)])
    sources, rows = reference_original(features, attention, keys, 0.25, 0.75)
    assert out.mask.reshape(-1).nonzero().squeeze(1).tolist() == sources
    torch.testing.assert_close(out.table[sources].double(), rows, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled execution runs there only)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("retention", [0.25, 0.1])
def test_compiled_execution_on_cuda_matches_the_reference_and_eager(dtype, retention) -> None:
    features, attention, keys = random_inputs(8, 14, 14, 64, 16, seed=3)
    features = features.to(dtype)
    expected = reference_original(features.float(), attention, keys, retention, 54 / 64)
    out = {}
    for execution in ("compiled", "eager"):
        video = video_of(*(t.cuda() for t in (features, attention, keys)), 14, 14)
        out[execution] = visionzip_select(video, retention, VisionZipOptions(execution=execution))
        selection = out[execution]
        assert selection.source.is_cuda and selection.features.dtype == torch.float32
        assert_matches(VideoSelection(selection.source.cpu(), selection.features.cpu()), *expected)
    assert torch.equal(out["compiled"].source, out["eager"].source)
    bad = attention.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):  # the compiled path keeps the finite check
        visionzip_select(video_of(features.cuda(), bad.cuda(), keys.cuda(), 14, 14), retention)


def test_execution_option_is_checked() -> None:
    with pytest.raises(ValueError, match="execution"):
        VisionZipOptions(execution="graph")
