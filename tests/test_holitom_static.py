"""HoliTom's compiled execution (llava/model/holitom_static.py) against its eager build and the loop reference.

On the CPU the static function runs eagerly (``_select_video(..., static=True)``); it must select the
same tokens as the eager build and the float64 reference of tests/test_holitom.py, for every option. The
CUDA tests compile it (skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from test_holitom import (
    moving_object,
    reference,
    scene_cut,
    several_window_lengths,
    structured_random,
)

from llava.model import compiled_select, holitom, holitom_static
from llava.model.holitom import HoliTomOptions, _select_video, holitom_select
from llava.model.method_api import VIT_RECEIVED_ATTENTION, VideoTokens, parse_options


def both(x: torch.Tensor, attn: torch.Tensor, retention: float, **options):
    """(eager selection, static selection) of one video on its device."""
    opts = HoliTomOptions(**options)
    return _select_video(x, attn, retention, opts, False), _select_video(x, attn, retention, opts, True)


def assert_same(x: torch.Tensor, attn: torch.Tensor, retention: float, **options) -> torch.Tensor:
    eager, static = both(x, attn, retention, **options)
    assert torch.equal(static.source, eager.source)
    assert static.features.dtype == eager.features.dtype and static.features.shape == eager.features.shape
    if eager.features.dtype == torch.float32:
        torch.testing.assert_close(static.features, eager.features, atol=1e-5, rtol=1e-5)
    else:  # model dtype: the eager merge adds in bf16 / fp16, the static one in float32 then rounds
        torch.testing.assert_close(static.features.float(), eager.features.float(), atol=2e-2, rtol=2e-2)
    return static.source


def large_sets(seed: int = 0, frames=6, positions=64, dim=24) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip static at 48 of 64 positions for 3 frames, then unrelated frames: sets of more than 25 tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, positions, dim, generator=g)
    base = torch.randn(positions, dim, generator=g)
    x[:3, :48] = base[:48] + 0.02 * torch.randn(3, 48, dim, generator=g)
    return x, torch.rand(frames, positions, generator=g)


# ----------------------------------------------------------------------------------- CPU: static vs eager


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("retention", [0.05, 0.25, 0.6, 1.0])
def test_static_matches_eager_on_structured_random(seed: int, retention: float) -> None:
    x, attn = structured_random(seed, frames=9)
    assert_same(x, attn, retention, contextual_ratio=(0.0, 0.3, 0.5, 1.0)[seed])


@pytest.mark.parametrize("options", [{}, {"max_window": 2}, {"max_window": 3}, {"max_window": 1},
                                     {"contextual_ratio": 0.3}, {"contextual_ratio": 0.3, "seed": 4},
                                     {"seed": 1}, {"knn": 2, "beta": 0.9, "tau": 0.5}])  # fmt: skip
def test_static_matches_eager_on_windows_of_several_lengths(options: dict) -> None:
    x, attn = several_window_lengths()
    assert_same(x, attn, 0.3, **options)
    assert_same(x, attn, 0.1, **options)


def test_static_matches_eager_and_reference_on_a_scene_cut_and_a_moving_object() -> None:
    x, attn = scene_cut()
    for retention in (0.05, 0.1, 0.25):
        source = assert_same(x, attn, retention)
        assert torch.equal(source, reference(x, attn, retention)[0])
    x, attn, _ = moving_object()
    for retention in (0.2, 0.3, 1.0):
        source = assert_same(x, attn, retention, contextual_ratio=0.5)
        assert torch.equal(source, reference(x, attn, retention, contextual=0.5)[0])


@pytest.mark.parametrize("seed", range(3))
def test_static_matches_the_float64_reference(seed: int) -> None:
    x, attn = structured_random(seed + 10, frames=8)
    _, static = both(x, attn, 0.25, contextual_ratio=0.5, knn=3)
    ref_source, ref_features, _ = reference(x, attn, 0.25, contextual=0.5, knn=3)
    assert torch.equal(static.source, ref_source)
    torch.testing.assert_close(static.features.double(), ref_features, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("retention", [0.1, 0.3])
def test_static_matches_eager_on_sets_larger_than_25(retention: float) -> None:
    """Sets above torch.cdist's switch: both paths take the matmul form of the distances."""
    x, attn = large_sets()
    source = assert_same(x, attn, retention, contextual_ratio=0.5)
    assert source.numel() > 0
    g = torch.Generator().manual_seed(3)
    x, attn = torch.randn(8, 60, 32, generator=g), torch.rand(8, 60, generator=g)
    assert_same(x, attn, retention, contextual_ratio=0.5)


def test_static_matches_eager_in_the_model_dtype_and_for_the_authors_port() -> None:
    x, attn = several_window_lengths(seed=2)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        assert_same(low, attn, 0.3, contextual_ratio=0.3)  # float32 scoring of half inputs
        assert_same(low, attn, 0.3, contextual_ratio=0.3, score_dtype="model")
    norm = x.to(torch.bfloat16).norm(dim=-1).float()  # what the authors' port ranks by
    assert_same(x.to(torch.bfloat16), norm, 0.25, port="authors", score_dtype="model", contextual_ratio=0.3)


def test_static_noise_follows_the_eager_draws() -> None:
    """Equally spaced points tie exactly: the seeded noise decides, and must land on the same members."""
    points = torch.zeros(12, 4)
    points[:, 0] = torch.arange(12.0)
    moving = 5 + 3 * torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(0))
    x = torch.cat([points[None].repeat(3, 1, 1), moving])
    attn = torch.rand(5, 12, generator=torch.Generator().manual_seed(0))
    picked = {tuple(assert_same(x, attn, 0.3, seed=s, contextual_ratio=0.5).tolist()) for s in range(8)}
    assert len(picked) > 1  # the noise does decide


def test_a_wrong_window_in_the_packed_plan_is_caught(monkeypatch) -> None:
    """The comparison can fail: shifting each static window's first frame by one changes the result."""
    x, attn = several_window_lengths()
    eager = _select_video(x, attn, 0.3, HoliTomOptions(), False)
    real = holitom_static.static_selection

    def shifted(features, importance, run, packed, n_slots, *rest):
        packed = packed.clone()
        start = packed[5 * features.shape[0] : 5 * features.shape[0] + n_slots]
        start += (start < features.shape[0] - 2).double()
        return real(features, importance, run, packed, n_slots, *rest)

    monkeypatch.setattr(holitom_static, "static_selection", shifted)
    wrong = _select_video(x, attn, 0.3, HoliTomOptions(), True)
    same = torch.equal(wrong.source, eager.source) and torch.allclose(wrong.features, eager.features, atol=1e-5)
    assert not same


def test_cpu_runs_eager_whatever_the_execution(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("compiled on the CPU")

    monkeypatch.setattr(holitom, "compiled", refuse)
    x, attn = structured_random(1)
    default = holitom_select(x, attn, 0.25, HoliTomOptions(contextual_ratio=0.5))
    eager = holitom_select(x, attn, 0.25, HoliTomOptions(contextual_ratio=0.5, execution="eager"))
    assert torch.equal(default.source, eager.source) and torch.equal(default.features, eager.features)


def test_execution_option() -> None:
    assert HoliTomOptions().execution == "compiled"
    assert parse_options("holitom", HoliTomOptions, {"execution": "eager"}) == HoliTomOptions(execution="eager")
    with pytest.raises(ValueError, match="execution='graph' is not one of compiled, eager"):
        HoliTomOptions(execution="graph")


def test_static_bounds_hold() -> None:
    """The padded output length bounds K for every R; the slots bound the static sets."""
    for seed in range(6):
        x, attn = structured_random(seed + 30, frames=10, positions=20)
        for retention in (0.01, 0.05, 0.1, 0.33, 0.5, 0.77, 1.0):
            try:
                eager = _select_video(x, attn, retention, HoliTomOptions(max_window=2 + seed), False)
            except ValueError:  # kept nothing at a tiny R: the static path raises the same
                with pytest.raises(ValueError, match="kept no token"):
                    _select_video(x, attn, retention, HoliTomOptions(max_window=2 + seed), True)
                continue
            assert eager.source.numel() <= holitom_static.output_length(10, 20, retention)
            static = _select_video(x, attn, retention, HoliTomOptions(max_window=2 + seed), True)
            assert torch.equal(static.source, eager.source)


def test_no_host_sync_op_on_the_static_path() -> None:
    """The one sync is the .tolist() of the run-length counts; the static function dispatches no syncing op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "bincount", "equal"}
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in syncing:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    x, attn = several_window_lengths()
    for options in ({}, {"contextual_ratio": 0.5, "seed": 2}):
        with Watch():
            _select_video(x, attn, 0.25, HoliTomOptions(**options), True)
    assert seen == []


def test_top_and_ahead_are_a_stable_descending_sort() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (6, 30), generator=g).float()  # many ties
    values[values == 0] = -torch.inf
    counts = torch.randint(0, 31, (6,), generator=g)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(30).expand(6, 30))
    assert torch.equal(holitom_static.ahead(values), rank[:, None, :] < rank[:, :, None])
    assert torch.equal(holitom_static.top(values, counts), rank < counts[:, None])


def test_cluster_masked_equals_a_compacted_set() -> None:
    """Members scattered among non-members give the centres and merges of the compacted set."""
    from llava.model.holitom import cluster_merge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 6, generator=g)
    valid = torch.rand(2, 40, generator=g) < 0.7
    count = torch.tensor([5, 0])
    centre, merged = holitom_static.cluster_masked(x, valid, count, 3, 0.6, torch.float32)
    members = valid[0].nonzero().squeeze(1)
    centres, values = cluster_merge(x[0, members], 5, knn=3, beta=0.6)
    assert torch.equal(centre[0].nonzero().squeeze(1), members[centres])
    torch.testing.assert_close(merged[0, members[centres]], values, atol=1e-6, rtol=1e-6)
    assert not centre[1].any()  # a set with no centre


def test_split_bf16_is_exact_and_its_products_are_float32_accurate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 30, 64, generator=g) * torch.logspace(-6, 6, 64)  # every magnitude
    parts = holitom_static.split_bf16(x)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, 90, 64)
    assert torch.equal(parts[:, :30].float() + parts[:, 30:60].float() + parts[:, 60:].float(), x)
    assert torch.equal(holitom_static._bf16_part(x), x.to(torch.bfloat16).float())  # torch's rounding
    y = torch.randn(2, 40, 3584, generator=g) + 3.0  # far from the origin: cancellation in |x|^2 + |y|^2 - 2 x.y
    exact = y.double() @ y.double().transpose(1, 2)
    split = holitom_static._gram(y, holitom_static.split_bf16(y))
    direct = y @ y.transpose(1, 2)
    assert (split.double() - exact).abs().max() <= 2 * (direct.double() - exact).abs().max()
    dist = holitom_static._distances(y, holitom_static.split_bf16(y))
    reference_dist = torch.cdist(y.double(), y.double()) / 3584**0.5
    torch.testing.assert_close(dist.double(), reference_dist, atol=1e-4, rtol=1e-4)
    assert torch.equal(dist.diagonal(dim1=1, dim2=2), torch.zeros(2, 40))


def test_static_with_split_products_matches_eager(monkeypatch) -> None:
    """The CUDA arithmetic of float32 sets (three bf16 parts), forced on the CPU."""
    monkeypatch.setattr(holitom_static, "splits", lambda x: x.dtype == torch.float32)
    x, attn = several_window_lengths()
    for options in ({}, {"contextual_ratio": 0.3, "seed": 4}, {"max_window": 2}):
        assert_same(x, attn, 0.3, **options)
    x, attn = large_sets()
    assert_same(x, attn, 0.1, contextual_ratio=0.5)
    assert_same(x.bfloat16(), attn, 0.1, contextual_ratio=0.5)  # float32 means of bf16 tokens


def test_tau_is_rounded_as_torch_rounds_a_scalar() -> None:
    """The compiled comparison sees tau as a float; the host rounds it first, as the eager comparison does."""
    from llava.model.holitom import _rounded

    g = torch.Generator().manual_seed(0)
    values = [0.8, 0.65, 0.80078125, -0.3, 1 / 3, *(torch.rand(200, generator=g) * 2 - 1).double().tolist()]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        grid = (torch.rand(4000, generator=g) * 2 - 1).to(dtype)
        for value in values:
            assert _rounded(value, dtype) == torch.tensor(value, dtype=dtype).item()
            assert torch.equal(grid > value, grid.float() > _rounded(value, dtype))  # compared in float32
    assert _rounded(0.8, torch.bfloat16) == 0.80078125


# ----------------------------------------------------------------------------------- CUDA: compiled


def cuda_video(seed: int, frames=16, positions=196, dim=256) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with static stretches (windows of several lengths), LLaVA-OV's P."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, positions, dim, generator=g)
    for first, length, share in ((0, 4, 0.8), (5, 3, 0.5), (10, 2, 0.3)):
        static = torch.rand(positions, generator=g) < share
        x[first : first + length, static] = x[first, static] + 0.01 * torch.randn(length, int(static.sum()), dim,
                                                                                   generator=g)  # fmt: skip
    return x, torch.rand(frames, positions, generator=g)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled execution runs there)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"contextual_ratio": 0.3, "seed": 1, "max_window": 3}])
def test_cuda_compiled_matches_eager_and_the_cpu(dtype, options) -> None:
    x, attn = cuda_video(0)
    x = x.to(dtype)
    cpu = holitom_select(x, attn, 0.3, HoliTomOptions(**options))
    out = {}
    for execution in ("compiled", "eager"):
        out[execution] = holitom_select(x.cuda(), attn.cuda(), 0.3, HoliTomOptions(**options, execution=execution))
        assert out[execution].source.is_cuda and out[execution].features.dtype == torch.float32
        assert torch.equal(out[execution].source.cpu(), cpu.source)
        torch.testing.assert_close(out[execution].features.cpu(), cpu.features, atol=1e-4, rtol=1e-4)
    assert torch.equal(out["compiled"].source, out["eager"].source)
    if options:
        return  # the model dtype once (each variant compiles anew)
    model = HoliTomOptions(**options, score_dtype="model")
    compiled_model = holitom_select(x.cuda(), attn.cuda(), 0.3, model)
    eager_model = holitom_select(x.cuda(), attn.cuda(), 0.3, replace_execution(model, "eager"))
    assert compiled_model.features.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(compiled_model.source, eager_model.source)
    else:  # bf16 similarities: compare the counts and most of the tokens (a bf16 tie may flip)
        assert compiled_model.source.numel() == eager_model.source.numel()
        shared = len(set(compiled_model.source.tolist()) & set(eager_model.source.tolist()))
        assert shared >= 0.98 * eager_model.source.numel()


def replace_execution(options: HoliTomOptions, execution: str) -> HoliTomOptions:
    from dataclasses import replace

    return replace(options, execution=execution)


@needs_cuda
def test_cuda_compiled_split_is_exact() -> None:
    """Fused code elides float32 -> bf16 -> float32 casts; the split's bit arithmetic must survive that."""
    x = (torch.randn(4, 50, 256) * torch.logspace(-5, 5, 256)).cuda()
    parts = compiled_select.compiled(holitom_static.split_bf16, "holitom")(x)
    assert torch.equal(parts, holitom_static.split_bf16(x))
    assert torch.equal(parts[:, :50].float() + parts[:, 50:100].float() + parts[:, 100:].float(), x)


@needs_cuda
def test_cuda_compiled_run_counts_match_eager() -> None:
    x, attn = cuda_video(2)
    for dtype in (torch.float32, torch.bfloat16):
        features, importance = x.to(dtype).cuda(), attn.cuda()
        fn = compiled_select.compiled(holitom._run_counts, "holitom")
        tau = holitom._rounded(0.8, torch.float32)
        for width in (16, 3):
            eager = holitom._run_counts(features, importance, tau, width, torch.float32)
            fused = fn(features, importance, tau, width, torch.float32)
            assert torch.equal(eager[0], fused[0]) and torch.equal(eager[1], fused[1])


@needs_cuda
def test_cuda_through_the_method_and_the_nan_check() -> None:
    x, attn = cuda_video(1)
    video = VideoTokens(x.cuda().bfloat16(), (16, 14, 14), {VIT_RECEIVED_ATTENTION: attn.cuda()})
    selection = holitom.METHOD.select(video, 0.25, HoliTomOptions())
    eager = holitom.METHOD.select(video, 0.25, HoliTomOptions(execution="eager"))
    assert torch.equal(selection.source, eager.source)
    bad = x.clone()
    bad[3, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        holitom_select(bad.cuda(), attn.cuda(), 0.25)


@needs_cuda
def test_cuda_another_video_of_the_same_shape_does_not_recompile(monkeypatch) -> None:
    from torch._dynamo.utils import counters

    videos = [cuda_video(seed) for seed in range(4)]
    first = holitom_select(videos[0][0].cuda(), videos[0][1].cuda(), 0.3)  # compiles this shape (or finds it)
    assert first.source.numel() > 0
    monkeypatch.setattr(compiled_select, "MAX_SHAPES", 1)  # a recompile would now raise
    graphs = counters["stats"]["unique_graphs"]
    for x, attn in videos[1:]:
        x, attn = x.cuda(), attn.cuda()
        compiled_out = holitom_select(x, attn, 0.3)
        eager = holitom_select(x, attn, 0.3, HoliTomOptions(execution="eager"))
        assert torch.equal(compiled_out.source, eager.source)
    assert counters["stats"]["unique_graphs"] == graphs
