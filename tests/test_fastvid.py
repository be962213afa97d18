"""FastVID: a loop reference of each variant (written from the spec), structured clips, counts, the merge
rule by hand, determinism, errors."""

from __future__ import annotations

import math

import pytest
import torch

from llava.model.fastvid import (
    METHOD,
    FastVIDOptions,
    fastvid_select,
    merge_into_anchors,
    resolve_knobs,
    segment_lengths,
)
from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, VideoTokens, parse_options

# ------------------------------------------------------------------------------------------------
# The reference: plain Python loops per segment, per frame, per token (float64)
# ------------------------------------------------------------------------------------------------

REF_DEFAULTS = {  # c, tau, ignore, d, p, beta
    "onevision": (8, 0.9, None, 0.4, 4, 0.6),
    "video": (8, 0.9, None, 0.4, 4, 0.6),
    "qwen": (8, 0.84, 0.95, 0.4, 4, 0.6),
    "authors": (8, 0.84, 0.99, 0.5, 4, 0.5),
}


def _vec(t):
    return [float(v) for v in t.double().tolist()]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _cos(a, b):
    return _dot(a, b) / (math.sqrt(_dot(a, a)) * math.sqrt(_dot(b, b)))


def ref_segments(glob, c, tau):
    """Segments as lists of frames, and the gap similarities."""
    g = [_vec(row) for row in glob]
    n = len(g)
    sims = [_cos(g[t], g[t + 1]) for t in range(n - 1)]
    lowest = sorted(range(n - 1), key=lambda t: (sims[t], t))[: min(c - 1, n - 1)]
    cuts = sorted(set(lowest) | {t for t in range(n - 1) if sims[t] < tau})
    segments, start = [], 0
    for t in cuts:
        segments.append(list(range(start, t + 1)))
        start = t + 1
    segments.append(list(range(start, n)))
    return segments, sims


def ref_centres(vectors, k, count):
    """DPC-kNN: positions (into ``vectors``) of the ``count`` best rho * delta, ties to the lower position."""
    n, dim = len(vectors), len(vectors[0])
    dist = [
        [math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True))) / math.sqrt(dim) for v in vectors]
        for u in vectors
    ]
    rho = []
    for i in range(n):
        nearest = sorted(dist[i])[: min(k, n)]
        rho.append(math.exp(-sum(v * v for v in nearest) / len(nearest)))
    far = max(max(row) for row in dist)
    score = []
    for i in range(n):
        denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta = min(dist[i][j] for j in denser) if denser else far
        score.append(rho[i] * delta)
    return sorted(range(n), key=lambda i: (-score[i], i))[:count]


def ref_budgets(variant, segments, sims, n_frames, per_frame, r_f, d, p, ignore, authors):
    """Salient and anchor count of every frame, and each frame's merge scope (list of frames)."""
    sal, ctx, scope = [0] * n_frames, [0] * n_frames, [None] * n_frames
    for seg in segments:
        length = len(seg)
        for f in seg:
            scope[f] = seg
        if variant == "onevision":
            n_sal = r_f - int(r_f * d)
            n_ctx = r_f - n_sal
            anchor_frames = [seg[j] for j in range(length) if (length - 1 - j) % p == 0]
            count = min(n_ctx * length // len(anchor_frames), per_frame - n_sal)
            for f in seg:
                sal[f] = n_sal
                ctx[f] = count if f in anchor_frames else 0
            if length == 1:
                scope[seg[0]] = [seg[0]]
            continue
        seg_retain = r_f * length
        seg_ctx = int(seg_retain * d)
        if variant == "qwen":
            seg_ctx = max(seg_ctx, 1)
            if authors and seg_retain == 1:
                seg_ctx = 0
        seg_sal = seg_retain - seg_ctx
        if variant == "qwen" and length == 1:
            sal[seg[0]], ctx[seg[0]] = seg_sal, seg_ctx
            continue
        if variant == "video":
            units = [[f] for f in seg]
        else:  # qwen: sub-segments at near-duplicate breaks, only their last frames get tokens
            units, current = [], []
            for f in seg:
                current.append(f)
                if f == seg[-1] or sims[f] < ignore:
                    units.append(current)
                    current = []
        v = len(units)
        for i, unit in enumerate(units):
            sal[unit[-1]] = seg_sal // v + (1 if i < seg_sal % v else 0)
        anchor_units = [i for i in range(v) if (v - 1 - i) % p == 0]  # every p-th counted back from the last
        n_anchor = len(anchor_units)
        for back, i in enumerate(sorted(anchor_units, reverse=True)):  # the last unit first: it gets remainder
            share = seg_ctx // n_anchor + (1 if back < seg_ctx % n_anchor else 0)
            last = units[i][-1]
            if variant == "qwen":
                share = min(share, per_frame // 2)
            else:
                share = min(share, per_frame - sal[last])
            ctx[last] = share
        if variant == "qwen":
            for unit in units:
                sal[unit[-1]] = min(sal[unit[-1]], per_frame - ctx[unit[-1]])
    return sal, ctx, scope


def ref_fastvid(x, salience, glob, retention, variant, *, c=None, tau=None, ignore=None, d=None, p=None, beta=None,
                k=4, authors=False):
    """{source: value} of FastVID, from the spec's description, loops everywhere."""
    dc, dtau, dig, dd, dp, dbeta = REF_DEFAULTS["authors" if authors else variant]
    c, p = c or dc, p or dp
    tau, d = dtau if tau is None else tau, dd if d is None else d
    beta, ignore = dbeta if beta is None else beta, dig if ignore is None else ignore
    n_frames, per_frame, _ = x.shape
    vec = [[_vec(x[f, i]) for i in range(per_frame)] for f in range(n_frames)]
    if authors:
        sal_score = [[math.sqrt(_dot(v, v)) for v in row] for row in vec]
    else:
        sal_score = salience.tolist()
    r_f = int(per_frame * retention)
    segments, sims = ref_segments(glob, c, tau)
    sal, ctx, scope = ref_budgets(variant, segments, sims, n_frames, per_frame, r_f, d, p, ignore, authors)
    salient = set()
    for f in range(n_frames):
        top = sorted(range(per_frame), key=lambda i: (-sal_score[f][i], i))[: sal[f]]
        salient |= {f * per_frame + i for i in top}
    out = {s: vec[s // per_frame][s % per_frame] for s in salient}
    for f in range(n_frames):
        if ctx[f] == 0:
            continue
        rest = [i for i in range(per_frame) if f * per_frame + i not in salient]
        picks = ref_centres([vec[f][i] for i in rest], k, ctx[f])
        anchors = [f * per_frame + rest[j] for j in picks]
        if variant != "onevision":
            anchors = sorted(anchors)
        candidates = []
        for g in scope[f]:
            for i in range(per_frame):
                s = g * per_frame + i
                if s in salient or (variant != "onevision" and s in anchors):
                    continue
                candidates.append(s)
        cluster = {a: [] for a in anchors}
        for s in candidates:
            v = vec[s // per_frame][s % per_frame]
            best, best_cos = None, -math.inf
            for a in anchors:
                cos = _cos(v, vec[a // per_frame][a % per_frame])
                if cos > best_cos:
                    best, best_cos = a, cos
            cluster[best].append(v)
        for a in anchors:
            av, members = vec[a // per_frame][a % per_frame], cluster[a]
            w = max(1.0 / (len(members) + 1), beta)
            mean = [sum(col) / len(members) for col in zip(*members, strict=True)] if members else [0.0] * len(av)
            out[a] = [w * u + (1 - w) * m for u, m in zip(av, mean, strict=True)]
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_video(frames=12, tokens=30, dim=12, seed=0, spread=0.25):
    """Random tokens, random salience, frame globals near one direction (so segments have several frames)."""
    g = gen(seed)
    x = torch.randn(frames, tokens, dim, generator=g)
    salience = torch.rand(frames, tokens, generator=g)
    glob = torch.randn(1, 8, generator=g) + spread * torch.randn(frames, 8, generator=g)
    return x, salience, glob


def static_clip_with_cut(frames=12, cut=6, tokens=30, dim=12, seed=1):
    """Scene A for frames < cut, scene B after, each frame its scene plus 1e-3 noise; globals = frame means."""
    g = gen(seed)
    a, b = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    x = torch.stack([a if f < cut else b for f in range(frames)]) + 1e-3 * torch.randn(frames, tokens, dim, generator=g)
    return x, torch.rand(frames, tokens, generator=g), x.mean(dim=1)


def moving_object(frames=10, tokens=30, dim=12, seed=2):
    """A static background and one object token that moves one position per frame; globals = frame means."""
    g = gen(seed)
    background = torch.randn(tokens, dim, generator=g)
    thing = 3 * torch.randn(dim, generator=g)
    x = background.repeat(frames, 1, 1) + 1e-3 * torch.randn(frames, tokens, dim, generator=g)
    for f in range(frames):
        x[f, (2 + f) % tokens] = thing
    return x, torch.rand(frames, tokens, generator=g), x.mean(dim=1)


def check_against_reference(x, salience, glob, retention, variant, authors=False, **knobs):
    names = {"c": "dyseg_c", "tau": "dyseg_tau", "ignore": "dyseg_ignore", "d": "stprune_d", "p": "dtm_p",
             "beta": "dtm_beta", "k": "density_k"}
    want = ref_fastvid(x, salience, glob, retention, variant, authors=authors, **knobs)
    for execution in ("eager", "static"):  # the layout read on the host, and the static-shape formulation
        options = FastVIDOptions(variant="auto" if authors else variant, port="authors" if authors else "original",
                                 execution=execution, **{names[key]: value for key, value in knobs.items()})
        got = fastvid_select(x, None if authors else salience, glob, retention, options)
        assert got.source.tolist() == list(want), execution
        assert got.features.dtype == torch.float32 and got.features.shape == (len(want), x.shape[-1])
        torch.testing.assert_close(got.features.double(), torch.tensor(list(want.values()), dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)
    return got


# ------------------------------------------------------------------------------------------------
# Equivalence with the reference
# ------------------------------------------------------------------------------------------------

VARIANTS = ("onevision", "video", "qwen")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed,retention", [(0, 0.25), (1, 0.5), (2, 0.1), (3, 1.0)])
def test_random_matches_reference(variant, seed, retention):
    x, salience, glob = random_video(seed=seed)
    check_against_reference(x, salience, glob, retention, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("knobs", [dict(c=3, tau=0.5, p=2), dict(c=1, tau=-1.0, p=3, beta=0.2, d=0.7),
                                   dict(c=2, p=1, ignore=0.99)])
def test_random_other_knobs_match_reference(variant, knobs):
    if variant != "qwen":
        knobs = {key: value for key, value in knobs.items() if key != "ignore"}
    x, salience, glob = random_video(frames=10, seed=5, spread=0.15)
    check_against_reference(x, salience, glob, 0.3, variant, **knobs)


def test_random_inputs_make_multi_frame_segments():
    """The random globals are not a degenerate case: segments of several frames and 1-frame ones occur."""
    lengths = segment_lengths(random_video(seed=0)[2], 8, 0.9)
    assert sum(lengths) == 12 and max(lengths) >= 3 and min(lengths) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_clip_with_scene_cut(variant):
    x, salience, glob = static_clip_with_cut()
    assert segment_lengths(glob, 2, 0.5) == [6, 6]
    assert segment_lengths(glob, 1, 0.9) == [6, 6]  # the tau cut alone finds it
    got = check_against_reference(x, salience, glob, 0.25, variant, c=2, tau=0.5)
    frames = torch.bincount(got.source // 30, minlength=12)
    if variant == "qwen":  # near-duplicate frames: only each segment's last frame keeps tokens
        assert frames.nonzero().squeeze(1).tolist() == [5, 11]
    if variant == "onevision":  # anchor frames: last and 4 before it, in each segment
        r_f = 7
        n_sal = r_f - int(r_f * 0.4)
        anchors = (r_f - n_sal) * 6 // 2
        assert frames.tolist() == [n_sal + (anchors if f in (1, 5, 7, 11) else 0) for f in range(12)]
    check_against_reference(x, salience, glob, 0.25, variant)  # default knobs too


@pytest.mark.parametrize("variant", VARIANTS)
def test_moving_object_matches_reference(variant):
    x, salience, glob = moving_object()
    check_against_reference(x, salience, glob, 0.3, variant)
    check_against_reference(x, salience, glob, 0.3, variant, c=1, tau=0.5)


def test_authors_port_matches_reference():
    x, salience, glob = random_video(seed=7, spread=0.1)
    got = check_against_reference(x, salience, glob, 0.25, "qwen", authors=True)
    # the port ignores FRAME_SALIENCE: another salience gives the same result
    again = fastvid_select(x, torch.rand(12, 30), glob, 0.25, FastVIDOptions(port="authors"))
    assert torch.equal(got.source, again.source)
    # seg_ctx = 0 when a 1-frame segment keeps one token (the original gives that token to context)
    x, salience, glob = random_video(frames=4, tokens=10, seed=8)
    port = check_against_reference(x, salience, glob, 0.1, "qwen", authors=True, c=8)
    assert port.source.numel() == 4
    assert torch.equal(port.features, x.reshape(40, -1)[port.source])  # all salient: untouched


# ------------------------------------------------------------------------------------------------
# Counts and properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retention,budget", [(0.25, (49, 30, 19)), (0.15, (29, 18, 11)), (0.10, (19, 12, 7))])
def test_onevision_counts_at_the_spec_numbers(retention, budget):
    """LLaVA-OV, P = 196: r_f / n_sal / n_ctx as the spec lists them, and per-frame counts by segment."""
    r_f, n_sal, n_ctx = budget
    g = gen(3)
    x = torch.randn(9, 196, 6, generator=g)
    glob = torch.randn(1, 4, generator=g) + 0.3 * torch.randn(9, 4, generator=g)
    got = fastvid_select(x, torch.rand(9, 196, generator=g), glob, retention, FastVIDOptions(variant="onevision"))
    assert int(196 * retention) == r_f and r_f - int(r_f * 0.4) == n_sal
    expected = []
    for seg in ref_segments(glob, 8, 0.9)[0]:
        count = n_ctx * len(seg) // math.ceil(len(seg) / 4)
        expected += [n_sal + (count if (len(seg) - 1 - j) % 4 == 0 else 0) for j in range(len(seg))]
    assert torch.bincount(got.source // 196, minlength=9).tolist() == expected
    assert got.source.numel() <= 9 * r_f


def test_video_variant_keeps_exactly_r_f_per_frame_equivalent():
    x, salience, glob = random_video(frames=16, tokens=169, dim=6, seed=4)
    got = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="video"))
    assert got.source.numel() == 16 * int(169 * 0.25)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sources_are_valid(variant):
    x, salience, glob = random_video(frames=7, tokens=40, seed=9)
    for retention in (0.05, 0.2, 0.6, 1.0):
        source = fastvid_select(x, salience, glob, retention, FastVIDOptions(variant=variant)).source
        assert source.dtype == torch.int64 and source.numel() > 0
        assert torch.all(source[1:] > source[:-1]) and source.min() >= 0 and source.max() < 7 * 40
        assert source.numel() <= 7 * int(40 * retention)


def test_upstream_crash_cases_are_handled():
    # F - 1 < c - 1: every gap is a cut (1-frame segments)
    x, salience, glob = random_video(frames=3, seed=10)
    check_against_reference(x, salience, glob, 0.25, "onevision")
    assert segment_lengths(glob, 8, 0.9) == [1, 1, 1]
    # a single frame
    x, salience, glob = random_video(frames=1, seed=11)
    for variant in VARIANTS:
        check_against_reference(x, salience, glob, 0.25, variant)
    # onevision at R = 0.5: 4 * n_ctx anchors asked in a 4-frame segment, capped at the non-salient tokens
    x, salience, glob = static_clip_with_cut(frames=8, cut=4)
    got = check_against_reference(x, salience, glob, 0.5, "onevision", c=2, tau=0.5)
    n_sal = 15 - int(15 * 0.4)
    assert torch.bincount(got.source // 30, minlength=8).tolist() == [n_sal, n_sal, n_sal, 30] * 2
    # no cut at all (c = 1, tau below every similarity): one segment
    assert segment_lengths(glob, 1, -1.0) == [8]
    check_against_reference(x, salience, glob, 0.25, "video", c=1, tau=-1.0)


def test_zero_vectors_do_not_give_nan():
    x, salience, glob = random_video(frames=4, seed=12)
    x[:, :5] = 0
    glob[1] = 0
    got = fastvid_select(x, salience, glob, 0.4, FastVIDOptions(variant="onevision"))
    assert torch.isfinite(got.features).all()


def test_salient_tokens_keep_their_features_and_anchors_merge():
    x, salience, glob = random_video(seed=13)
    got = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="video"))
    same = (got.features == x.reshape(-1, 12)[got.source]).all(dim=1)
    top = torch.sort(salience, dim=1, descending=True, stable=True).indices
    assert same.any() and not same.all()
    for s in got.source[same][:5].tolist():  # untouched tokens are salient: high salience in their frame
        assert (top[s // 30] == s % 30).nonzero().item() < 12


def test_bf16_and_model_dtype_merge():
    x, salience, glob = random_video(seed=14)
    xb = x.to(torch.bfloat16)
    a = fastvid_select(xb, salience, glob, 0.25, FastVIDOptions(variant="onevision"))
    b = fastvid_select(xb, salience, glob, 0.25, FastVIDOptions(variant="onevision", merge_dtype="model"))
    assert a.features.dtype == torch.float32 and b.features.dtype == torch.bfloat16
    assert torch.equal(a.source, b.source)
    torch.testing.assert_close(b.features.float(), a.features, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------------------------------------
# The merge rule by hand
# ------------------------------------------------------------------------------------------------

TOKENS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0], [1.0, 1.0]])  # anchors: rows 0, 1


def test_merge_rule_by_hand_anchors_join_their_cluster():
    every = torch.ones(5, dtype=torch.bool)
    # cluster of 0: rows 0, 2, 4 (row 4 ties: the first anchor); of 1: rows 1, 3
    got = merge_into_anchors(TOKENS, every, torch.tensor([0, 1]), 0.6, torch.float32)
    mean0, mean1 = torch.tensor([4 / 3, 1.1 / 3]), torch.tensor([0.05, 2.0])
    want = torch.stack([0.6 * TOKENS[0] + 0.4 * mean0, 0.6 * TOKENS[1] + 0.4 * mean1])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, torch.tensor([[1.133333, 0.146667], [0.02, 1.4]]))
    # beta below 1 / (|cluster| + 1): w = 1/4 and 1/3
    got = merge_into_anchors(TOKENS, every, torch.tensor([0, 1]), 0.2, torch.float32)
    torch.testing.assert_close(got, torch.tensor([[1.25, 0.275], [0.1 / 3, 5 / 3]]))
    # the tie goes to the anchor listed first
    got = merge_into_anchors(TOKENS, every, torch.tensor([1, 0]), 0.2, torch.float32)
    # (row 4 now joins anchor 1: its cluster is rows 1, 3, 4 with w = 1/4; anchor 0's is rows 0, 2, w = 1/3)
    torch.testing.assert_close(got, torch.tensor([[0.275, 1.5], [4 / 3, 0.1 / 3]]))


def test_merge_rule_by_hand_anchors_excluded_and_empty_cluster():
    candidate = torch.tensor([False, False, True, True, True])
    got = merge_into_anchors(TOKENS, candidate, torch.tensor([0, 1]), 0.6, torch.float32)
    torch.testing.assert_close(got, torch.tensor([[1.2, 0.22], [0.04, 1.8]]))
    only_two = torch.tensor([False, False, True, False, False])
    got = merge_into_anchors(TOKENS, only_two, torch.tensor([0, 1]), 0.6, torch.float32)
    torch.testing.assert_close(got, torch.tensor([[0.6 + 0.8, 0.04], [0.0, 1.0]]))  # anchor 1 unchanged


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("first,second", [(3, 7), (7, 3)])
def test_cosine_ties_between_anchors(variant, first, second):
    """Anchors a and 2a in the last frame, candidate 3a in the first: an exact cosine tie. onevision gives it
    to the anchor of higher density score, video / qwen to the lower index (each script's anchor order)."""
    g = gen(24)
    x = torch.randn(2, 12, 6, generator=g)
    a = torch.randn(6, generator=g)
    x[1, first], x[1, second], x[0, 5] = a, 2 * a, 3 * a
    salience = 0.5 + torch.rand(2, 12, generator=g)
    salience[1, first] = salience[1, second] = salience[0, 5] = 0.0
    glob = torch.ones(2, 4)
    knobs = dict(c=1, tau=-1.0, ignore=-1.0) if variant == "qwen" else dict(c=1, tau=-1.0)
    got = check_against_reference(x, salience, glob, 1.0, variant, **knobs)
    assert {12 + first, 12 + second} <= set(got.source.tolist())


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def tied_video():
    """One frame whose tokens come in identical pairs: every density has a tie."""
    g = gen(15)
    half = torch.randn(1, 10, 6, generator=g)
    x = torch.cat([half, half], dim=1)
    return x, torch.rand(1, 20, generator=g), torch.randn(1, 4, generator=g)


def test_deterministic_without_seed_and_index_tie_break():
    x, salience, glob = random_video(seed=16)
    options = FastVIDOptions(variant="qwen")
    a, b = fastvid_select(x, salience, glob, 0.3, options), fastvid_select(x, salience, glob, 0.3, options)
    assert torch.equal(a.source, b.source) and torch.equal(a.features, b.features)
    x, salience, glob = tied_video()
    check_against_reference(x, salience, glob, 0.5, "onevision")  # ties: the lower index is denser


def test_seed_reproduces_and_breaks_ties_like_upstream():
    x, salience, glob = tied_video()
    runs = {}
    for seed in range(8):
        options = FastVIDOptions(variant="onevision", seed=seed)
        first = fastvid_select(x, salience, glob, 0.5, options)
        second = fastvid_select(x, salience, glob, 0.5, options)
        assert torch.equal(first.source, second.source) and torch.equal(first.features, second.features)
        runs[seed] = tuple(first.source.tolist())
    assert len(set(runs.values())) > 1  # the noise decides the ties, so seeds differ
    # without ties the noise (1e-6) changes nothing
    x, salience, glob = random_video(seed=17)
    plain = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="onevision"))
    seeded = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="onevision", seed=3))
    assert torch.equal(plain.source, seeded.source)


# ------------------------------------------------------------------------------------------------
# Variants, options, the Method
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", [("llava_onevision", "onevision"), ("llava_video", "video"),
                                            ("qwen2_vl", "qwen"), ("qwen2_5_vl", "qwen"), ("qwen3_vl", "qwen")])
def test_auto_variant_by_family(family, variant):
    x, salience, glob = random_video(seed=18, spread=0.1)
    auto = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(), family=family)
    explicit = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant=variant))
    assert torch.equal(auto.source, explicit.source) and torch.equal(auto.features, explicit.features)
    assert resolve_knobs(FastVIDOptions(), family).variant == variant


def test_variant_defaults():
    ov = resolve_knobs(FastVIDOptions(variant="onevision"))
    assert (ov.c, ov.tau, ov.ignore, ov.d, ov.p, ov.beta, ov.k) == (8, 0.9, None, 0.4, 4, 0.6, 4)
    qwen = resolve_knobs(FastVIDOptions(), "qwen2_5_vl")
    assert (qwen.c, qwen.tau, qwen.ignore, qwen.d, qwen.p, qwen.beta) == (8, 0.84, 0.95, 0.4, 4, 0.6)
    port = resolve_knobs(FastVIDOptions(port="authors"), "llava_onevision")
    assert (port.variant, port.tau, port.ignore, port.d, port.beta) == ("qwen", 0.84, 0.99, 0.5, 0.5)
    assert port.authors
    custom = resolve_knobs(FastVIDOptions(dyseg_tau=0.5, dtm_p=2), "llava_video")
    assert (custom.variant, custom.tau, custom.p, custom.d) == ("video", 0.5, 2, 0.4)


def test_qwen_ignore_changes_which_frames_keep_tokens():
    x, salience, glob = static_clip_with_cut(frames=8, cut=4)
    loose = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="qwen", dyseg_c=2, dyseg_ignore=-1.0))
    strict = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="qwen", dyseg_c=2, dyseg_ignore=1.0))
    assert torch.unique(loose.source // 30).tolist() == [3, 7]
    assert torch.unique(strict.source // 30).tolist() == list(range(8))


@pytest.mark.parametrize("family", ["", "llava_next"])
def test_unknown_family_asks_for_a_variant(family):
    x, salience, glob = random_video(seed=19)
    with pytest.raises(ValueError, match=r"cannot pick its variant for model family .*set the option variant to one "
                                         r"of onevision, video, qwen"):
        fastvid_select(x, salience, glob, 0.25, FastVIDOptions(), family=family)


@pytest.mark.parametrize("options,message", [
    ({"variant": "llava"}, "option variant='llava' is not one of auto, onevision, video, qwen"),
    ({"port": "vidcom2"}, "option port='vidcom2' is not one of original, authors"),
    ({"merge_dtype": "bf16"}, "merge_dtype='bf16' is not one of float32, model"),
    ({"dyseg_c": 0}, "dyseg_c must be an integer >= 1, got 0"),
    ({"dtm_p": 0}, "dtm_p must be an integer >= 1"),
    ({"density_k": 0}, "density_k must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"dyseg_tau": 1.5}, r"dyseg_tau must be in \[-1.0, 1.0\], got 1.5"),
    ({"dyseg_ignore": -2}, r"dyseg_ignore must be in \[-1.0, 1.0\]"),
    ({"stprune_d": 1.2}, r"stprune_d must be in \[0.0, 1.0\]"),
    ({"dtm_beta": -0.1}, r"dtm_beta must be in \[0.0, 1.0\]"),
    ({"variant": "video", "dyseg_ignore": 0.9}, "dyseg_ignore applies to the qwen variant only"),
    ({"port": "authors", "variant": "onevision"}, "port=authors is the qwen variant"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options("fastvid", FastVIDOptions, options)


def test_option_parsing_and_unknown_names():
    parsed = parse_options("fastvid", FastVIDOptions, {"dyseg_c": "4", "seed": "none", "dtm_beta": "0.5"})
    assert (parsed.dyseg_c, parsed.seed, parsed.dtm_beta) == (4, None, 0.5)
    with pytest.raises(ValueError, match=r"unknown fastvid option\(s\) \['tau'\]; valid options: variant, port, "
                                         r"dyseg_c, dyseg_tau, dyseg_ignore"):
        parse_options("fastvid", FastVIDOptions, {"tau": 0.9})
    x, salience, glob = random_video(seed=20)
    with pytest.raises(ValueError, match="dyseg_ignore applies to the qwen variant only, not 'onevision'"):
        fastvid_select(x, salience, glob, 0.25, FastVIDOptions(dyseg_ignore=0.9), family="llava_onevision")


@pytest.mark.parametrize("retention,message", [(0.0, r"retention must be in \(0, 1\]"), (1.5, r"retention must be in"),
                                               (0.02, r"fastvid needs R >= 1/P = 0.03333 \(P = 30")])
def test_retention_range_and_floor(retention, message):
    x, salience, glob = random_video(seed=21)
    with pytest.raises(ValueError, match=message):
        fastvid_select(x, salience, glob, retention, FastVIDOptions(variant="video"))
    check_against_reference(x, salience, glob, 1 / 30 + 1e-9, "video")  # at the floor: one token per frame


def test_bad_shapes_and_non_finite():
    x, salience, glob = random_video(seed=22)
    options = FastVIDOptions(variant="onevision")
    with pytest.raises(ValueError, match=r"signal frame_salience must have shape \(12, 30\), got \(12, 29\)"):
        fastvid_select(x, salience[:, 1:], glob, 0.25, options)
    with pytest.raises(ValueError, match=r"signal frame_global must have shape \(12, G\), got \(11, 8\)"):
        fastvid_select(x, salience, glob[1:], 0.25, options)
    with pytest.raises(ValueError, match=r"signal frame_salience must have shape .*got NoneType"):
        fastvid_select(x, None, glob, 0.25, options)
    with pytest.raises(ValueError, match=r"features must be a \(F, P, D\) tensor"):
        fastvid_select(x[0], salience, glob, 0.25, options)
    x[3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        fastvid_select(x, salience, glob, 0.25, options)


def tokens_of(x, salience, glob, family=""):
    return VideoTokens(x, (x.shape[0], 5, 6), {FRAME_SALIENCE: salience, FRAME_GLOBAL: glob}, family=family)


def test_method_declaration_and_select():
    assert METHOD.name == "fastvid" and METHOD.merges and METHOD.options is FastVIDOptions
    assert METHOD.signals == frozenset({FRAME_SALIENCE, FRAME_GLOBAL})
    assert METHOD.signals_for(FastVIDOptions()) == METHOD.signals
    assert METHOD.signals_for(FastVIDOptions(port="authors")) == frozenset({FRAME_GLOBAL})
    x, salience, glob = random_video(seed=23)
    got = METHOD.select(tokens_of(x, salience, glob, "llava_video"), 0.25, FastVIDOptions())
    want = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant="video"))
    assert torch.equal(got.source, want.source) and torch.equal(got.features, want.features)
    with pytest.raises(ValueError, match="model family ''"):
        METHOD.select(tokens_of(x, salience, glob), 0.25, FastVIDOptions())
    port = METHOD.select(VideoTokens(x, (12, 5, 6), {FRAME_GLOBAL: glob}), 0.25, FastVIDOptions(port="authors"))
    assert torch.equal(port.source, fastvid_select(x, None, glob, 0.25, FastVIDOptions(port="authors")).source)


# ------------------------------------------------------------------------------------------------
# The batched hot path: equal to the per-anchor-frame loop, one host sync, ops independent of the segments
# ------------------------------------------------------------------------------------------------

from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from llava.model.dpc_knn import dpc_centres  # noqa: E402
from llava.model.fastvid import (  # noqa: E402
    batched_dpc_ranks,
    frame_budgets,
    gap_flags,
    padded_distances,
    segments_from_cuts,
)


def loop_fastvid(x, salience, glob, retention, options, family=""):
    """The method as a loop over anchor frames: per frame DPC-kNN on its non-salient tokens, then the merge of
    its segment's candidates (the straightforward form the batched code replaces)."""
    knobs = resolve_knobs(options, family)
    n_frames, per_frame, dim = x.shape
    if knobs.authors:
        salience = x.float().norm(dim=-1)
    r_f = int(per_frame * retention)
    cut, near = gap_flags(glob, knobs.c, knobs.tau, knobs.ignore)
    budgets = frame_budgets(knobs, segments_from_cuts(cut), near, per_frame, r_f)
    order = torch.sort(salience.float(), dim=1, descending=True, stable=True).indices
    dtype = torch.float32 if options.merge_dtype == "float32" else x.dtype
    generator = None if options.seed is None else torch.Generator().manual_seed(options.seed)
    out = {}
    for f in range(n_frames):
        for i in order[f, : budgets.salient[f]].tolist():
            out[f * per_frame + i] = x[f, i].to(dtype)
    for f in range(n_frames):
        count = budgets.anchors[f]
        if count == 0:
            continue
        rest = order[f, budgets.salient[f]:].sort().values
        picks = dpc_centres(x[f, rest], knobs.k, count, generator=generator)
        anchors = f * per_frame + rest[picks]
        if knobs.variant != "onevision":
            anchors = anchors.sort().values
        lo, hi = budgets.scope[f]
        candidate = torch.ones((hi - lo) * per_frame, dtype=torch.bool)
        for g in range(lo, hi):
            for i in order[g, : budgets.salient[g]].tolist():
                candidate[(g - lo) * per_frame + i] = False
        local = anchors - lo * per_frame
        if knobs.variant != "onevision":
            candidate[local] = False
        tokens = x.reshape(-1, dim)[lo * per_frame : hi * per_frame]
        new = merge_into_anchors(tokens, candidate, local, knobs.beta, dtype)
        for a, value in zip(anchors.tolist(), new, strict=True):
            out[a] = value
    keys = sorted(out)
    return torch.tensor(keys, dtype=torch.int64), torch.stack([out[k] for k in keys])


def assert_same_as_loop(x, salience, glob, retention, options, family="", atol=1e-6):
    got = fastvid_select(x, salience, glob, retention, options, family=family)
    source, features = loop_fastvid(x, salience, glob, retention, options, family)
    assert torch.equal(got.source, source)
    assert got.features.dtype == features.dtype
    torch.testing.assert_close(got.features, features, atol=atol, rtol=1e-5)
    return got


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["random", "scene", "duplicates", "seed", "bf16", "model"])
def test_batched_equals_the_anchor_frame_loop(variant, case):
    """P = 64 (cdist's matmul form), long and short segments, several anchor frames per segment."""
    g = gen(30)
    x = torch.randn(14, 64, 10, generator=g)
    salience = torch.rand(14, 64, generator=g)
    glob = torch.randn(1, 6, generator=g) + 0.3 * torch.randn(14, 6, generator=g)
    options = dict(variant=variant, dtm_p=2)
    if case == "scene":
        x, salience, glob = static_clip_with_cut(frames=14, cut=9, tokens=64, dim=10)
    if case == "duplicates":  # exact density ties everywhere
        x[:, 32:] = x[:, :32]
    if case == "seed":
        x[:, 32:] = x[:, :32]
        options["seed"] = 11
    if case in ("bf16", "model"):
        x = x.to(torch.bfloat16)
    if case == "model":
        options["merge_dtype"] = "model"
    lengths = segment_lengths(glob, 8, 0.84 if variant == "qwen" else 0.9)
    assert max(lengths) >= 3
    for retention in (0.1, 0.3, 0.8):
        atol = 1e-2 if case == "model" else 1e-6
        assert_same_as_loop(x, salience, glob, retention, FastVIDOptions(**options), atol=atol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_the_loop_at_edges(variant):
    x, salience, glob = random_video(frames=9, tokens=20, dim=6, seed=31)
    x[:, 10:] = x[:, :10]  # duplicated tokens: exact ties decided by index
    for knobs in (dict(stprune_d=0.0), dict(stprune_d=1.0), dict(density_k=1), dict(density_k=30), dict(dtm_p=1),
                  dict(dyseg_c=1, dyseg_tau=-1.0)):
        for retention in (0.05, 0.5, 1.0):
            assert_same_as_loop(x, salience, glob, retention, FastVIDOptions(variant=variant, **knobs))
    assert_same_as_loop(x, None, glob, 0.3, FastVIDOptions(port="authors"))


def test_frames_on_both_sides_of_cdist_method_switch():
    """video variant, P = 40: anchor frames keep 20-39 non-salient tokens, so the padded batch mixes frames that
    cdist alone computes by exact differences (<= 25 rows) and by a matmul (> 25): each keeps its own."""
    g = gen(32)
    x = torch.randn(6, 40, 8, generator=g)
    x[:, 20:] = x[:, :20]  # duplicates: distance exactly 0 by differences, ~1e-4 by the matmul form
    salience = torch.rand(6, 40, generator=g)
    glob = torch.ones(6, 4)
    glob[3] = -1.0  # segments [0..2], [3], [4, 5]
    options = FastVIDOptions(variant="video", dyseg_c=1, dtm_p=1)
    sizes = [40 - s for s, a in zip(*_budget_lists(x, salience, glob, 0.6, options), strict=True) if a]
    assert min(sizes) <= 25 < max(sizes)
    assert_same_as_loop(x, salience, glob, 0.6, options)


def _budget_lists(x, salience, glob, retention, options):
    knobs = resolve_knobs(options)
    cut, near = gap_flags(glob, knobs.c, knobs.tau, knobs.ignore)
    budgets = frame_budgets(knobs, segments_from_cuts(cut), near, x.shape[1], int(x.shape[1] * retention))
    return budgets.salient, budgets.anchors


def test_batched_dpc_ranks_match_one_frame_at_a_time():
    """Rows of different lengths (some below k, some across 25), ties, noise: each row ranks its tokens as
    dpc_centres does on that row alone (noise: the same draws), and the padding ranks last."""
    g = gen(33)
    counts = [3, 1, 40, 25, 26, 12]
    width = max(counts)
    x = torch.randn(len(counts), width, 5, generator=g)
    x[:, 1::2] = x[:, ::2][:, : width // 2]  # pairs of equal tokens: exact density ties
    valid = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]
    dist = padded_distances(x, counts, torch.tensor(counts))
    noise = torch.zeros(len(counts), width)
    for b, n in enumerate(counts):
        noise[b, :n] = torch.rand(n, generator=gen(100 + b))
    for k in (1, 4):
        for seeded in (False, True):
            ranks = batched_dpc_ranks(dist, k, counts=counts, valid=valid, noise=noise if seeded else None)
            for b, n in enumerate(counts):
                want = dpc_centres(x[b, :n], k, n, generator=gen(100 + b) if seeded else None)
                assert ranks[b, :n].tolist() == want.tolist()
                assert sorted(ranks[b, n:].tolist()) == list(range(n, width))


class _Counter(TorchDispatchMode):
    """aten ops, and host reads: _local_scalar_dense / nonzero (dispatched) and Tensor.tolist (not dispatched)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.ops.append(name)
        if any(s in name for s in ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item")):
            self.syncs.append(len(self.ops) - 1)
        return func(*args, **(kwargs or {}))


class _HostReads(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.counter.ops.append("tolist")
            self.counter.syncs.append(len(self.counter.ops) - 1)
        return func(*args, **(kwargs or {}))


def _count(x, salience, glob, options, family=""):
    fastvid_select(x, salience, glob, 0.25, options, family=family)  # warm-up
    counter = _Counter()
    with _HostReads(counter), counter:
        fastvid_select(x, salience, glob, 0.25, options, family=family)
    return counter


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [None, 4])
def test_one_host_sync_and_a_fixed_number_of_ops_after_it(variant, seed):
    """One host read (the DySeg flags with the finite check), and the ops after it do not grow with the number
    of anchor frames: 8 or 24 one-frame segments cost the same (the seeded path adds its CPU draws only)."""
    after = {}
    for frames in (8, 24):
        g = gen(35)
        x = torch.randn(frames, 64, 16, generator=g).to(torch.bfloat16)
        salience, glob = torch.rand(frames, 64, generator=g), torch.randn(frames, 32, generator=g)
        counter = _count(x, salience, glob, FastVIDOptions(variant=variant, seed=seed))
        assert [counter.ops[i] for i in counter.syncs] == ["tolist"]
        ops_after = counter.ops[counter.syncs[0]:]
        draws = ("rand.generator", "select.int", "slice.Tensor", "copy_.default")  # seeded: CPU draws per frame
        after[frames] = len([op for op in ops_after if seed is None or op not in draws])
        assert after[frames] <= ((65 if seed is None else 90) if variant == "onevision" else 140)
    assert after[8] == after[24]


def test_non_finite_signals_are_refused_at_the_one_sync():
    x, salience, glob = random_video(seed=36)
    for name in ("salience", "glob"):
        bad_salience, bad_glob = salience.clone(), glob.clone()
        (bad_salience if name == "salience" else bad_glob)[2, 3] = float("inf")
        for variant in VARIANTS:
            with pytest.raises(ValueError, match="contain NaN or Inf"):
                fastvid_select(x, bad_salience, bad_glob, 0.25, FastVIDOptions(variant=variant))


# ------------------------------------------------------------------------------------------------
# The static-shape formulation (execution="static" / "compiled"): equal to the eager path and the reference
# ------------------------------------------------------------------------------------------------

from selection_checks import assert_matches_cpu, compile_once  # noqa: E402

from llava.model.fastvid import StaticConfig, budget_table, static_selection  # noqa: E402


@pytest.mark.parametrize("variant", VARIANTS)
def test_density_at_k_1_above_25_tokens_matches_reference(variant):
    """k = 1: the density is the self-distance alone, exactly 0 in both executions (torch.cdist's matmul form,
    which it takes above 25 rows, leaves rounding there that ranked the densities)."""
    x, salience, glob = random_video(frames=8, tokens=40, seed=3, spread=0.15)
    check_against_reference(x, salience, glob, 0.3, variant, c=8, p=1, k=1)


@pytest.mark.parametrize("variant", [*VARIANTS, "authors"])
@pytest.mark.parametrize("knobs", [{}, dict(dyseg_c=3, dyseg_tau=0.5, dtm_p=2), dict(dyseg_c=1, dyseg_tau=-1.0, dtm_p=3,
                                   dtm_beta=0.2, stprune_d=0.7), dict(dyseg_c=20, dtm_p=1, density_k=9)])
@pytest.mark.parametrize("retention", [0.05, 0.3, 0.9])
def test_static_equals_eager_in_bf16_and_model_dtype(variant, knobs, retention):
    x, salience, glob = random_video(frames=16, tokens=40, seed=3, spread=0.15)
    base = dict(port="authors") if variant == "authors" else dict(variant=variant)
    for merge_dtype in ("float32", "model"):
        got = {execution: fastvid_select(x.to(torch.bfloat16), salience, glob, retention, FastVIDOptions(
            **base, **knobs, merge_dtype=merge_dtype, execution=execution)) for execution in ("eager", "static")}
        assert torch.equal(got["eager"].source, got["static"].source)
        assert got["static"].features.dtype == (torch.float32 if merge_dtype == "float32" else torch.bfloat16)
        tol = dict(atol=1e-5, rtol=1e-5) if merge_dtype == "float32" else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got["static"].features, got["eager"].features, **tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_budget_table_holds_each_segment_shape(variant):
    """Table rows are frame_budgets of one segment; lengths DySeg cannot make (c = 8 of 12 frames: > 5) stay 0."""
    knobs = resolve_knobs(FastVIDOptions(variant=variant))
    table = budget_table(knobs, 12, 30, 7)
    budgets = frame_budgets(knobs, [(0, 5)], [False, True, False, False], 30, 7)
    if variant == "qwen":  # near at gap 1: sub-segments end at frames 1 and 4
        assert table.salient[5, 2, :2].tolist() == [budgets.salient[1], budgets.salient[4]]
        assert table.anchors[5, 2, :2].tolist() == [budgets.anchors[1], budgets.anchors[4]]
    else:
        assert table.salient[5, :5].tolist() == budgets.salient and table.anchors[5, :5].tolist() == budgets.anchors
    assert table.salient[6:].abs().sum() == 0 and table.width == int(table.anchors.max()) > 0


@pytest.mark.parametrize("family", ["llava_onevision", "llava_video", "qwen3_vl"])
def test_registry_takes_the_padded_static_selection(family):
    """Through select_videos the static execution returns padded outputs (no read of its own): the same mask
    and table as the eager one; a non-finite signal empties the mask for the adapter's count check."""
    from llava.model.compression import CompressionSpec

    x, salience, glob = random_video(seed=12)
    out = {}
    for execution in ("eager", "static"):
        spec = CompressionSpec("fastvid", 0.25, {"fastvid.execution": execution})
        [out[execution]] = spec.select_videos([tokens_of(x, salience, glob, family)])
    assert out["eager"].mask.sum() > 0 and torch.equal(out["eager"].mask, out["static"].mask)
    torch.testing.assert_close(out["static"].table, out["eager"].table, atol=1e-6, rtol=1e-6)
    bad = salience.clone()
    bad[0, 0] = float("nan")
    [choice] = spec.select_videos([tokens_of(x, bad, glob, family)])
    assert not choice.mask.any()


def test_static_execution_options():
    with pytest.raises(ValueError, match="execution"):
        FastVIDOptions(execution="graph")
    for execution in ("compiled", "static"):
        with pytest.raises(ValueError, match="seed .* needs execution=eager"):
            FastVIDOptions(seed=1, execution=execution)
    x, salience, glob = random_video(seed=9)
    bad = salience.clone()
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match="contain NaN or Inf"):  # the static path reads the check at its end
        fastvid_select(x, bad, glob, 0.25, FastVIDOptions(variant="video", execution="static"))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled execution runs there)")


@CUDA
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_on_cuda_matches_eager_and_the_cpu(variant, dtype, monkeypatch):
    compile_once(monkeypatch)
    for seed in (0, 1):
        x, salience, glob = random_video(frames=16, tokens=196, dim=64, seed=seed, spread=0.15)
        x = x.to(dtype)
        cpu = fastvid_select(x, salience, glob, 0.25, FastVIDOptions(variant=variant, execution="static"))
        cuda = [t.cuda() for t in (x, salience, glob)]
        got = {e: fastvid_select(*cuda, 0.25, FastVIDOptions(variant=variant, execution=e))
               for e in ("compiled", "eager", None)}
        assert_matches_cpu(got, cpu)


@CUDA
def test_static_selection_does_not_synchronise():
    x, salience, glob = (t.cuda() for t in random_video(frames=16, tokens=196, dim=64, seed=4))
    knobs = resolve_knobs(FastVIDOptions(variant="qwen"))
    table = budget_table(knobs, 16, 196, 49)
    cfg = StaticConfig(knobs, 49, table.width, table.salient_cap, table.anchor_cap, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        static_selection(x.bfloat16(), salience, glob, *table.to(x.device), cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
