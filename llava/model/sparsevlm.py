"""SparseVLM v1.5 (ICML'25; Gumpest/SparseVLMs, branch v1.5): text-guided pruning inside the LLM, with recycling.

Reference algorithm (../shared/spec/baselines.md section 7, the v1.5 branch):
1. Raters, once, from the LM input embeddings: V = the video tokens, T = every token after the video
   (question and assistant prefix); M = softmax over T of V T^T, averaged over the video rows; the
   raters are the tokens of T whose M is above the mean of M.
2. At each pruning layer b (2, 6, 15) the layer runs on every token; its attention probabilities
   (softmax over all keys, causal, head mean) of the raters, averaged over the raters, give every
   current video token its relation r.
3. The top-k video tokens by r stay (in order); k from the schedule, capped at n_v - 1, so at least one
   token is always dropped.
4. Recycling: of the n_drop dropped tokens, the int(0.3 * n_drop) + 1 with the highest r are clustered
   by DPC-kNN (k nearest = the cluster count, distances / sqrt(D)) into int(n_rec / 10) + 1 groups,
   each token joining its nearest centre; a group's value is the sum of its members' hidden states
   over (count + 1e-6), upstream's near-mean. The groups count as video tokens from then on (n_v = kept
   + groups). Which n: upstream's ``cluster_num = int(merge_token_stage2.shape[1] / 10) + 1`` counts the
   RECYCLED set (n_rec), not the dropped nor the video tokens.
5. Pruning acts on layer b's OUTPUT: layers 0..b see every token, layers b+1.. the shorter sequence. Here
   that is a boundary before layer b + 1 reading layer b's attention as it ran (its KV cache stays whole,
   as upstream's). Upstream compacts positions to 0..n-1 and decodes each layer from its own cache length
   (``positions=compact``; ``auto`` = compact on 1-D positions); on M-RoPE, kept tokens keep their
   (t, h, w) and a group its centre's (``auto`` = inherit there).

R is the equivalent retention: video tokens entering each layer, averaged over layers. With pruning
layers (2, 6, 15) on L = 28 layers: layers 0-2 full, 3-6 f1, 7-15 f2, 16-27 f3, so
R = (3 + 4 f1 + 9 f2 + 12 f3) / 28, f = kept fraction of the LM input's video tokens after each stage.
Schedule (ours, labelled: upstream's counts are absolute, for 576 image tokens): the shape of upstream's
"192" schedule, f = c * (0.521, 0.347, 0.191), c solved from R (R = 0.25 -> f = (0.278, 0.185, 0.102)).
Per row, stage s keeps round(f_s * N) of its N input video tokens (at least 1, at most n_v - 1). The
recycled groups come on top: the achieved layer average (reported) is slightly above R. ``ratios`` sets
f directly (then R must be the layer average it implies); ``shape`` changes the shape.

Attention rows: the raters' rows of the pruning layer, from its own query and keys while it runs on
SDPA / flash (llava.model.attention_rows), O(H * raters * L); ``attention=eager`` materialises the
layer's whole (B, H, L, L) map first, as upstream's FA2 path computes the full logits at the pruning
layers (its SDPA path computes them in every layer).

Differences from upstream (labelled):
- A recycled group is a token at its centre's place: its position (compact: its rank among the kept
  tokens) and its order. Upstream inserts all groups, in centre-score order, right after the kept video
  tokens.
- Ties: relation ties go to the lower index; DPC-kNN density and score ties to the earlier token of the
  recycled set (= the higher relation), as llava.model.dpc_knn; upstream's topk and unseeded density noise
  leave them to chance. ``seed`` adds upstream's U(0, 1e-6) density noise from a CPU generator seeded with
  it, one per batch row (so a batch equals its rows run alone).
- Precision: the raters' products in float32 (``score_dtype=model``: the input dtype, as upstream); DPC
  distances by direct differences (as upstream's) in float32, group sums in float32 (upstream: model dtype).
- A row whose text tokens all sit at the mean (e.g. one token after the video) has every token after the
  video as raters (upstream's mean over no rater is NaN). The text after the video is found in the last
  max(non-video tokens per row) positions, so nothing waits for the GPU.
- Batch > 1 (upstream: batch 1 only): each row has its own raters, counts and clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava.model.inllm_select import ATTENTION_MODES, POSITION_RULES, top_visual
from llava.model.method_api import (
    LLM_ATTENTION_ROWS,
    Boundary,
    InLLMPlan,
    LayerAction,
    LayerState,
    MarkedRows,
    Method,
    Stage,
    check_choice,
)

_OWNER = "SparseVLM"
SCORE_DTYPES = ("float32", "model")
SHAPE_192 = (0.521, 0.347, 0.191)  # upstream's LLaVA-1.5 "192" schedule (300, 200, 110 of 576), normalised
RECYCLE_FRACTION = 0.3  # upstream: int(0.3 * n_drop) + 1 dropped tokens are recycled
GROUP_DIVISOR = 10  # upstream: int(n_rec / 10) + 1 groups
GROUP_EPS = 1e-6  # upstream divides a group's sum by (count + 1e-6)


@dataclass(frozen=True)
class SparseVLMOptions:
    """layers: the pruning layers b (upstream's pruning_loc); each acts on layer b's output.
    shape: f per pruning layer up to the scale c solved from R (None: upstream's 192 schedule's shape, for
    three layers). ratios: f per pruning layer given outright (R must be the layer average they imply).
    recycle: cluster the best dropped tokens back in (v1.5; False = plain top-k pruning, an ablation).
    positions: auto (compact on 1-D positions, inherit on M-RoPE), compact or inherit.
    attention: rows (the raters' rows) or eager (the layer's whole map, for memory comparisons).
    seed: None (ties by order) or an int (upstream's DPC density noise from a seeded generator per row).
    score_dtype: float32 (default) or model (the raters' V T^T in the input dtype, as upstream)."""

    layers: tuple[int, ...] = (2, 6, 15)
    shape: tuple[float, ...] | None = None
    ratios: tuple[float, ...] | None = None
    recycle: bool = True
    positions: str = "auto"
    attention: str = "rows"
    seed: int | None = None
    score_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(f"{_OWNER} option layers must be distinct ascending layers >= 0, got {self.layers}")
        for name, values in (("shape", self.shape), ("ratios", self.ratios)):
            if values is None:
                continue
            if len(values) != len(self.layers):
                raise ValueError(f"{_OWNER} option {name} needs one value per layer ({len(self.layers)}), got {values}")
            if any(not 0 < v <= 1 for v in values) or list(values) != sorted(values, reverse=True):
                raise ValueError(f"{_OWNER} option {name} must be non-increasing values in (0, 1], got {values}")
        if self.shape is None and self.ratios is None and len(self.layers) != len(SHAPE_192):
            raise ValueError(
                f"{_OWNER} option layers={self.layers}: the default shape {SHAPE_192} is for three layers; "
                "give shape (or ratios) with one value per layer"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{_OWNER} option seed must be an integer or None, got {self.seed!r}")
        check_choice(_OWNER, "positions", self.positions, POSITION_RULES)
        check_choice(_OWNER, "attention", self.attention, ATTENTION_MODES)
        check_choice(_OWNER, "score_dtype", self.score_dtype, SCORE_DTYPES)


# ------------------------------------------------------------------------------ schedule


def layer_average(layers: tuple[int, ...], ratios: tuple[float, ...], num_layers: int) -> float:
    """Equivalent retention of pruning on the outputs of ``layers``: layers 0..b_1 full, then f_s for the
    layers after b_s up to b_{s+1}, averaged over ``num_layers`` (recycled groups not counted)."""
    starts = [b + 1 for b in layers]
    ends = [*starts[1:], num_layers]
    return (starts[0] + sum(f * (e - s) for f, s, e in zip(ratios, starts, ends, strict=True))) / num_layers


def solve_ratios(retention: float, layers: tuple[int, ...], shape: tuple[float, ...], num_layers: int) -> tuple:
    """f = c * shape with the layer average equal to ``retention``; raises when no c in (0, 1/shape[0]] does."""
    full = (layers[0] + 1) / num_layers
    unit = layer_average(layers, shape, num_layers) - full
    scale = (retention - full) / unit
    if scale <= 0 or scale * shape[0] > 1 + 1e-9:
        lo, hi = full, full + unit / shape[0]
        raise ValueError(
            f"{_OWNER} with pruning layers {layers} and shape {shape} on {num_layers} layers reaches retentions "
            f"in ({lo:.4f}, {hi:.4f}]; got {retention:g}"
        )
    return tuple(scale * s for s in shape)


def stage_counts(ratio: float, before: Sequence[int], now: Sequence[int]) -> tuple[int, ...]:
    """Per row the video tokens a stage keeps: round(f * N) (at least 1), capped at n_v - 1 as upstream."""
    return tuple(max(0, min(max(1, round(ratio * n0)), n - 1)) if n else 0 for n0, n in zip(before, now, strict=True))


def recycle_counts(dropped: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(recycled tokens, groups) per row: int(0.3 * n_drop) + 1 and int(n_rec / 10) + 1 (0 when nothing dropped)."""
    recycled = tuple(int(d * RECYCLE_FRACTION) + 1 if d else 0 for d in dropped)
    return recycled, tuple(int(r / GROUP_DIVISOR) + 1 if r else 0 for r in recycled)


# ------------------------------------------------------------------------------ raters


def rater_rows(embeds: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, window: int, dtype: torch.dtype):
    """(B, L, D) LM input, (B, L) video / real flags -> (B, L) bool raters.

    The text after the video lies in the last ``window`` positions of every row (left padding; ``window``
    >= every row's non-video count), so M is (B, L, window): no L x L product and no host read.
    """
    batch, length, _ = embeds.shape
    start = length - window
    index = torch.arange(length, device=embeds.device)
    last_visual = torch.where(visual, index, -1).amax(dim=1)  # (B,), -1 without video
    after = valid[:, start:] & (index[start:] > last_visual[:, None])  # (B, W): T
    logits = torch.matmul(embeds.to(dtype), embeds[:, start:].to(dtype).transpose(1, 2)).float()  # (B, L, W)
    probs = torch.softmax(logits.masked_fill(~after[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    weight = visual.float()
    m = (probs * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, W)
    mean = (m * after).sum(dim=1, keepdim=True) / after.sum(dim=1, keepdim=True).clamp(min=1)
    raters = after & (m > mean)
    raters = torch.where(raters.any(dim=1, keepdim=True), raters, after)  # all at the mean: every token of T
    out = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
    out[:, start:] = raters
    return out


# ------------------------------------------------------------------------------ recycling


def dpc_groups(
    x: torch.Tensor, members: torch.Tensor, counts: Sequence[int], noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN over B padded sets at once (the rule of llava.model.dpc_knn.dpc_scores, k = the set's
    cluster count, as upstream), then every member to its nearest centre.

    x (B, N, D) float32, members (B, N) bool (set b = its first members), counts: clusters per set (host
    ints, each <= its set's size), noise: optional (B, N) U(0, 1) draws (density += 1e-6 * noise).
    Returns centres (B, C) long (set indices in decreasing score; slots >= counts[b] unused) and assign
    (B, N) long in [0, C) (C for non-members), C = max(counts). Ties: the earlier set index.
    """
    batch, n, dim = x.shape
    c_max = max(counts)
    device = x.device
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / (dim**0.5)  # direct differences
    pairs = members[:, :, None] & members[:, None, :]
    ks = torch.tensor(list(counts), device=device)
    nearest = torch.topk(dist.masked_fill(~pairs, torch.inf), k=c_max, dim=-1, largest=False).values
    squares = (nearest**2).masked_fill(~torch.isfinite(nearest), 0.0).cumsum(dim=-1)  # (B, N, C)
    mean = squares.gather(2, (ks - 1).clamp(min=0).view(batch, 1, 1).expand(batch, n, 1))[..., 0] / ks[:, None]
    density = torch.exp(-mean)
    if noise is not None:
        density = density + noise * 1e-6
    density = density.masked_fill(~members, -1.0)  # below every real density
    positions = torch.arange(n, device=device).expand(batch, n)
    order = torch.sort(density, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, positions)
    denser = rank[:, None, :] < rank[:, :, None]  # denser[b, i, j]: j is denser than i
    far = dist.masked_fill(~pairs, 0.0).flatten(1).amax(dim=1)  # the set's largest distance (the densest's delta)
    delta = torch.where(denser & pairs, dist, far[:, None, None]).amin(dim=-1)
    score = (density * delta).masked_fill(~members, -torch.inf)
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :c_max]  # (B, C)
    used = torch.arange(c_max, device=device)[None] < ks[:, None]  # (B, C)
    to_centre = dist.gather(2, centres[:, None, :].expand(batch, n, c_max)).masked_fill(~used[:, None, :], torch.inf)
    assign = to_centre.argmin(dim=-1)  # the first nearest centre (the higher score on ties)
    slots = torch.arange(c_max, device=device).expand(batch, c_max)
    own = torch.full((batch, n + 1), -1, dtype=torch.long, device=device)
    own.scatter_(1, torch.where(used, centres, n), slots)  # a centre joins its own group
    assign = torch.where(own[:, :n] >= 0, own[:, :n], assign)
    return centres, torch.where(members, assign, c_max)


def recycle(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    dropped: torch.Tensor,
    recycled: Sequence[int],
    groups: Sequence[int],
    generators: Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recycled groups as kept tokens: (B, L) bool their centres' places and (B, L, D) hidden states
    with each group's value written at its centre (the other rows unchanged).

    hidden (B, L, D), scores (B, L) the relation, dropped (B, L) bool; recycled / groups per row (host).
    """
    batch, length, dim = hidden.shape
    n_max = max(recycled)
    device = hidden.device
    # the recycled set: the dropped tokens of highest relation, in decreasing relation (upstream's topk order)
    order = torch.sort(scores.masked_fill(~dropped, -torch.inf), dim=1, descending=True, stable=True).indices
    order = order[:, :n_max]  # (B, N) positions
    members = torch.arange(n_max, device=device)[None] < torch.tensor(list(recycled), device=device)[:, None]
    x = torch.gather(hidden, 1, order[..., None].expand(batch, n_max, dim)).float()
    noise = None
    if generators is not None:  # one small CPU draw per row, in upstream's order (the set, by relation)
        noise = torch.zeros(batch, n_max)
        for row, (gen, n) in enumerate(zip(generators, recycled, strict=True)):
            noise[row, :n] = torch.rand(n, generator=gen)
        noise = noise.to(device)
    centres, assign = dpc_groups(x, members, groups, noise)
    c_max = centres.shape[1]
    sums = torch.zeros(batch, c_max + 1, dim, device=device).scatter_add_(
        1, assign[..., None].expand(batch, n_max, dim), x
    )
    sizes = torch.zeros(batch, c_max + 1, device=device).scatter_add_(1, assign, members.float())
    values = (sums / (sizes[..., None] + GROUP_EPS))[:, :c_max].to(hidden.dtype)  # (B, C, D)
    used = torch.arange(c_max, device=device)[None] < torch.tensor(list(groups), device=device)[:, None]
    place = torch.where(used, torch.gather(order, 1, centres), length)  # unused slots go to a spill row
    out = torch.cat([hidden, hidden.new_zeros(batch, 1, dim)], dim=1)
    out.scatter_(1, place[..., None].expand(batch, c_max, dim), values)
    mask = torch.zeros(batch, length + 1, dtype=torch.bool, device=device).scatter_(1, place, True)
    return mask[:, :length], out[:, :length]


# ------------------------------------------------------------------------------ the plan


class SparseVLMPlan(InLLMPlan):
    def __init__(self, layers: tuple[int, ...], ratios: tuple[float, ...], options: SparseVLMOptions) -> None:
        self.boundaries = tuple(Boundary(b + 1, rows="marked", source="previous") for b in layers)
        self.ratio_at = {b + 1: r for b, r in zip(layers, ratios, strict=True)}
        self.positions = options.positions
        self.full_map = options.attention == "eager"
        self.options = options
        self.generators: list[torch.Generator] | None = None

    def mark_prompt(
        self,
        embeds: torch.Tensor,
        visual: torch.Tensor,
        valid: torch.Tensor,
        lengths: Sequence[int],
        visual_counts: Sequence[int],
    ) -> MarkedRows:
        window = max(n - v for n, v in zip(lengths, visual_counts, strict=True))
        if window == 0:
            raise ValueError(f"{_OWNER} rates the video by the text after it, but the prompt has no text token")
        dtype = torch.float32 if self.options.score_dtype == "float32" else embeds.dtype
        if self.options.seed is not None:  # one generator per row: a batch draws what its rows draw alone
            self.generators = [torch.Generator().manual_seed(self.options.seed) for _ in lengths]
        return MarkedRows(rater_rows(embeds, visual, valid, window, dtype), window)

    def act(self, boundary: Boundary, state: LayerState) -> LayerAction:
        kept = stage_counts(self.ratio_at[boundary.layer], state.visual_before, state.visual_now)
        keep = top_visual(state.scores, state.visual, kept)
        if not self.options.recycle:
            return LayerAction(keep, kept)
        recycled, groups = recycle_counts([n - k for n, k in zip(state.visual_now, kept, strict=True)])
        if not any(groups):
            return LayerAction(keep, kept)
        centres, values = recycle(
            state.hidden, state.scores, state.visual & ~keep, recycled, groups, self.generators
        )  # fmt: skip
        counts = tuple(k + g for k, g in zip(kept, groups, strict=True))
        return LayerAction(keep | centres, counts, values)


def plan(num_layers: int, retention: float, options: SparseVLMOptions) -> SparseVLMPlan:
    if options.layers[-1] + 1 >= num_layers:
        raise ValueError(
            f"{_OWNER} option layers={options.layers}: pruning acts on a layer's output, so each layer must be at "
            f"most {num_layers - 2} on a language model of {num_layers} layers (0..{num_layers - 1})"
        )
    if options.ratios is None:
        ratios = solve_ratios(retention, options.layers, options.shape or SHAPE_192, num_layers)
    else:
        ratios = options.ratios
        implied = layer_average(options.layers, ratios, num_layers)
        if abs(implied - retention) > 0.005:
            raise ValueError(
                f"{_OWNER} ratios {ratios} at layers {options.layers} average {implied:.4f} over {num_layers} layers, "
                f"but retention {retention:g} was asked: pass retention {implied:.4f}"
            )
    return SparseVLMPlan(options.layers, ratios, options)


METHOD = Method(
    name="sparsevlm",
    label="SparseVLM",
    options=SparseVLMOptions,
    stages=(Stage.IN_LLM,),
    signals=frozenset({LLM_ATTENTION_ROWS}),
    plan=plan,
    summary="in-LLM (v1.5): prune on layers 2/6/15's outputs by text raters' attention, recycle the best dropped",
)
