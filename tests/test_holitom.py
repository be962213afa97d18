"""HoliTom w/o M (llava/model/holitom.py) against a plain loop reference of the spec's outer algorithm.

The reference below is written from the spec's steps (baselines.md 4.2), token by token and window by
window, in float64: the DP enumerates window sizes, DPC-kNN is computed pair by pair, and every merge
is a loop over a cluster's members.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llava.model.dpc_knn import pairwise_distances
from llava.model.holitom import (
    METHOD,
    HoliTomOptions,
    cluster_merge,
    frame_similarity,
    holitom_select,
    merge_into_centres,
    static_windows,
)
from llava.model.method_api import LLM_ATTENTION_ROWS, VIT_RECEIVED_ATTENTION, VideoTokens, parse_options

# ----------------------------------------------------------------------------------- reference


def ref_similarity(x: torch.Tensor) -> list[list[float]]:
    frames, positions, _ = x.shape
    out = []
    for t in range(frames - 1):
        row = []
        for m in range(positions):
            a, b = x[t, m].double(), x[t + 1, m].double()
            row.append(float((a @ b) / (a.norm() * b.norm())))
        out.append(row)
    return out


def ref_static_positions(s: list[list[float]], u: int, v: int, tau: float) -> list[int]:
    if v == u:
        return []
    positions = len(s[0])
    return [m for m in range(positions) if all(s[t][m] > tau for t in range(u, v))]


def ref_dp(s: list[list[float]], frames: int, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    def gain(u: int, v: int) -> int:
        return (v - u) * len(ref_static_positions(s, u, v, tau))

    best = {-1: 0}
    start = {}
    for i in range(frames):
        value, first = best[i - 1], i
        for w in range(2, min(i + 1, max_window) + 1):
            candidate = best[i - w] + gain(i - w + 1, i)
            if candidate > value:
                value, first = candidate, i - w + 1
        best[i], start[i] = value, first
    windows = []
    i = frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[frames - 1]


def ref_dpc(points: list[list[float]], k: int, count: int) -> tuple[list[int], list[list[float]]]:
    """Ascending centre indices and the distance table; density ties ranked by index (no noise)."""
    n, dim = len(points), len(points[0])
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            squared = sum((points[i][d] - points[j][d]) ** 2 for d in range(dim))
            dist[i][j] = math.sqrt(squared) / math.sqrt(dim)
    k = min(k, n)
    rho = [math.exp(-sum(d * d for d in sorted(dist[i])[:k]) / k) for i in range(n)]
    rank = sorted(range(n), key=lambda i: (-rho[i], i))
    far = max(max(row) for row in dist)
    delta = {}
    for r, i in enumerate(rank):
        denser = rank[:r]
        delta[i] = min(dist[i][j] for j in denser) if denser else far
    score = [rho[i] * delta[i] for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:count])
    return centres, dist


def ref_merge(points: list[list[float]], centres: list[int], dist: list[list[float]], beta: float) -> list[list[float]]:
    members = {c: [] for c in centres}
    for j in range(len(points)):
        if j in members:
            continue
        nearest = min(centres, key=lambda c: (dist[j][c], centres.index(c)))
        members[nearest].append(j)
    out = []
    for c in centres:
        if not members[c]:
            out.append(list(points[c]))
            continue
        mean = [sum(points[j][d] for j in members[c]) / len(members[c]) for d in range(len(points[c]))]
        out.append([beta * points[c][d] + (1 - beta) * mean[d] for d in range(len(points[c]))])
    return out


def reference(
    x: torch.Tensor, attn: torch.Tensor, retention: float, tau=0.8, beta=0.6, contextual=0.0, knn=7, max_window=1024
):
    """(sources ascending, features (K, D) float64, windows) straight from the spec's steps 1-7."""
    frames, positions, _ = x.shape
    s = ref_similarity(x)
    windows, reduced = ref_dp(s, frames, tau, max_window)
    total = frames * positions
    ratio = min(retention / ((total - reduced) / total), 1)
    out: dict[int, list[float]] = {}
    for u, v in windows:
        static = ref_static_positions(s, u, v, tau)
        dynamic = [m for m in range(positions) if m not in static]
        for t in range(u, v + 1):
            n_keep = math.ceil(len(dynamic) * ratio)
            n_dom = round(n_keep * (1 - contextual))
            n_c = n_keep - n_dom
            by_attention = sorted(dynamic, key=lambda m: (-float(attn[t, m]), m))
            for m in by_attention[:n_dom]:
                out[t * positions + m] = x[t, m].double().tolist()
            if n_c > 0:
                rest = sorted(by_attention[n_dom:])
                points = [x[t, m].double().tolist() for m in rest]
                centres, dist = ref_dpc(points, min(knn, n_c), n_c)
                for c, value in zip(centres, ref_merge(points, centres, dist, beta), strict=True):
                    out[t * positions + rest[c]] = value
        if static:
            means = [[float(x[u : v + 1, m, d].double().mean()) for d in range(x.shape[2])] for m in static]
            n_cl = round(len(static) * ratio)
            if n_cl > 0:
                centres, dist = ref_dpc(means, min(knn, n_cl), n_cl)
                for c, value in zip(centres, ref_merge(means, centres, dist, beta), strict=True):
                    assert u * positions + static[c] not in out
                    out[u * positions + static[c]] = value
    keys = sorted(out)
    return torch.tensor(keys, dtype=torch.int64), torch.tensor([out[k] for k in keys], dtype=torch.float64), windows


# ----------------------------------------------------------------------------------- inputs


def structured_random(seed: int, frames=7, positions=16, dim=12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, a base vector with either tiny (static) or large (dynamic) per-frame noise; random cuts."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(positions, dim, generator=g)
    scale = torch.where(torch.rand(frames, positions, generator=g) < 0.6, 0.05, 3.0)
    x = base[None] + scale[..., None] * torch.randn(frames, positions, dim, generator=g)
    cuts = torch.rand(frames, generator=g) < 0.25
    for t in range(1, frames):  # a scene cut replaces everything from frame t on
        if cuts[t]:
            scene = torch.randn(positions, dim, generator=g)
            x[t:] = scene + 0.05 * torch.randn(frames - t, positions, dim, generator=g)
    return x, torch.rand(frames, positions, generator=g)


def scene_cut(seed: int = 0, frames=8, positions=16, dim=16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scene_a, scene_b = torch.randn(2, positions, dim, generator=g)
    x = torch.empty(frames, positions, dim)
    half = frames // 2
    x[:half] = scene_a + 0.02 * torch.randn(half, positions, dim, generator=g)
    x[half:] = scene_b + 0.02 * torch.randn(frames - half, positions, dim, generator=g)
    return x, torch.rand(frames, positions, generator=g)


def moving_object(seed: int = 0, frames=5, side=5, dim=16) -> tuple[torch.Tensor, torch.Tensor, list[set[int]]]:
    """A static background with a 2x2 object moving one column right per frame; occupied cells per frame."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(side * side, dim, generator=g)
    thing = 4.0 * torch.randn(dim, generator=g)
    x = background[None].repeat(frames, 1, 1) + 0.01 * torch.randn(frames, side * side, dim, generator=g)
    occupied = []
    for t in range(frames):
        cells = {r * side + c for r in (1, 2) for c in (t % (side - 1), t % (side - 1) + 1)}
        for m in cells:
            x[t, m] = thing + 0.01 * torch.randn(dim, generator=g)
        occupied.append(cells)
    return x, torch.rand(frames, side * side, generator=g), occupied


def run(x, attn, retention, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Through the registry's select; a padded selection (the static executions) is cut to its count."""
    video = VideoTokens(x, (x.shape[0], 1, x.shape[1]), {VIT_RECEIVED_ATTENTION: attn})
    selection = METHOD.select(video, retention, parse_options("holitom", HoliTomOptions, options))
    if selection.count is not None:
        assert bool(selection.valid)
        count = int(selection.count)
        return selection.source[:count], selection.features[:count]
    return selection.source, selection.features


def assert_matches_reference(x, attn, retention, **options) -> list[tuple[int, int]]:
    """Both executions (eager, and the static formulation uncompiled) against the loop reference."""
    names = {"tau": "tau", "beta": "beta", "contextual_ratio": "contextual", "knn": "knn", "max_window": "max_window"}
    ref_source, ref_features, windows = reference(x, attn, retention, **{names[k]: v for k, v in options.items()})
    for execution in ("eager", "static"):
        source, features = run(x, attn, retention, **options, execution=execution)
        assert torch.equal(source, ref_source), execution
        torch.testing.assert_close(features.double(), ref_features, atol=2e-5, rtol=1e-5)
    return windows


def assert_valid(source: torch.Tensor, total: int) -> None:
    assert source.dtype == torch.int64 and source.dim() == 1 and source.numel() > 0
    assert bool((source[1:] > source[:-1]).all()) and int(source[0]) >= 0 and int(source[-1]) < total


# ----------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("retention", [0.1, 0.25, 0.5])
def test_structured_random_matches_reference(seed: int, retention: float) -> None:
    x, attn = structured_random(seed)
    contextual = (0.0, 0.5, 1.0)[seed % 3]
    windows = assert_matches_reference(x, attn, retention, contextual_ratio=contextual)
    if seed == 0:
        assert any(v > u for u, v in windows)  # the inputs do produce multi-frame windows


@pytest.mark.parametrize("seed", range(3))
def test_plain_random_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    x, attn = torch.randn(4, 20, 8, generator=g), torch.rand(4, 20, generator=g)
    windows = assert_matches_reference(x, attn, 0.3, contextual_ratio=0.4, knn=3, beta=0.3)
    assert windows == [(t, t) for t in range(4)]  # unrelated frames: no static token anywhere


def test_options_reach_the_algorithm() -> None:
    x, attn = structured_random(7, frames=9)
    assert_matches_reference(x, attn, 0.2, tau=0.5, beta=0.9, contextual_ratio=0.3, knn=2, max_window=3)


def test_scene_cut_gives_two_static_windows() -> None:
    x, attn = scene_cut()
    windows = assert_matches_reference(x, attn, 0.25)
    assert windows == [(0, 3), (4, 7)]
    source, features = run(x, attn, 0.25)
    # every position is static: r' = 0.25 / (32 / 128) = 1, so each window keeps all 16 means at its first frame
    assert torch.equal(source, torch.cat([torch.arange(16), 4 * 16 + torch.arange(16)]))
    torch.testing.assert_close(features[:16], x[:4].mean(0))
    torch.testing.assert_close(features[16:], x[4:].mean(0))
    # at a lower R the static means are clustered, still on each window's first frame
    source, _ = run(x, attn, 0.1)
    frames = source // 16
    assert set(frames.tolist()) == {0, 4} and source.numel() == 2 * round(16 * 0.4)


def test_moving_object_is_dynamic_where_it_moves() -> None:
    x, attn, occupied = moving_object()
    windows = assert_matches_reference(x, attn, 0.3, contextual_ratio=0.5)
    source, _ = run(x, attn, 1.0)  # R = 1: every dynamic token of every frame survives
    positions = x.shape[1]
    for u, v in windows:
        changed = set()  # cells whose content changes at some step inside the window
        for t in range(u, v):
            changed |= occupied[t] ^ occupied[t + 1]
        for t in range(u, v + 1):
            in_frame = {int(s) % positions for s in source if int(s) // positions == t}
            if t > u:
                assert in_frame == changed  # later frames carry exactly the moving cells
            else:
                assert changed <= in_frame and len(in_frame) == positions  # first frame: dynamic + static
    assert any(v > u for u, v in windows)


# ----------------------------------------------------------------------------------- the DP


def _similarity_from(static: list[list[int]]) -> torch.Tensor:
    """(F-1, P) 0/1 pattern -> similarities 0.9 (static step) / 0.1."""
    return torch.tensor(static, dtype=torch.float32) * 0.8 + 0.1


def test_dp_partition_on_hand_made_patterns() -> None:
    # frames 0-2 fully static, a cut, then frames 3-5 static at two of four positions
    s = _similarity_from([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    windows, reduced, _ = static_windows(s, 0.8)
    assert windows == [(0, 2), (3, 5)] and reduced == 2 * 4 + 2 * 2
    # a single frame wins a tie: best[1] = G(0,1) = 2 equals best[0] + G(0,2)?  G(0,2) = 2 * 1 = 2 = stay
    s = _similarity_from([[1, 1, 0], [1, 0, 0]])
    assert static_windows(s, 0.8)[:2] == ([(0, 1), (2, 2)], 2)
    # equal windows: G(1,2) = 4 = G(0,2) = 2 * 2 > G(0,1) = 3 -> the smaller window [1, 2]
    s = _similarity_from([[1, 1, 1, 0, 0], [1, 1, 0, 1, 1]])
    assert static_windows(s, 0.8)[:2] == ([(0, 0), (1, 2)], 4)
    # max_window caps the window length
    s = _similarity_from([[1, 1]] * 4)
    assert static_windows(s, 0.8, max_window=2)[0] == [(0, 1), (2, 3), (4, 4)]
    assert static_windows(s, 0.8, max_window=1)[:2] == ([(t, t) for t in range(5)], 0)
    assert static_windows(s, 0.8)[:2] == ([(0, 4)], 8)
    # one frame
    assert static_windows(torch.zeros(0, 3), 0.8)[:2] == ([(0, 0)], 0)


def tie_heavy_pattern(seed: int, most_frames: int) -> tuple[int, torch.Tensor, int]:
    """A random number of frames (1..most_frames), (F-1, 3) similarities of a 0/1 pattern that makes many equal
    windows, and a random max_window in 1..5."""
    g = torch.Generator().manual_seed(seed)
    frames = int(torch.randint(1, most_frames + 1, (1,), generator=g))
    pattern = (torch.rand(frames - 1, 3, generator=g) < 0.7).int()
    s = _similarity_from(pattern.tolist()) if frames > 1 else torch.zeros(0, 3)
    return frames, s, int(torch.randint(1, 6, (1,), generator=g))


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_enumeration_on_tie_heavy_patterns(seed: int) -> None:
    frames, s, max_window = tie_heavy_pattern(seed, 12)
    expected = ref_dp(s.tolist(), frames, 0.8, max_window)
    assert static_windows(s, 0.8, max_window)[:2] == expected


# ----------------------------------------------------------------------------------- merge rule by hand


def test_merge_rule_by_hand() -> None:
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1]])
    centres, merged = cluster_merge(x, 2, knn=2, beta=0.6)
    # 0, 0.1, 0.2 tie as densest (index 0 first, delta = the largest distance); 10 is the next peak
    assert centres.tolist() == [0, 3]
    torch.testing.assert_close(merged, torch.tensor([[0.6 * 0.0 + 0.4 * 0.15], [0.6 * 10.0 + 0.4 * 10.1]]))
    # every token a centre: nothing to merge
    centres, merged = cluster_merge(x, 5, knn=7, beta=0.6)
    assert centres.tolist() == [0, 1, 2, 3, 4] and torch.equal(merged, x)


def test_members_join_the_nearest_centre_by_distance_not_cosine() -> None:
    x = torch.tensor([[1.0, 0.0], [10.0, 1.0], [9.0, 0.0]])  # token 2 is parallel to 0 but close to 1
    merged = merge_into_centres(x, torch.tensor([0, 1]), pairwise_distances(x), beta=0.6)
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0], [0.6 * 10 + 0.4 * 9, 0.6 * 1 + 0.4 * 0]]))


def test_similarity_is_cosine_of_consecutive_frames() -> None:
    x = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, -1.0]]])
    torch.testing.assert_close(frame_similarity(x), torch.tensor([[1.0, -0.8]]))


# ----------------------------------------------------------------------------------- counts and properties


@pytest.mark.parametrize("seed", range(4))
def test_counts_follow_the_budget_rule(seed: int) -> None:
    x, attn = structured_random(seed + 20, frames=9, positions=25)
    retention = (0.1, 0.15, 0.25, 0.6)[seed]
    contextual = (0.0, 0.5)[seed % 2]
    source, features = run(x, attn, retention, contextual_ratio=contextual)
    windows, reduced, run_lengths = static_windows(frame_similarity(x), 0.8)
    total = x.shape[0] * x.shape[1]
    ratio = min(retention / ((total - reduced) / total), 1)
    expected = 0
    for u, v in windows:
        n_static = int((run_lengths[u] >= v - u).sum()) if v > u else 0
        expected += (v - u + 1) * math.ceil((x.shape[1] - n_static) * ratio) + round(n_static * ratio)
    assert source.numel() == expected and features.shape == (expected, x.shape[2])
    assert_valid(source, total)
    # achieved ~ R, or everything static averaging left when that is less (r' is capped at 1)
    assert abs(expected / total - min(retention, (total - reduced) / total)) < 0.1


def test_dtypes_and_score_dtype() -> None:
    x, attn = structured_random(3)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        source, features = run(low, attn, 0.25, contextual_ratio=0.5)
        same_source, same_features = run(low.float(), attn, 0.25, contextual_ratio=0.5)
        assert features.dtype == torch.float32  # scored and merged in float32 by default
        assert torch.equal(source, same_source) and torch.equal(features, same_features)
        source, features = run(low, attn, 0.25, contextual_ratio=0.5, score_dtype="model")
        assert features.dtype == dtype
        assert_valid(source, x.shape[0] * x.shape[1])


def test_authors_port_uses_feature_norm() -> None:
    x, attn = structured_random(4)
    video = VideoTokens(x, (x.shape[0], 4, 4), {})  # the port needs no attention signal
    selection = METHOD.select(video, 0.25, HoliTomOptions(port="authors", contextual_ratio=0.5))
    expected = holitom_select(x, x.norm(dim=-1), 0.25, HoliTomOptions(contextual_ratio=0.5))
    assert torch.equal(selection.source, expected.source)
    assert torch.equal(selection.features, expected.features)
    original, _ = run(x, attn, 0.25, contextual_ratio=0.5)
    assert not torch.equal(original, selection.source)


def test_deterministic_by_default_and_under_a_seed() -> None:
    x, attn = structured_random(5)
    first, second = run(x, attn, 0.2, contextual_ratio=0.5), run(x, attn, 0.2, contextual_ratio=0.5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    seeded = [run(x, attn, 0.2, contextual_ratio=0.5, seed=3) for _ in range(2)]
    assert torch.equal(seeded[0][0], seeded[1][0]) and torch.equal(seeded[0][1], seeded[1][1])
    # Equally spaced points in a static clip: interior densities tie exactly. By default the tie goes to
    # the lower index (the reference's rule); the seeded noise picks other peaks for some seeds.
    points = torch.zeros(12, 4)
    points[:, 0] = torch.arange(12.0)
    tied = points[None].repeat(2, 1, 1)
    attn = torch.rand(2, 12)
    default, _ = run(tied, attn, 0.25)
    ref_source, _, _ = reference(tied, attn, 0.25)
    assert torch.equal(default, ref_source)
    seeded_sets = {tuple(run(tied, attn, 0.25, seed=s)[0].tolist()) for s in range(10)}
    assert len(seeded_sets) > 1
    assert seeded_sets == {tuple(run(tied, attn, 0.25, seed=s)[0].tolist()) for s in range(10)}


def test_method_declaration() -> None:
    assert METHOD.name == "holitom" and METHOD.merges
    assert METHOD.signals == frozenset({VIT_RECEIVED_ATTENTION, LLM_ATTENTION_ROWS})  # the most it may read
    assert METHOD.signals_for(HoliTomOptions()) == {VIT_RECEIVED_ATTENTION}
    assert METHOD.signals_for(HoliTomOptions(inner_merge=True, port="authors")) == {LLM_ATTENTION_ROWS}
    options = parse_options("holitom", HoliTomOptions, {"seed": "3", "port": "authors", "knn": "5", "tau": "0.65"})
    assert options == HoliTomOptions(seed=3, port="authors", knn=5, tau=0.65)
    assert parse_options("holitom", HoliTomOptions, {"seed": "none"}).seed is None
    defaults = HoliTomOptions()
    assert (defaults.tau, defaults.beta, defaults.contextual_ratio, defaults.knn, defaults.max_window) == (
        0.8, 0.6, 0.0, 7, 1024
    )
    assert defaults.seed is None and defaults.port == "original" and defaults.score_dtype == "float32"


# ----------------------------------------------------------------------------------- errors


def test_errors() -> None:
    x, attn = structured_random(0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
            run(x, attn, bad)
    with pytest.raises(ValueError, match="valid options: tau, beta, contextual_ratio, knn, max_window, seed, port"):
        parse_options("holitom", HoliTomOptions, {"threshold": 0.5})
    with pytest.raises(ValueError, match=r"tau must be in \[-1.0, 1.0\]"):
        HoliTomOptions(tau=1.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\]"):
        HoliTomOptions(beta=-0.1)
    with pytest.raises(ValueError, match=r"contextual_ratio must be in \[0.0, 1.0\]"):
        HoliTomOptions(contextual_ratio=2.0)
    with pytest.raises(ValueError, match="knn must be an integer >= 1"):
        HoliTomOptions(knn=0)
    with pytest.raises(ValueError, match="max_window must be an integer >= 1"):
        HoliTomOptions(max_window=2.5)
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        HoliTomOptions(seed=1.5)
    with pytest.raises(ValueError, match="port='qwen' is not one of original, authors"):
        HoliTomOptions(port="qwen")
    with pytest.raises(ValueError, match="score_dtype='half' is not one of float32, model"):
        HoliTomOptions(score_dtype="half")
    with pytest.raises(ValueError, match=r"\(F, P, D\)"):
        holitom_select(x[0], attn[0], 0.25)
    with pytest.raises(ValueError, match=r"importance must be \(F, P\) = \(7, 16\), got \(7, 15\)"):
        holitom_select(x, attn[:, :15], 0.25)
    with pytest.raises(ValueError, match="signal 'vit_received_attention' was not supplied"):
        METHOD.select(VideoTokens(x, (7, 4, 4), {}), 0.25, HoliTomOptions())
    bad = x.clone()
    bad[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        holitom_select(bad, attn, 0.25)
    # a fully static clip at a tiny R: round(n_static * r') = 0 keeps nothing, which must fail loudly
    still = torch.randn(1, 4, 8).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="kept no token at R=0.01"):
        holitom_select(still, torch.rand(2, 4), 0.01)


# ----------------------------------------------------------------------------------- batched paths


def several_window_lengths(seed: int = 0, positions=30, dim=8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of 2, 4, 3, 1 and 2 frames, each with its own share of static positions (many window lengths)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for length, share in ((2, 0.9), (4, 0.5), (3, 0.2), (1, 0.0), (2, 0.7)):
        base = torch.randn(positions, dim, generator=g)
        moving = torch.rand(positions, generator=g) >= share
        for _ in range(length):
            frames.append(base + torch.where(moving[:, None], 3.0, 0.02) * torch.randn(positions, dim, generator=g))
    x = torch.stack(frames)
    return x, torch.rand(x.shape[0], positions, generator=g)


@pytest.mark.parametrize("contextual", [0.0, 0.5])
def test_windows_of_several_lengths_match_reference(contextual: float) -> None:
    x, attn = several_window_lengths()
    windows = assert_matches_reference(x, attn, 0.3, contextual_ratio=contextual, knn=3)
    assert len({v - u for u, v in windows if v > u}) >= 3  # static sets of several lengths, padded together


def test_batched_dpc_matches_one_set_at_a_time() -> None:
    """Padded sets of mixed sizes (both sides of cdist's 25-token switch), counts and k, with and without noise."""
    from llava.model import dpc_knn
    from llava.model.holitom import _cluster_sets, _distances, _Sets

    g = torch.Generator().manual_seed(0)
    sizes, counts, knn = [7, 30, 3, 26, 12], [1, 9, 3, 5, 4], 4
    width = max(sizes)
    x = torch.zeros(len(sizes), width, 6)
    for b, n in enumerate(sizes):
        x[b, :n] = torch.randn(n, 6, generator=g)
    # one nearest neighbour (itself): every density is exactly 1 on cdist's pair-by-pair path, so the
    # centre is index 0; its matmul path (far from the origin) makes self-distances noise and picks another
    x[0, :7] = 50 + 0.1 * torch.randn(7, 6, generator=g)
    ks = [min(knn, c) for c in counts]
    for noisy in (False, True):
        noise = None
        if noisy:  # set b's draws come from a generator seeded with b, as dpc_knn would draw them below
            noise = torch.zeros(len(sizes), width)
            for b, n in enumerate(sizes):
                noise[b, :n] = torch.rand(n, generator=torch.Generator().manual_seed(b))
        sets = _Sets(sizes, counts, ks, torch.tensor(sizes), torch.tensor(counts), torch.tensor(ks), noise)
        centre, merged = _cluster_sets(x, sets, beta=0.6)
        dist = _distances(x, sets)
        for b, n in enumerate(sizes):  # each set's distances as dpc_knn computes them for it alone
            assert torch.equal(dist[b, :n, :n], dpc_knn.pairwise_distances(x[b, :n]))
        for b, (n, c, k) in enumerate(zip(sizes, counts, ks, strict=True)):
            points = x[b, :n]
            generator = torch.Generator().manual_seed(b) if noisy else None
            expected = dpc_knn.dpc_centres(points, k, c, generator=generator).sort().values
            got = centre[b].nonzero().squeeze(1)
            assert torch.equal(got, expected)
            assert not centre[b, n:].any()  # padding never becomes a centre
            if not noisy:
                ref_centres, dist = ref_dpc(points.double().tolist(), k, c)
                assert got.tolist() == ref_centres
                values = ref_merge(points.double().tolist(), ref_centres, dist, 0.6)
                torch.testing.assert_close(merged[b, got].double(), torch.tensor(values, dtype=torch.float64))


def loop_seeded(x, attn, retention, seed, contextual, knn=7, beta=0.6):
    """Per window, per frame, one DPC-kNN at a time from dpc_knn with one seeded CPU generator, in upstream's
    order (each frame's contextual clustering, then the window's static clustering)."""
    from llava.model import dpc_knn

    generator = torch.Generator().manual_seed(seed)
    frames, positions, _ = x.shape
    s = ref_similarity(x)
    windows, reduced = ref_dp(s, frames, 0.8, 1024)
    ratio = min(retention / ((frames * positions - reduced) / (frames * positions)), 1)
    kept = []
    for u, v in windows:
        static = ref_static_positions(s, u, v, 0.8)
        dynamic = [m for m in range(positions) if m not in static]
        n_keep = math.ceil(len(dynamic) * ratio)
        n_dom = round(n_keep * (1 - contextual))
        for t in range(u, v + 1):
            by_attention = sorted(dynamic, key=lambda m: (-float(attn[t, m]), m))
            kept += [t * positions + m for m in by_attention[:n_dom]]
            if n_keep - n_dom > 0:
                rest = sorted(by_attention[n_dom:])
                c = n_keep - n_dom
                centres = dpc_knn.dpc_centres(x[t, rest], min(knn, c), c, generator=generator)
                kept += [t * positions + rest[int(i)] for i in centres]
        n_cl = round(len(static) * ratio)
        if static and n_cl:
            means = x[u : v + 1, static].mean(0)
            centres = dpc_knn.dpc_centres(means, min(knn, n_cl), n_cl, generator=generator)
            kept += [u * positions + static[int(i)] for i in centres]
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_seeded_noise_follows_upstreams_draw_order(seed: int) -> None:
    points = torch.zeros(12, 4)
    points[:, 0] = torch.arange(12.0)  # static clip of equally spaced points: the noise decides the ties
    moving = 5 + 3 * torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(seed))
    x = torch.cat([points[None].repeat(3, 1, 1), moving])
    attn = torch.rand(5, 12, generator=torch.Generator().manual_seed(seed))
    source, _ = run(x, attn, 0.3, seed=seed, contextual_ratio=0.5)
    assert source.tolist() == loop_seeded(x, attn, 0.3, seed, 0.5)


class SyncingOps(TorchDispatchMode):
    """Records the dispatched ops that synchronise with the host on CUDA (``seen``), boolean indexing included."""

    SYNCING = frozenset({"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "bincount", "equal",
                         "item"})  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.seen.append(name)
        if name in ("index", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            self.seen.append(name + "[bool]")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_op_on_the_device_path() -> None:
    """The one sync is the .tolist() of the run-length counts; no op that syncs on CUDA is dispatched."""
    for x, attn in (several_window_lengths(), structured_random(1)):
        for options in ({}, {"contextual_ratio": 0.5, "seed": 2}):
            with SyncingOps() as watch:
                holitom_select(x, attn, 0.25, HoliTomOptions(**options))
            assert watch.seen == []


def test_single_frame_and_window_cap_one() -> None:
    x, attn = structured_random(2, frames=1, positions=20)
    source, features = run(x, attn, 0.25)
    assert source.numel() == math.ceil(20 * 0.25) and features.shape == (5, x.shape[2])
    x, attn = structured_random(3)
    source, _ = run(x, attn, 0.25, max_window=1)  # no window of two frames: pure per-frame top-k
    expected = torch.cat([t * 16 + torch.sort(attn[t], descending=True, stable=True).indices[:4].sort().values
                          for t in range(x.shape[0])])
    assert torch.equal(source, expected)


@pytest.mark.parametrize("execution", ["eager", "static"])
def test_huge_finite_features_are_not_refused(execution: str) -> None:
    """The finite checks read sums (the eager norms' sum, the static rows' sums of 0 * x); a finite overflow
    must not be taken for NaN or Inf, and a NaN or an Inf anywhere, in any frame, must be."""
    x, attn = structured_random(4)
    big = x.clone()
    big[1, 2] *= 1e30  # its norm (and the sum) overflow float32, yet every value is finite
    source, _ = run(big, attn, 0.25, execution=execution)
    assert_valid(source, x.shape[0] * x.shape[1])
    bad = attn.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        holitom_select(x, bad, 0.25, HoliTomOptions(execution=execution))
    for frame, value in ((0, float("nan")), (x.shape[0] - 1, float("inf")), (2, -float("inf"))):
        bad = x.clone()
        bad[frame, 3, 1] = value
        with pytest.raises(ValueError, match="NaN or Inf"):
            holitom_select(bad, attn, 0.25, HoliTomOptions(execution=execution))


# ----------------------------------------------------------------------------------- the static execution

from selection_checks import assert_matches_cpu, compile_once  # noqa: E402

from llava.model.holitom import EMPTY_REASON, device_windows, static_plan, static_selection  # noqa: E402


def _host_windows_per_frame(windows: list[tuple[int, int]], frames: int) -> tuple[list[int], list[int]]:
    first, last = [0] * frames, [0] * frames
    for u, v in windows:
        for t in range(u, v + 1):
            first[t], last[t] = u, v
    return first, last


@pytest.mark.parametrize("seed", range(40))
def test_device_windows_match_the_host_dp_on_tie_heavy_patterns(seed: int) -> None:
    """The max-plus DP, its tie rules and the doubled backtrack give the host DP's windows and gain."""
    frames, s, max_window = tie_heavy_pattern(seed, 13)
    windows, reduced, run_lengths = static_windows(s, 0.8, max_window)
    first, last, static, total = device_windows(s, 0.8, min(frames, max_window))
    assert (first.tolist(), last.tolist()) == _host_windows_per_frame(windows, frames)
    assert int(total) == reduced
    for u, v in windows:
        expected = run_lengths[u] >= v - u if v > u else torch.zeros(3, dtype=torch.bool)
        assert torch.equal(static[u : v + 1], expected.expand(v - u + 1, 3))


def test_device_windows_on_hand_made_patterns() -> None:
    s = _similarity_from([[1, 1, 1, 0, 0], [1, 1, 0, 1, 1]])  # equal windows: the smaller one, [1, 2]
    first, last, _, total = device_windows(s, 0.8, 3)
    assert (first.tolist(), last.tolist(), int(total)) == ([0, 1, 1], [0, 2, 2], 4)
    s = _similarity_from([[1, 1]] * 4)
    assert device_windows(s, 0.8, 2)[0].tolist() == [0, 0, 2, 2, 4]  # max_window caps the length


STATIC_CASES = [
    dict(),
    dict(contextual_ratio=0.5),
    dict(contextual_ratio=1.0, knn=2),
    dict(tau=0.65, beta=0.3, knn=1, max_window=3),
    dict(contextual_ratio=0.3, score_dtype="model"),
    dict(port="authors", contextual_ratio=0.5),
]


@pytest.mark.parametrize("options", STATIC_CASES)
@pytest.mark.parametrize("retention", [0.05, 0.25, 1.0])
def test_static_equals_eager_in_bf16_and_model_dtype(options, retention) -> None:
    """More than 25 tokens per set (the eager distances switch to the matmul form too) and bf16 features."""
    x, attn = several_window_lengths(seed=3, positions=40, dim=16)
    x = x.to(torch.bfloat16)
    got = {execution: run(x, attn, retention, **options, execution=execution) for execution in ("eager", "static")}
    assert torch.equal(got["eager"][0], got["static"][0])
    float32 = options.get("score_dtype", "float32") == "float32"
    assert got["static"][1].dtype == (torch.float32 if float32 else torch.bfloat16)
    tol = dict(atol=1e-5, rtol=1e-5) if float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got["static"][1], got["eager"][1], **tol)


@pytest.mark.parametrize("options", [o for o in STATIC_CASES if o.get("score_dtype") != "model"])
def test_static_split_products_equal_eager(monkeypatch, options) -> None:
    """The three-bf16 split products that float32 sets take on CUDA, forced here on the CPU (window sums split,
    then divided by their lengths): the same sources and values as the eager execution."""
    from llava.model import holitom

    split = holitom.split_bf16
    calls = []
    monkeypatch.setattr(holitom, "_splits", lambda x: x.dtype == torch.float32)
    monkeypatch.setattr(holitom, "split_bf16", lambda x: calls.append(x.shape) or split(x))
    for seed in range(3):
        x, attn = several_window_lengths(seed=seed, positions=40, dim=16)
        x = x.to(torch.bfloat16)
        for retention in (0.1, 0.25):
            got = {e: run(x, attn, retention, **options, execution=e) for e in ("eager", "static")}
            assert torch.equal(got["eager"][0], got["static"][0])
            torch.testing.assert_close(got["static"][1], got["eager"][1], atol=1e-5, rtol=1e-5)
    assert calls  # the static execution took the split


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """A video of random shape with a random share of static positions, scene cuts and importance ties."""
    g = torch.Generator().manual_seed(seed)

    def pick(values):
        return values[int(torch.randint(len(values), (1,), generator=g))]

    frames, positions, dim = pick([1, 2, 3, 5, 8, 12]), pick([4, 9, 26, 40]), pick([4, 16])
    base = torch.randn(positions, dim, generator=g)
    still = torch.rand(frames, positions, generator=g) < float(torch.rand(1, generator=g))
    x = base[None] + torch.where(still, 0.02, 3.0)[..., None] * torch.randn(frames, positions, dim, generator=g)
    for t in range(1, frames):
        if float(torch.rand(1, generator=g)) < 0.15:
            scene = torch.randn(positions, dim, generator=g)
            x[t:] = scene + 0.02 * torch.randn(frames - t, positions, dim, generator=g)
    attn = torch.rand(frames, positions, generator=g)
    if seed % 3 == 0:
        attn = (attn * 4).round()  # many ties
    retention = pick([0.05, 0.15, 0.25, 0.5, 1.0])
    options = dict(contextual_ratio=pick([0.0, 0.3, 1.0]), knn=pick([1, 3, 7]), max_window=pick([1024, 2, 3]),
                   tau=pick([0.8, 0.65, 0.95]))  # fmt: skip
    return x, attn, retention, options


@pytest.mark.parametrize("seed", range(60))
def test_static_equals_eager_on_random_shapes_and_its_count_fits_the_cap(seed: int) -> None:
    x, attn, retention, options = _random_case(seed)
    try:
        eager = holitom_select(x, attn, retention, HoliTomOptions(**options, execution="eager"))
    except ValueError as error:  # a static clip at a tiny R: both executions refuse it alike
        with pytest.raises(ValueError, match=re.escape(str(error))):
            holitom_select(x, attn, retention, HoliTomOptions(**options, execution="static"))
        return
    padded = holitom_select(x, attn, retention, HoliTomOptions(**options, execution="static"), padded=True)
    count = int(padded.count)
    cap = static_plan(x.shape[0], x.shape[1], retention, HoliTomOptions(**options), x.dtype).cap
    assert padded.source.shape == (cap,) and bool(padded.valid) and count <= cap
    assert torch.equal(padded.source[:count], eager.source)
    assert bool((padded.source[count:] == x.shape[0] * x.shape[1]).all())  # padding: F * P
    torch.testing.assert_close(padded.features[:count], eager.features, atol=1e-5, rtol=1e-5)


def test_registry_takes_the_padded_static_selection() -> None:
    """Through select_videos the static execution returns padded outputs (no read of its own): the same mask and
    table as the eager one; a non-finite signal, or a static clip at a tiny R, empties the mask, and the count
    check names both reasons."""
    from llava.model.compression import CompressionSpec

    x, attn = several_window_lengths(seed=5)
    grid = (x.shape[0], 5, 6)
    out = {}
    for execution in ("eager", "static"):
        spec = CompressionSpec("holitom", 0.25, {"holitom.execution": execution, "holitom.contextual_ratio": 0.5})
        [out[execution]] = spec.select_videos([VideoTokens(x, grid, {VIT_RECEIVED_ATTENTION: attn})])
    assert out["eager"].mask.sum() > 0 and torch.equal(out["eager"].mask, out["static"].mask)
    torch.testing.assert_close(out["static"].table, out["eager"].table, atol=1e-6, rtol=1e-6)
    bad = attn.clone()
    bad[0, 0] = float("nan")
    [choice] = spec.select_videos([VideoTokens(x, grid, {VIT_RECEIVED_ATTENTION: bad})])
    assert not choice.mask.any()
    still = torch.randn(1, 30, 8).repeat(4, 1, 1)
    tiny = CompressionSpec("holitom", 0.001, {"holitom.execution": "static"})
    [choice] = tiny.select_videos([VideoTokens(still, (4, 5, 6), {VIT_RECEIVED_ATTENTION: torch.rand(4, 30)})])
    assert not choice.mask.any()
    with pytest.raises(ValueError, match=re.escape(EMPTY_REASON)):
        tiny.check_kept([0])


def test_static_execution_options_and_errors() -> None:
    with pytest.raises(ValueError, match="execution='graph' is not one of compiled, static, eager"):
        HoliTomOptions(execution="graph")
    for execution in ("compiled", "static"):
        with pytest.raises(ValueError, match="seed .* needs execution=eager"):
            HoliTomOptions(seed=1, execution=execution)
    x, attn = structured_random(0)
    bad = attn.clone()
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):  # the static path reads its validity at the end
        holitom_select(x, bad, 0.25, HoliTomOptions(execution="static"))
    still = torch.randn(1, 4, 8).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="kept no token at R=0.01"):
        holitom_select(still, torch.rand(2, 4), 0.01, HoliTomOptions(execution="static"))
    assert HoliTomOptions(seed=1).execution is None  # the default runs eager on every device with a seed


def test_static_selection_dispatches_no_syncing_op() -> None:
    """The static formulation reads nothing on the host: no op that synchronises on CUDA is dispatched."""
    x, attn = several_window_lengths()
    for options in ({}, {"contextual_ratio": 0.5}):
        plan = static_plan(x.shape[0], x.shape[1], 0.25, HoliTomOptions(**options), x.dtype)
        with SyncingOps() as watch:
            static_selection(x, attn, plan)
        assert watch.seen == []


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled execution runs there)")


@CUDA
@pytest.mark.parametrize("options", [{}, {"contextual_ratio": 0.5, "knn": 3}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_on_cuda_matches_eager_and_the_cpu(options, dtype, monkeypatch) -> None:
    compile_once(monkeypatch)
    for seed in (0, 1):
        x, attn = several_window_lengths(seed=seed, positions=196, dim=64)
        x = x.to(dtype)
        cpu = holitom_select(x, attn, 0.25, HoliTomOptions(**options, execution="static"))
        cuda = (x.cuda(), attn.cuda())
        got = {e: holitom_select(*cuda, 0.25, HoliTomOptions(**options, execution=e))
               for e in ("compiled", "eager", None)}
        assert_matches_cpu(got, cpu)


@CUDA
def test_static_selection_does_not_synchronise() -> None:
    x, attn = (t.cuda() for t in several_window_lengths(seed=4, positions=196, dim=64))
    plan = static_plan(x.shape[0], x.shape[1], 0.25, HoliTomOptions(contextual_ratio=0.5), torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        static_selection(x.bfloat16(), attn, plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_split_is_exact_and_its_products_are_float32_accurate() -> None:
    """The three-part split that float32 sets take on CUDA: parts sum back exactly, and the Gram and one-hot
    sums from bf16 products are as close to float64 as float32 products are."""
    from llava.model.float32_products import float32_matmul
    from llava.model.holitom import _split_gram, split_bf16

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, 40, generator=g) * torch.logspace(-3, 3, 40)  # magnitudes over six decades
    parts = split_bf16(x)
    m = parts.shape[1] // 3
    assert m % 8 == 0 and parts.dtype == torch.bfloat16
    assert torch.equal(parts[:, :21].float() + parts[:, m : m + 21].float() + parts[:, 2 * m : 2 * m + 21].float(), x)
    exact = x.double() @ x.double().mT
    plain = (x @ x.mT).double()
    assert (_split_gram(parts, 21).double() - exact).abs().max() <= 4 * (plain - exact).abs().max() + 1e-6
    pick = (torch.rand(3, 21, 21, generator=g) < 0.2).float()
    sums = float32_matmul(torch.nn.functional.pad(pick.bfloat16(), (0, m - 21)).repeat(1, 1, 3), parts)
    torch.testing.assert_close(sums.double(), pick.double() @ x.double(), atol=1e-4, rtol=1e-6)
