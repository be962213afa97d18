"""DyCoke TTM: a loop reference of the released algorithm, the R -> k_p mapping, its floor and errors."""

from __future__ import annotations

import pytest
import torch

from llava.model.dycoke import (
    METHOD,
    DyCokeOptions,
    dycoke_keep_indices,
    dycoke_keep_masks,
    dycoke_layout,
    dycoke_plan,
    dycoke_retention,
)
from llava.model.method_api import LLM_ATTENTION_ROWS, VideoTokens, parse_options
from llava.model.vidcom2 import NON_FINITE_MESSAGE

ANCHORS = ("released", "every_window")


# ------------------------------------------------------------------ reference, straight from the spec


def _frame_steps(n_frames, anchors):
    """The spec's two loops, as lists of (reference frame, pruned frame)."""
    pairs = []
    i = 0
    while i + 1 < n_frames:  # pairs (0, 1), (2, 3), ...
        pairs.append((i, i + 1))
        i += 2
    windows = []
    i = 0
    while (i < n_frames - 4) if anchors == "released" else (i + 4 <= n_frames):  # every_window: complete windows
        windows.append((i, i + 2))
        i += 4
    return pairs, windows


def reference_plan(n_frames, per_frame, retention, anchors="released"):
    """(full frames, k_p) or None when R is below the anchors' share (spec 2.4)."""
    pairs, windows = _frame_steps(n_frames, anchors)
    status = {}
    for a, b in pairs:
        status[a] = "full"
        status[b] = "pruned"
    for _, b in windows:
        status[b] = "pruned"
    full = sorted(f for f, s in status.items() if s == "full")
    n_pruned = sum(1 for s in status.values() if s == "pruned")
    if retention * n_frames * per_frame < len(full) * per_frame - 1e-6:
        return None
    k_p = round((retention * n_frames * per_frame - len(full) * per_frame) / n_pruned)
    return full, max(0, min(per_frame, k_p))


def _cosine(u, v):
    u, v = u.double(), v.double()
    return float(u @ v) / (max(float(u.norm()), 1e-8) * max(float(v.norm()), 1e-8))


def _lowest(similarity, count):
    """Positions of the ``count`` lowest similarities; equal ones ranked by position."""
    keep = []
    for m, s in enumerate(similarity):
        rank = sum(1 for q, t in enumerate(similarity) if t < s or (t == s and q < m))
        if rank < count:
            keep.append(m)
    return keep


def reference_ttm(x, k_p, anchors="released"):
    """Kept flat indices, ascending: pairs, then windows on the ORIGINAL features."""
    n_frames, per_frame, _ = x.shape
    pairs, windows = _frame_steps(n_frames, anchors)
    kept = {}
    for a, b in pairs:
        kept[a] = list(range(per_frame))
        kept[b] = _lowest([_cosine(x[a, m], x[b, m]) for m in range(per_frame)], k_p)
    for a, b in windows:
        kept[b] = _lowest([_cosine(x[a, m], x[b, m]) for m in range(per_frame)], k_p)
    return sorted(f * per_frame + m for f, ms in kept.items() for m in ms)


# ------------------------------------------------------------------ inputs


def random_video(frames, tokens=25, dim=8, seed=0, dtype=torch.float32):
    return torch.randn(frames, tokens, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _signs(shape, generator):
    """+-1 entries: with D = 16 every cosine is an exact multiple of 1/16, so ties are exact everywhere."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def scene_cut_video(frames, cut, tokens=16, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    first, second = _signs((tokens, dim), g), _signs((tokens, dim), g)
    video = torch.stack([first if f < cut else second for f in range(frames)])
    video[:, 3] = 0.0  # a zero token: the cosine's eps makes its similarity 0, not NaN
    return video


def moving_object_video(frames, side=5, dim=16, seed=1):
    """A static background with an object moving one column per frame (row 2): positions 10 + f % side."""
    g = torch.Generator().manual_seed(seed)
    background = _signs((side * side, dim), g)
    thing = -background[0]  # far from every background token's position-wise partner
    video = background.repeat(frames, 1, 1)
    for f in range(frames):
        video[f, 2 * side + f % side] = thing
    return video


def _k_p(x, retention, anchors):
    plan = reference_plan(x.shape[0], x.shape[1], retention, anchors)
    assert plan is not None
    return plan[1]


# ------------------------------------------------------------------ the algorithm


@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("frames", [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16])
def test_matches_loop_reference_on_random_videos(frames, anchors):
    for seed, retention in enumerate((0.62, 0.8, 1.0)):
        x = random_video(frames, seed=seed)
        got = dycoke_keep_indices(x, retention, {"anchors": anchors})
        assert got.tolist() == reference_ttm(x, _k_p(x, retention, anchors), anchors)


@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("frames,cut", [(8, 3), (9, 5), (16, 6), (16, 2), (4, 1)])
def test_matches_loop_reference_on_a_static_clip_with_a_scene_cut(frames, cut, anchors):
    x = scene_cut_video(frames, cut)
    for retention in (0.6, 0.75):
        got = dycoke_keep_indices(x, retention, {"anchors": anchors})
        assert got.tolist() == reference_ttm(x, _k_p(x, retention, anchors), anchors)


@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("frames", [8, 11, 16])
def test_matches_loop_reference_on_a_moving_object(frames, anchors):
    x = moving_object_video(frames)
    for retention in (0.55, 0.9):
        got = dycoke_keep_indices(x, retention, {"anchors": anchors})
        assert got.tolist() == reference_ttm(x, _k_p(x, retention, anchors), anchors)


def test_pruned_frames_keep_where_the_object_moved():
    x = moving_object_video(16)
    per_frame = x.shape[1]
    full, k_p = dycoke_plan(16, per_frame, 0.4)
    assert k_p >= 2
    _, pruned, reference = dycoke_layout(16)
    kept = set(dycoke_keep_indices(x, 0.4).tolist())
    for f, r in zip(pruned, reference, strict=True):
        moved = {10 + f % 5, 10 + r % 5}  # the object's positions in the frame and in its reference
        assert {f * per_frame + m for m in moved} <= kept
    for f in full:
        assert set(range(f * per_frame, (f + 1) * per_frame)) <= kept


def test_ties_go_to_the_lower_position_and_zero_tokens_score_zero():
    x = scene_cut_video(4, cut=4)  # static: frame 1 equals frame 0, every similarity is 1 except the zero token's 0
    k_p = dycoke_plan(4, 16, 0.75)[1]
    mask = dycoke_keep_masks([x], 0.75)[0]
    assert mask[1].nonzero().squeeze(1).tolist() == sorted([3] + [m for m in range(16) if m != 3][: k_p - 1])
    x[:, 12] *= 2.0**-20  # a tiny but nonzero token is still similar to itself (the eps only guards zero norms)
    assert torch.equal(dycoke_keep_masks([x], 0.75)[0], mask)
    assert dycoke_keep_indices(x, 0.75).tolist() == reference_ttm(x, k_p)


def test_every_window_differs_only_at_a_multiple_of_four():
    for frames in range(2, 41):
        released, every = dycoke_layout(frames, "released"), dycoke_layout(frames, "every_window")
        assert (released == every) == (frames % 4 != 0 or frames < 4), frames
    assert dycoke_layout(32, "every_window")[0] == list(range(0, 32, 4))
    assert dycoke_layout(4, "released") == ([0, 2], [1, 3], [0, 2])  # F <= 4: no window step
    assert dycoke_layout(4, "every_window") == ([0], [1, 2, 3], [0, 0, 2])


def test_an_odd_last_frame_is_dropped_whole():
    x = random_video(9)
    counts = dycoke_keep_masks([x], 0.7)[0].sum(dim=1)
    assert counts[8] == 0 and (counts[:8] > 0).all()


# ------------------------------------------------------------------ R -> k_p


@pytest.mark.parametrize("anchors", ANCHORS)
def test_plan_follows_the_spec_formula(anchors):
    for frames in range(2, 41):
        for retention in (0.1, 0.25, 0.3, 0.3125, 0.4, 0.5, 0.77, 1.0):
            expected = reference_plan(frames, 196, retention, anchors)
            if expected is None:
                with pytest.raises(ValueError, match="R must be >= "):
                    dycoke_plan(frames, 196, retention, {"anchors": anchors})
            else:
                assert dycoke_plan(frames, 196, retention, {"anchors": anchors}) == expected, (frames, retention)


def test_k_p_examples():
    assert dycoke_plan(32, 196, 0.30) == ([0, 4, 8, 12, 16, 20, 24, 28, 30], 5)
    assert abs(dycoke_retention(32, 196, 0.30) - (9 * 196 + 23 * 5) / (32 * 196)) < 1e-12
    assert dycoke_plan(32, 196, 0.30, {"anchors": "every_window"})[1] == 13
    assert dycoke_plan(32, 196, 0.25, {"anchors": "every_window"})[1] == 0
    assert dycoke_plan(16, 196, 0.40) == ([0, 4, 8, 12, 14], 25)  # Qwen: 16 temporal patches, A = 5
    assert len(dycoke_plan(64, 196, 0.5)[0]) == 17
    assert dycoke_plan(32, 196, 9 / 32)[1] == 0  # exactly at the floor


@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("frames", [2, 5, 8, 9, 16, 17])
def test_achieved_retention_counts(frames, anchors):
    per_frame = 25
    x = random_video(frames, tokens=per_frame, seed=frames)
    for retention in (0.65, 0.85, 1.0):
        full, k_p = dycoke_plan(frames, per_frame, retention, {"anchors": anchors})
        _, pruned, _ = dycoke_layout(frames, anchors)
        counts = dycoke_keep_masks([x], retention, {"anchors": anchors})[0].sum(dim=1).tolist()
        expected = [per_frame if f in full else k_p if f in pruned else 0 for f in range(frames)]
        assert counts == expected
        kept = sum(counts)
        assert kept == len(full) * per_frame + len(pruned) * k_p
        achieved = dycoke_retention(frames, per_frame, retention, {"anchors": anchors})
        assert achieved == kept / (frames * per_frame)
        if frames % 2 == 0:  # the rounding of k_p is within half a token per pruned frame
            assert abs(kept - retention * frames * per_frame) <= len(pruned) / 2 + 1e-9


def test_floor_errors_name_the_floor():
    with pytest.raises(ValueError) as info:
        dycoke_plan(32, 196, 0.25)
    message = str(info.value)
    assert "dycoke keeps frames 0, 4, 8, ..., 28, 30 whole" in message
    assert "R must be >= 9/32 = 0.281 at F = 32 with anchors=released" in message
    with pytest.raises(ValueError, match=r"R must be >= 8/32 = 0\.250 at F = 32 with anchors=every_window"):
        dycoke_plan(32, 196, 0.2, {"anchors": "every_window"})
    with pytest.raises(ValueError, match=r"frames 0, 4, 8, 12, 14 whole: R must be >= 5/16 = 0\.312 at F = 16"):
        dycoke_keep_indices(random_video(16, tokens=4), 0.25)


def test_authors_port_budget():
    options = {"port": "authors"}
    assert dycoke_plan(16, 196, 0.25, options) == ([0, 4, 8, 12, 14], 49)
    assert dycoke_retention(16, 196, 0.25, options) == (5 + 11 * 0.25) / 16  # 48.4% at R = 0.25
    assert dycoke_retention(32, 196, 0.25, options) == (9 + 23 * 0.25) / 32  # 46%
    assert dycoke_plan(32, 196, 0.3, options)[1] == 58  # upstream's int((1 - (1 - 0.3)) * 196): the wrapper default
    for retention in (0.05, 0.1, 0.3, 0.7, 1.0):  # no floor: R is the pruned frames' keep fraction
        k_p = dycoke_plan(32, 196, retention, options)[1]
        assert k_p == int((1 - (1 - retention)) * 196)
        assert dycoke_retention(32, 196, retention, options) >= retention
    x = random_video(8)
    got = dycoke_keep_indices(x, 0.2, {"port": "authors"})
    k_p = int((1 - (1 - 0.2)) * 25)  # upstream's float expression: int(4.999...) = 4, not 5
    assert k_p == 4 and got.tolist() == reference_ttm(x, k_p, "released")


# ------------------------------------------------------------------ contract, dtypes, errors


def test_method_contract_and_sources():
    assert METHOD.name == "dycoke" and not METHOD.merges and METHOD.signals == {LLM_ATTENTION_ROWS}
    assert not METHOD.signals_for(DyCokeOptions()) and METHOD.signals_for(DyCokeOptions(decode_prune=True))
    x = random_video(12, tokens=16)
    options = parse_options("dycoke", METHOD.options, {"anchors": "every_window"})
    selection = METHOD.select(VideoTokens(x, (12, 4, 4)), 0.6, options)
    source = selection.source
    assert selection.features is None and source.dtype == torch.int64
    assert (source[1:] > source[:-1]).all() and source.min() >= 0 and source.max() < 12 * 16
    assert torch.equal(source, dycoke_keep_indices(x, 0.6, options))
    masks = METHOD.masks([x, random_video(12, tokens=16, seed=5)], 0.6, options)
    assert masks.shape == (2, 12, 16) and masks.dtype == torch.bool
    assert torch.equal(masks[0].reshape(-1).nonzero().squeeze(1), source)
    assert torch.equal(masks[1], dycoke_keep_masks([random_video(12, tokens=16, seed=5)], 0.6, options)[0])


def test_deterministic():
    x = random_video(16, seed=3)
    first = dycoke_keep_indices(x, 0.5)
    for _ in range(3):
        assert torch.equal(dycoke_keep_indices(x.clone(), 0.5), first)


def test_bf16_and_fp16_inputs():
    x = random_video(10, seed=4, dtype=torch.bfloat16)
    got = dycoke_keep_indices(x, 0.7)
    assert got.tolist() == reference_ttm(x.float(), _k_p(x, 0.7, "released"))
    assert torch.equal(got, dycoke_keep_indices(x.float(), 0.7))
    half = random_video(10, seed=4, dtype=torch.float16)
    assert torch.equal(dycoke_keep_indices(half, 0.7), dycoke_keep_indices(half.float(), 0.7))
    model = dycoke_keep_indices(x, 0.7, {"score_dtype": "model"})  # bf16 scoring: same budget
    assert model.numel() == got.numel()
    assert torch.equal(dycoke_keep_indices(x.float(), 0.7, {"score_dtype": "model"}), got)  # float32 "model"


def test_unknown_and_bad_options():
    with pytest.raises(ValueError, match=r"unknown dycoke option\(s\) \['merge_ratio'\]; valid options: anchors, port"):
        dycoke_plan(32, 196, 0.5, {"merge_ratio": 0.7})
    with pytest.raises(ValueError, match="anchors='paper' is not one of released, every_window"):
        DyCokeOptions(anchors="paper")
    with pytest.raises(ValueError, match="port='qwen' is not one of original, authors"):
        parse_options("dycoke", DyCokeOptions, {"port": "qwen"})
    with pytest.raises(ValueError, match="score_dtype='fp16' is not one of float32, model"):
        DyCokeOptions(score_dtype="fp16")


def test_input_errors():
    with pytest.raises(ValueError, match="needs F >= 2 frames, got F = 1"):
        dycoke_keep_indices(random_video(1), 0.9)
    with pytest.raises(ValueError, match=r"features must be a \(F, P, D\) tensor of one video, got shape \(4, 8\)"):
        dycoke_keep_indices(torch.zeros(4, 8), 0.5)
    for retention in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
            dycoke_keep_indices(random_video(4), retention)
    with pytest.raises(ValueError, match="videos of one shape"):
        dycoke_keep_masks([random_video(4), random_video(6)], 0.8)


def test_non_finite_input_is_refused():
    bad = random_video(8)
    bad[5, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=NON_FINITE_MESSAGE):
        dycoke_keep_indices(bad, 0.7)
    masks = dycoke_keep_masks([random_video(8), bad], 0.7)
    assert masks[0].any() and not masks[1].any()
