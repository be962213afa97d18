"""The VidCom2 core against a straightforward per-frame reference, its properties, and its errors."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llava.model import compiled_select
from llava.model.vidcom2 import (
    VidCom2Config,
    vidcom2_frame_budgets,
    vidcom2_keep_indices,
)

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)


def make_video(frames: int, tokens: int, dim: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A shared scene plus per-frame drift, like real video features (not pure noise).
    scene = torch.randn(1, tokens, dim, generator=g)
    drift = torch.randn(frames, 1, dim, generator=g) * 0.5
    noise = torch.randn(frames, tokens, dim, generator=g) * 0.3
    return (scene + drift + noise).to(dtype)


def reference_keep(features: torch.Tensor, retention: float) -> tuple[list[int], list[int]]:
    """The method written plainly, frame by frame and in float64, as the spec states it."""
    x = features.double()
    n_frames, per_frame, dim = x.shape
    flat = x.reshape(-1, dim)
    var = ((flat - flat.mean(0)) ** 2).mean(0)
    channels = sorted(range(dim), key=lambda c: (var[c].item(), c))[: int(dim * 0.5)]
    x = x[:, :, channels]
    x = x / x.norm(dim=-1, keepdim=True)
    g_video = x.reshape(-1, len(channels)).mean(0)

    def kernel(token: torch.Tensor, centre: torch.Tensor) -> float:
        d2 = float(((token - centre) ** 2).sum())
        return sum(math.exp(-d2 / (2 * a)) for a in ALPHAS)

    v = [[kernel(x[t, m], g_video) for m in range(per_frame)] for t in range(n_frames)]
    s = [-sum(row) / per_frame for row in v]
    top = max(s)
    e = [math.exp((si - top) / 0.01) for si in s]
    p = [ei / sum(e) for ei in e]
    mean_p = sum(p) / n_frames
    budgets, kept = [], []
    for t in range(n_frames):
        scale = min(1.0, retention * (1 + p[t] - mean_p))
        k = max(1, round(scale * per_frame))  # Python's round is half-to-even
        budgets.append(k)
        g_frame = x[t].mean(0)
        score = [v[t][m] + kernel(x[t, m], g_frame) for m in range(per_frame)]
        order = sorted(range(per_frame), key=lambda m: (score[m], m))[:k]
        kept.extend(sorted(t * per_frame + m for m in order))
    return budgets, kept


@pytest.mark.parametrize("seed,shape,retention", [(0, (6, 20, 16), 0.25), (1, (4, 30, 10), 0.5), (2, (8, 9, 7), 0.15)])
def test_matches_plain_reference(seed, shape, retention):
    features = make_video(*shape, seed=seed)
    budgets, kept = reference_keep(features, retention)
    assert vidcom2_frame_budgets(features, retention).tolist() == budgets
    assert vidcom2_keep_indices(features, retention).tolist() == kept


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 12),
    tokens=st.integers(1, 40),
    dim=st.integers(2, 24),
    retention=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
    exact=st.booleans(),
)
def test_index_and_budget_properties(frames, tokens, dim, retention, seed, exact):
    features = make_video(frames, tokens, dim, seed=seed)
    config = VidCom2Config(exact_count=exact)
    idx = vidcom2_keep_indices(features, retention, config)
    assert idx.dtype == torch.int64
    assert torch.all(idx[1:] > idx[:-1]), "sorted and unique"
    assert idx.min() >= 0 and idx.max() < frames * tokens
    per_frame = torch.bincount(idx // tokens, minlength=frames)
    assert torch.all(per_frame >= 1), "every frame keeps at least one token"
    target = retention * frames * tokens
    if retention >= 1.0:
        assert idx.numel() == frames * tokens
    elif exact:
        assert idx.numel() == max(frames, round(target))
    else:
        no_clamp = retention * (2 - 1 / frames) <= 1.0  # no frame's share is cut at 1
        no_floor = retention * (1 - 1 / frames) * tokens >= 0.5  # no frame rounds to 0 then up to 1
        if no_clamp and no_floor:
            assert abs(idx.numel() - target) <= frames / 2
        else:
            assert idx.numel() <= target + frames
        budgets = vidcom2_frame_budgets(features, retention, config)
        assert torch.equal(per_frame, budgets)
        # Each frame's share lies in [R(1 - 1/F), min(1, R(2 - 1/F))] before rounding.
        low = retention * (1 - 1 / frames) * tokens - 0.5
        high = min(1.0, retention * (2 - 1 / frames)) * tokens + 0.5
        assert torch.all(budgets >= min(1, math.floor(low))) and torch.all(budgets <= max(1, math.ceil(high)))
    assert torch.equal(idx, vidcom2_keep_indices(features, retention, config)), "deterministic"


def test_budget_total_close_to_target_on_long_video():
    features = make_video(32, 196, 64, seed=3)
    total = int(vidcom2_frame_budgets(features, 0.25).sum())
    assert abs(total - 0.25 * 32 * 196) <= 16


def test_exact_count_total():
    features = make_video(16, 50, 32, seed=4)
    for retention in (0.1, 0.25, 0.33, 0.5, 0.9):
        idx = vidcom2_keep_indices(features, retention, VidCom2Config(exact_count=True))
        assert idx.numel() == round(retention * 16 * 50)


def test_exact_count_changes_only_the_marginal_tokens():
    features = make_video(16, 50, 32, seed=5)
    loose = set(vidcom2_keep_indices(features, 0.33).tolist())
    exact = set(vidcom2_keep_indices(features, 0.33, VidCom2Config(exact_count=True)).tolist())
    assert len(loose ^ exact) == abs(len(loose) - len(exact))


def test_works_inside_and_outside_inference_mode_with_grad_features():
    features = make_video(4, 10, 8, seed=12)
    with torch.inference_mode():
        inside = vidcom2_keep_indices(features, 0.3)  # caches constants while in inference mode
    outside = vidcom2_keep_indices(features.clone().requires_grad_(True), 0.3)
    assert torch.equal(inside, outside)


def test_retention_one_keeps_everything():
    features = make_video(5, 12, 8)
    assert vidcom2_keep_indices(features, 1.0).tolist() == list(range(60))
    assert vidcom2_frame_budgets(features, 1.0).tolist() == [12] * 5


def test_distinct_frame_gets_the_largest_budget():
    g = torch.Generator().manual_seed(99)
    # Real features share a strong common component; a scene cut replaces it with other content.
    common = torch.randn(16, generator=g) * 2
    features = make_video(8, 30, 16, seed=6) + common
    features[5] = torch.randn(30, 16, generator=g) - common
    budgets = vidcom2_frame_budgets(features, 0.25)
    assert int(budgets.argmax()) == 5
    assert budgets[5] > budgets[[i for i in range(8) if i != 5]].max()


def test_equal_frame_score_gives_uniform_budgets():
    features = make_video(6, 40, 16, seed=7)
    budgets = vidcom2_frame_budgets(features, 0.25, {"frame_score": "equal"})
    assert budgets.tolist() == [10] * 6


@pytest.mark.parametrize(
    "options",
    [
        {"frame_score": "pos_mean"},
        {"frame_score": "neg_max"},
        {"frame_score": "pos_min"},
        {"token_score": "f"},
        {"token_score": "-(v+f)"},
        {"similarity": "cosine"},
        {"channel_ratio": "1.0"},
        {"alphas": "0.5/1"},
        {"temperature": "0.1"},
    ],
)
def test_ablation_switches_change_the_selection(options):
    features = make_video(8, 30, 16, seed=8)
    default = vidcom2_keep_indices(features, 0.25)
    ablated = vidcom2_keep_indices(features, 0.25, options)
    assert not torch.equal(default, ablated)


def test_negated_token_score_keeps_the_opposite_end():
    features = make_video(1, 40, 16, seed=9)
    low = set(vidcom2_keep_indices(features, 0.25, {"token_score": "v+f"}).tolist())
    high = set(vidcom2_keep_indices(features, 0.25, {"token_score": "-(v+f)"}).tolist())
    assert not low & high


def test_external_token_scores():
    features = make_video(2, 10, 8)
    scores = torch.arange(20, dtype=torch.float32).reshape(2, 10).flip(1)  # lowest at the end
    idx = vidcom2_keep_indices(
        features, 0.2, {"token_score": "external", "frame_score": "equal"}, token_scores_external=scores
    )
    assert idx.tolist() == [8, 9, 18, 19]
    with pytest.raises(ValueError, match="token_scores"):
        vidcom2_keep_indices(features, 0.2, {"token_score": "external"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_scored_in_float32(dtype):
    features = make_video(8, 30, 16, seed=10, dtype=dtype)
    idx = vidcom2_keep_indices(features, 0.25)
    # float32 scoring of a low-precision input is exactly the scoring of its float32 copy.
    assert torch.equal(idx, vidcom2_keep_indices(features.float(), 0.25))
    model_dtype = vidcom2_keep_indices(features, 0.25, {"score_dtype": "model"})
    assert model_dtype.dtype == torch.int64 and model_dtype.numel() > 0
    assert torch.all(model_dtype[1:] > model_dtype[:-1])


def test_model_dtype_scoring_can_differ_from_float32():
    # Upstream's bf16 scoring shifts ties and budgets; over several videos at least one differs.
    differ = 0
    for seed in range(6):
        features = make_video(16, 49, 32, seed=seed, dtype=torch.bfloat16)
        a = vidcom2_keep_indices(features, 0.25)
        b = vidcom2_keep_indices(features, 0.25, {"score_dtype": "model"})
        differ += int(not torch.equal(a, b))
    assert differ > 0


@pytest.mark.parametrize("retention", [0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_retention(retention):
    with pytest.raises(ValueError, match="retention"):
        vidcom2_keep_indices(make_video(2, 4, 4), retention)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 4, 5), (0, 4, 4), (2, 0, 4), (2, 4, 0)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="features"):
        vidcom2_keep_indices(torch.zeros(shape), 0.5)


def test_nan_features_rejected():
    features = make_video(3, 5, 4)
    features[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vidcom2_keep_indices(features, 0.5)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"frame_score": "median"}, "frame_score"),
        ({"token_score": "q"}, "token_score"),
        ({"similarity": "l1"}, "similarity"),
        ({"score_dtype": "float64"}, "score_dtype"),
        ({"channel_ratio": 0}, "channel_ratio"),
        ({"temperature": 0}, "temperature"),
        ({"alphas": ()}, "alphas"),
        ({"exact_count": "maybe"}, "exact_count"),
        ({"execution": "sometimes"}, "execution"),
        ({"tau": 0.1}, "unknown VidCom2 option"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        VidCom2Config.from_options(options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_graphs_match_eager():
    features = make_video(16, 49, 32, seed=11)
    cpu = vidcom2_keep_indices(features, 0.25)
    assert torch.equal(cpu, vidcom2_keep_indices(features.cuda(), 0.25, {"execution": "eager"}).cpu())
    for seed in range(3):  # replays with new inputs and retentions of the same shape, and exact counts
        x = make_video(16, 49, 32, seed=seed).cuda()
        for options in ({}, {"exact_count": True}, {"frame_score": "equal"}):
            for retention in (0.25, 0.1, 0.5, 0.33):
                eager = vidcom2_keep_indices(x, retention, {**options, "execution": "eager"})
                for execution in ("compiled", "compiled_graph", "cuda_graph"):
                    graphed = vidcom2_keep_indices(x, retention, {**options, "execution": execution})
                    assert torch.equal(graphed, eager), (options, retention, execution)
    # a graph captured (or code compiled) inside inference mode is run outside
    for execution in ("compiled", "compiled_graph", "cuda_graph"):
        with torch.inference_mode():
            inside = vidcom2_keep_indices(make_video(12, 49, 32, seed=7).cuda(), 0.25, {"execution": execution})
        outside = vidcom2_keep_indices(make_video(12, 49, 32, seed=7).cuda(), 0.25, {"execution": execution})
        assert torch.equal(inside, outside)
        bad = make_video(16, 49, 32).cuda()
        bad[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            vidcom2_keep_indices(bad, 0.25, {"execution": execution})


def test_compiled_formulation_selects_what_eager_does(monkeypatch):
    # Under torch.compile the two products are a multiply-and-sum, not matrix-vector products; traced on
    # the CPU here by making the core believe it is being compiled (a broadcast slip would show).
    from llava.model.vidcom2 import _mask_from_scores

    videos = torch.stack([make_video(6, 49, 64, seed=s) * (1 + s) for s in range(3)])
    retention = torch.tensor(0.25, dtype=torch.float64)
    for options in ({}, {"exact_count": True}, {"similarity": "cosine"}):
        cfg = VidCom2Config.from_options(options)
        eager = _mask_from_scores(videos, retention, cfg, None)
        with monkeypatch.context() as patched:
            patched.setattr(torch.compiler, "is_compiling", lambda: True)
            assert torch.equal(_mask_from_scores(videos, retention, cfg, None), eager)


@pytest.mark.parametrize("options", [{}, {"exact_count": True}, {"frame_score": "equal"}])
@pytest.mark.parametrize("retention", [0.1, 0.25, 0.33, 0.5])
def test_retention_as_tensor_equals_retention_as_number(options, retention):
    # The CUDA-graph path feeds R as a float64 0-d tensor; on CPU the same maths must give the same mask.
    from llava.model.vidcom2 import _mask_from_scores

    features = make_video(10, 49, 16, seed=13)
    cfg = VidCom2Config.from_options(options)
    number = _mask_from_scores(features[None], retention, cfg, None)
    tensor = _mask_from_scores(features[None], torch.tensor(retention, dtype=torch.float64), cfg, None)
    assert torch.equal(number, tensor)


@settings(max_examples=60, deadline=None)
@given(
    frames=st.integers(1, 5),
    per_frame=st.integers(1, 40),
    levels=st.integers(1, 6),  # few distinct values: many ties
    seed=st.integers(0, 2**16),
)
def test_pairwise_ranks_equal_the_stable_sort(frames, per_frame, levels, seed):
    import llava.model.vidcom2 as core

    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (frames, per_frame), generator=generator).float() / 3
    pairwise = core.rank_within_frame(scores)
    limit, core._PAIRWISE_RANK_LIMIT = core._PAIRWISE_RANK_LIMIT, 0  # force the sort
    try:
        sorted_ranks = core.rank_within_frame(scores)
    finally:
        core._PAIRWISE_RANK_LIMIT = limit
    assert torch.equal(pairwise, sorted_ranks)
    assert torch.equal(pairwise.sort(dim=1).values, torch.arange(per_frame).expand(frames, -1))  # a permutation


def test_external_token_scores_must_be_finite():
    features = make_video(2, 10, 8)
    scores = torch.zeros(2, 10)
    scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="token scores contain NaN or Inf"):
        vidcom2_keep_indices(features, 0.2, {"token_score": "external"}, token_scores_external=scores)


@pytest.mark.parametrize(
    "options", [{}, {"exact_count": True}, {"frame_score": "equal"}, {"similarity": "cosine", "token_score": "-f"}]
)
@pytest.mark.parametrize("retention", [0.1, 0.3, 1.0])
def test_a_batch_selects_each_video_exactly_as_alone(options, retention):
    from llava.model.vidcom2 import vidcom2_keep_mask, vidcom2_keep_masks

    videos = [make_video(6, 25, 12, seed=seed) * (1 + seed) for seed in range(4)]  # different scales and budgets
    alone = torch.stack([vidcom2_keep_mask(v, retention, options) for v in videos])
    assert torch.equal(vidcom2_keep_masks(videos, retention, options), alone)
    assert torch.equal(vidcom2_keep_masks(torch.stack(videos), retention, options), alone)
    if retention < 1.0:  # the videos really differ, so a batch that mixed them up would show
        assert len({tuple(m.reshape(-1).tolist()) for m in alone}) == len(videos)


def test_a_non_finite_video_empties_only_its_own_mask_in_a_batch():
    from llava.model.vidcom2 import vidcom2_keep_mask, vidcom2_keep_masks

    videos = [make_video(4, 20, 8, seed=s) for s in range(3)]
    videos[1][2, 3, 1] = float("nan")
    for retention in (0.25, 1.0):
        masks = vidcom2_keep_masks(videos, retention)
        assert not masks[1].any()
        assert torch.equal(masks[0], vidcom2_keep_mask(videos[0], retention))
        assert torch.equal(masks[2], vidcom2_keep_mask(videos[2], retention))


@pytest.mark.parametrize(
    "videos,match",
    [
        ([], "at least one"),
        (lambda: [make_video(4, 20, 8), make_video(5, 20, 8)], "share shape"),
        (lambda: [make_video(4, 20, 8), make_video(4, 20, 8, dtype=torch.float64)], "share shape, dtype"),
        (lambda: torch.zeros(4, 20, 8), r"\(B, F, P, D\)"),
        (lambda: [torch.zeros(4, 20)], r"\(F, P, D\)"),
    ],
)
def test_bad_batches(videos, match):
    from llava.model.vidcom2 import vidcom2_keep_masks

    with pytest.raises(ValueError, match=match):
        vidcom2_keep_masks(videos() if callable(videos) else videos, 0.25)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_variance_from_frames_is_the_variance_over_all_tokens(dtype):
    from llava.model.vidcom2 import channel_variance

    x = make_video(3, 40, 24, seed=9, dtype=dtype)[None] + 5.0  # an offset: the per-frame split must not cancel
    exact = x.double().reshape(1, -1, 24).var(dim=1, correction=0)
    torch.testing.assert_close(channel_variance(x).double(), exact, rtol=2e-6, atol=0)
    assert channel_variance(x).dtype == torch.float32
    assert torch.equal(channel_variance(x), channel_variance(x.float()))  # low precision is read, not rounded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_batch_graph_matches_each_video_alone_in_eager(dtype):
    from llava.model.vidcom2 import channel_variance, vidcom2_keep_mask, vidcom2_keep_masks

    videos = [make_video(8, 49, 64, seed=s, dtype=dtype).cuda() * (1 + s) for s in range(3)]
    # the fused low-precision read gives the variance of the float32 copy, bit for bit
    stacked = torch.stack(videos)
    assert torch.equal(channel_variance(stacked), channel_variance(stacked.float()))
    for options in ({}, {"exact_count": True}):
        for retention in (0.1, 0.25, 0.5):  # replays of one captured batch graph with new retentions
            alone = torch.stack([vidcom2_keep_mask(v, retention, {**options, "execution": "eager"}) for v in videos])
            assert torch.equal(vidcom2_keep_masks(videos, retention, options), alone)
            assert torch.equal(vidcom2_keep_mask(videos[1], retention, options), alone[1])
    for execution in ("compiled", "compiled_graph"):
        compiled = vidcom2_keep_masks(videos, 0.25, {"execution": execution})
        assert torch.equal(compiled, vidcom2_keep_masks(videos, 0.25, {"execution": "eager"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("execution", ["compiled_graph", "cuda_graph"])
def test_captured_selection_holds_only_its_buffers_and_strands_nothing(execution):
    import gc

    from llava.model.vidcom2 import release_selection_graphs, vidcom2_keep_masks

    videos = [make_video(8, 49, 64, seed=1).cuda()]

    def settled() -> tuple[int, int]:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    # the first capture makes the per-process pieces (side stream, cuBLAS workspace, compiled kernels)
    vidcom2_keep_masks(videos, 0.25, {"execution": execution})
    release_selection_graphs()
    first = settled()
    for _ in range(3):  # capturing again and releasing leaves memory exactly where it was
        vidcom2_keep_masks(videos, 0.25, {"execution": execution})
        release_selection_graphs()
    assert settled() == first
    before = settled()[0]
    vidcom2_keep_masks(videos, 0.25, {"execution": execution})
    held = settled()[0] - before  # its static input and output mask; the side stream's workspace exists already
    release_selection_graphs()
    assert held <= videos[0].numel() * videos[0].element_size() + 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("execution", ["compiled_graph", "cuda_graph"])
def test_cuda_chunked_batches_and_graphs_sharing_a_pool_match_eager(monkeypatch, execution):
    import llava.model.vidcom2 as core

    videos = [make_video(8, 49, 64, seed=s).cuda() * (1 + s) for s in range(5)]
    other = [make_video(6, 30, 64, seed=10 + s).cuda() for s in range(2)]  # another shape: another graph, same pool
    monkeypatch.setattr(core, "_GRAPH_MAX_ELEMENTS", 2 * 8 * 49 * 64)  # 5 videos go as chunks of 2, 2 and 1
    core.release_selection_graphs()
    for retention in (0.25, 0.1):
        for batch in (videos, other, videos[:3], other):  # interleaved replays of graphs sharing one pool
            eager = core.vidcom2_keep_masks(batch, retention, {"execution": "eager"})
            assert torch.equal(core.vidcom2_keep_masks(batch, retention, {"execution": execution}), eager)
    assert len(core._GRAPHS) == 3 and len(core._GRAPH_POOLS) == 1
    core.release_selection_graphs()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_selection_keeps_no_memory_and_compiles_once_per_shape(monkeypatch):
    import gc

    import llava.model.vidcom2 as core

    def settled() -> tuple[int, int]:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    videos = [make_video(8, 49, 64, seed=s).cuda() for s in range(2)]
    core.release_selection_graphs()
    core.vidcom2_keep_masks(videos, 0.25)  # the default: compiles this shape (or finds it compiled)
    # one compiled shape serves every retention: the retention is an input, not a constant of the code
    monkeypatch.setattr(compiled_select, "MAX_SHAPES", 1)
    retentions = (0.1, 0.25, 0.5, 0.33)
    for retention in retentions:
        eager = core.vidcom2_keep_masks(videos, retention, {"execution": "eager"})
        assert torch.equal(core.vidcom2_keep_masks(videos, retention, {"execution": "compiled"}), eager)
    del eager
    before = settled()
    for retention in retentions:  # nothing a selection allocates outlives it
        core.vidcom2_keep_masks(videos, retention)
    assert settled() == before and not core._GRAPHS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiling_for_too_many_shapes_raises_naming_the_option(monkeypatch):
    import llava.model.vidcom2 as core

    monkeypatch.setattr(compiled_select, "MAX_SHAPES", 1)
    with contextlib.suppress(RuntimeError):  # a process's first compiled shape is within the limit; later ones not
        core.vidcom2_keep_masks([make_video(3, 20, 16, seed=1).cuda()], 0.25)
    with pytest.raises(RuntimeError, match="execution=cuda_graph"):
        core.vidcom2_keep_masks([make_video(3, 21, 16, seed=1).cuda()], 0.25)


def test_compiled_execution_without_triton_says_what_to_do(monkeypatch):
    import torch.utils._triton as triton_probe

    import llava.model.vidcom2 as core

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    monkeypatch.setattr(compiled_select, "_CACHE", {})
    for execution in ("compiled", "compiled_graph"):
        with pytest.raises(RuntimeError, match=f"{execution}.*needs Triton.*execution=cuda_graph"):
            core._selection(VidCom2Config(execution=execution))
    assert core._selection(VidCom2Config(execution="cuda_graph")).func is core._mask_from_scores
