"""HoliTom's outer-LLM stage ("HoliTom w/o M"): temporal windows by DP, static merging, dynamic selection.

What it does, per video of F frames x P tokens (after projector and pooling):
1. s[t, m] = cosine of token m in frames t and t+1 (L2-normalised inputs).
2. A window [u, v] of frames removes G(u, v) = (v - u) * #{m : s[t, m] > tau for every t in [u, v-1]}
   tokens (each static position keeps one vector instead of v - u + 1). A DP over frames picks the
   partition into windows (at most ``max_window`` frames) that removes the most; total_reduced = its gain.
3. The budget left after that removal is spread as r' = min(R / ((N - total_reduced) / N), 1).
4. Static positions of a window: their vectors averaged over the window's frames, then clustered by
   DPC-kNN into round(n_s * r') centres. Dynamic tokens, per frame: ceil(n_d * r') kept, of which
   round(n_keep * (1 - contextual_ratio)) are the top by importance (ViT received attention) and the
   rest DPC-kNN centres of the other dynamic tokens. A centre becomes beta * centre + (1 - beta) *
   mean(its members), members = the non-centre tokens nearest to it by the DPC distance.
With the defaults (contextual_ratio 0) the dynamic part is pure top-k by attention; only static
tokens are merged. R maps onto the one knob the authors expose (their RETAIN_RATIO); the achieved
retention is close to R but not exact (ceil per frame, round per window), and below R when the static
averaging alone removes more than 1 - R (r' is capped at 1). No retention floor: every R in (0, 1] is
accepted (R = 1 still averages static tokens; the registry treats it as identity), and only a video
with no dynamic token at a tiny R can round to nothing, which raises.

HoliTom's inner merge ("HoliTom M": at LLM layer k, the visual tokens with the lowest last-token
attention are averaged into their most similar kept token) is a separate in-LLM stage, not this module.

Positions (our rule; upstream LLaVA-OV has none beyond the output order): a static token or static
centre at spatial position m of window [u, v] takes the source u * P + m (the window's FIRST frame);
a dynamic token or dynamic centre takes its own flat index. Sources are unique (a position static in a
window is dynamic in none of its frames) and the output is in ascending source order.

Differences from the original (cokeshao/HoliTom, LLaVA-OV):
- Output order: upstream emits, per window, [static centres, then each frame's dominant then
  contextual tokens] (one newline at the end); we emit ascending source, the adapters lay tokens out.
- DPC-kNN density ties: upstream adds U(0, 1e-6) noise from an unseeded generator (run-to-run
  changes); ours breaks ties by index (:mod:`llava.model.dpc_knn`) unless ``seed`` is set, which adds
  the same noise from a seeded CPU generator (one per video, drawn in window order: each frame's
  dynamic clustering, then the window's static clustering; upstream draws a window's frames at once).
- Top-k ties by importance go to the lower index (torch.topk's tie order is unspecified).
- Scoring, static means and merges run in float32 by default (upstream: the model dtype, available as
  ``score_dtype="model"``); DPC distances are float32 either way, as upstream.
- Merged means are sum / count rather than torch.mean (equal up to float rounding).
Differences from the authors' Qwen port (VidCom2 ``token_compressor/holitom``), switch ``port="authors"``:
- importance = the L2 norm of each feature instead of ViT attention (the port's choice; it scores in
  the model dtype, so combine with ``score_dtype="model"`` to come closest).
- NOT reproduced: the port's positions (kept indices = linspace(0, N - 1, count), unrelated to which
  tokens survived). Ours are the true sources above in either mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llava.model.dpc_knn import dpc_centres, pairwise_distances, stable_top
from llava.model.method_api import (
    VIT_RECEIVED_ATTENTION,
    Method,
    VideoSelection,
    VideoTokens,
    check_choice,
    check_range,
)
from llava.model.vidcom2 import check_video_features

PORTS = ("original", "authors")
SCORE_DTYPES = ("float32", "model")
_OWNER = "holitom"


@dataclass(frozen=True)
class HoliTomOptions:
    """HoliTom w/o M knobs; defaults = the original authors' scripts (upstream env name in brackets).

    tau: similarity threshold above which a token counts as static between two frames [T]; the
        scripts use 0.8 for R >= 0.15 and 0.65 for R = 0.10.
    beta: weight of a cluster's centre in its merged value [BETA].
    contextual_ratio: fraction of each frame's kept dynamic tokens that are DPC-kNN centres instead of
        top-importance tokens [D]; 0 makes the dynamic part pure top-k by attention.
    knn: neighbours K of the DPC-kNN density (clamped to the cluster count, as upstream) [K].
    max_window: longest temporal window the DP may form, in frames [MAX_WINDOW_SIZE].
    seed: None (default) breaks DPC density ties by index, deterministically; an int adds upstream's
        U(0, 1e-6) density noise from a CPU generator seeded with it (upstream's is unseeded).
    port: original (default: importance = ViT received attention) or authors (the VidCom2 authors'
        Qwen port: importance = feature L2 norm; their fake linspace positions are not reproduced).
    score_dtype: float32 (default) or model (similarities, means and merges in the input dtype, as
        upstream).
    """

    tau: float = 0.8
    beta: float = 0.6
    contextual_ratio: float = 0.0
    knn: int = 7
    max_window: int = 1024
    seed: int | None = None
    port: str = "original"
    score_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_range(_OWNER, "tau", self.tau, -1.0, 1.0)
        check_range(_OWNER, "beta", self.beta, 0.0, 1.0)
        check_range(_OWNER, "contextual_ratio", self.contextual_ratio, 0.0, 1.0)
        for key in ("knn", "max_window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_OWNER} option {key} must be an integer >= 1, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{_OWNER} option seed must be an integer or None, got {self.seed!r}")
        check_choice(_OWNER, "port", self.port, PORTS)
        check_choice(_OWNER, "score_dtype", self.score_dtype, SCORE_DTYPES)


# ------------------------------------------------------------------------------ temporal windows


def frame_similarity(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(F, P, D) -> (F-1, P) cosine of each token with the same position in the next frame, in ``dtype``."""
    unit = torch.nn.functional.normalize(features.to(dtype), p=2, dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def static_run_lengths(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """(F-1, P) similarities -> (F-1, P) int64: from transition t on, how many consecutive s > tau.

    Position m is static in window [u, v] exactly when run[u, m] >= v - u.
    """
    steps = similarity.shape[0]
    above = similarity > tau
    t = torch.arange(steps, device=similarity.device)[:, None].expand_as(above)
    breaks = torch.where(above, torch.full_like(t, steps), t)  # a False at t stops every run reaching it
    next_break = breaks.flip(0).cummin(dim=0).values.flip(0)
    return next_break - t


def window_gains(run: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(F-1, P) run lengths -> (F, F) int64 G[u, v] = (v - u) * #static positions of [u, v] (0 for v <= u)."""
    steps, positions = run.shape
    # counts[u, L] = #{m : run[u, m] == L}; at_least[u, L] = #{m : run[u, m] >= L}
    counts = torch.zeros(steps, n_frames, dtype=torch.int64, device=run.device)
    counts.scatter_add_(1, run, torch.ones_like(run))
    at_least = counts.flip(1).cumsum(dim=1).flip(1)
    frames = torch.arange(n_frames, device=run.device)
    length = (frames[None, :] - frames[:steps, None]).clamp(min=0)  # v - u for u < F-1
    gains = torch.zeros(n_frames, n_frames, dtype=torch.int64, device=run.device)
    gains[:steps] = length * at_least.gather(1, length)  # length 0 (v <= u) gives 0
    return gains


def static_windows(
    similarity: torch.Tensor, tau: float, max_window: int = 1024
) -> tuple[list[tuple[int, int]], int, torch.Tensor]:
    """The DP partition of the frames into windows.

    similarity: (F-1, P) from :func:`frame_similarity` (F >= 1; (0, P) for one frame).
    Returns the windows [(u, v)] in frame order (inclusive), total_reduced (the tokens the static
    averaging removes) and the (F-1, P) run lengths on the CPU (see :func:`static_run_lengths`).
    best[i] = max(best[i-1], max_w best[i-w] + G(i-w+1, i)), w = 2..min(i+1, max_window); a strictly
    larger value is needed to beat the single frame, and among equal windows the smallest wins.
    """
    steps = similarity.shape[0]
    n_frames = steps + 1
    run = static_run_lengths(similarity.cpu(), tau)  # compared in its own dtype, as upstream
    gains = window_gains(run, n_frames)
    best = torch.zeros(n_frames + 1, dtype=torch.int64)  # best[i + 1] = optimum over frames 0..i
    start = list(range(n_frames))
    # Inherently sequential: best[i] needs best[j] for every j < i. Vectorised over window sizes.
    for i in range(n_frames):
        best[i + 1] = best[i]
        low = max(0, i - max_window + 1)
        if i - 1 < low:
            continue
        starts = torch.arange(i - 1, low - 1, -1)  # window sizes 2, 3, ... in increasing order
        candidates = best[starts] + gains[starts, i]
        pick = int(torch.argmax(candidates))  # first maximum = smallest window
        if candidates[pick] > best[i]:
            best[i + 1] = candidates[pick]
            start[i] = int(starts[pick])
    windows = []
    i = n_frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], int(best[n_frames]), run


def adjusted_ratio(retention: float, total: int, total_reduced: int) -> float:
    """r' = min(R / ((N - total_reduced) / N), 1): the ratio applied to what the static averaging left."""
    return min(retention / ((total - total_reduced) / total), 1.0)


# ------------------------------------------------------------------------------ clustering merge


def merge_into_centres(x: torch.Tensor, centres: torch.Tensor, distances: torch.Tensor, beta: float) -> torch.Tensor:
    """(n, D) tokens, (c,) centre indices, (n, n) distances -> (c, D) merged centre values.

    Every non-centre token joins the centre nearest to it by ``distances`` (ties: the earlier centre);
    a centre with members becomes beta * centre + (1 - beta) * mean(members), one without stays itself.
    """
    n, dim = x.shape
    count = centres.numel()
    is_centre = torch.zeros(n, dtype=torch.bool, device=x.device)
    is_centre[centres] = True
    others = (~is_centre).nonzero().squeeze(1)
    nearest = distances[others][:, centres].argmin(dim=1)
    sums = torch.zeros(count, dim, dtype=x.dtype, device=x.device).index_add_(0, nearest, x[others])
    members = torch.bincount(nearest, minlength=count).to(x.dtype)[:, None]
    own = x[centres]
    merged = beta * own + (1.0 - beta) * (sums / members.clamp(min=1))
    return torch.where(members > 0, merged, own)


def cluster_merge(
    x: torch.Tensor, count: int, knn: int, beta: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) tokens -> (count,) ascending DPC-kNN centre indices and their (count, D) merged values.

    k = min(knn, count) neighbours for the density, as upstream; see :func:`merge_into_centres`.
    """
    distances = pairwise_distances(x)
    k = min(knn, count)
    centres = dpc_centres(x, k, count, distances=distances, generator=generator).sort().values
    return centres, merge_into_centres(x, centres, distances, beta)


# ------------------------------------------------------------------------------ the method


def holitom_select(
    features: torch.Tensor, importance: torch.Tensor, retention: float, options: HoliTomOptions | None = None
) -> VideoSelection:
    """One video's (F, P, D) features and (F, P) importance -> sources (K,) ascending and features (K, D).

    Output features are float32 (``score_dtype="float32"``) or the input dtype (``"model"``).
    """
    options = options or HoliTomOptions()
    check_video_features(features, retention)
    n_frames, per_frame, dim = features.shape
    if tuple(importance.shape) != (n_frames, per_frame):
        raise ValueError(
            f"{_OWNER}: importance must be (F, P) = {(n_frames, per_frame)}, got {tuple(importance.shape)}"
        )
    if not bool(torch.isfinite(features).all()) or not bool(torch.isfinite(importance).all()):
        raise ValueError(f"{_OWNER}: features or importance contain NaN or Inf; refusing to merge them")
    dtype = torch.float32 if options.score_dtype == "float32" else features.dtype
    device = features.device
    score = importance.float()
    generator = None if options.seed is None else torch.Generator().manual_seed(options.seed)

    similarity = frame_similarity(features, dtype)
    windows, total_reduced, run = static_windows(similarity, options.tau, options.max_window)
    ratio = adjusted_ratio(float(retention), n_frames * per_frame, total_reduced)

    sources: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    # One iteration per window (few): the static/dynamic split and the budgets differ between windows.
    for u, v in windows:
        static = run[u] >= v - u if v > u else torch.zeros(per_frame, dtype=torch.bool)
        static_pos = static.nonzero().squeeze(1).to(device)
        dynamic_pos = (~static).nonzero().squeeze(1).to(device)
        n_static, n_dynamic = static_pos.numel(), dynamic_pos.numel()
        window = features[u : v + 1].to(dtype)  # cast per window: no float32 copy of the whole video
        if n_dynamic:
            _dynamic(window, score[u : v + 1], u * per_frame, dynamic_pos, ratio, options, generator, sources, values)
        if n_static:
            static_x = window[:, static_pos].mean(dim=0)  # (n_s, D)
            n_clusters = round(n_static * ratio)  # half-even, as upstream's round()
            if n_clusters > 0:
                centres, merged = cluster_merge(static_x, n_clusters, options.knn, options.beta, generator)
                sources.append(u * per_frame + static_pos[centres])
                values.append(merged)
    if not sources:
        raise ValueError(
            f"{_OWNER} kept no token at R={retention}: the video is static and round(n_static * r') is 0; "
            "raise R"
        )
    source = torch.cat(sources)
    order = torch.argsort(source)
    return VideoSelection(source[order], torch.cat(values)[order])


def _dynamic(
    window: torch.Tensor,
    score: torch.Tensor,
    offset: int,
    positions: torch.Tensor,
    ratio: float,
    options: HoliTomOptions,
    generator: torch.Generator | None,
    sources: list[torch.Tensor],
    values: list[torch.Tensor],
) -> None:
    """Each frame of a window keeps its top dominant dynamic tokens and its contextual centres.

    window: (w, P, D) the window's features; score: (w, P) importance; offset: flat index of its first token.
    """
    n_frames, per_frame, dim = window.shape
    n_dynamic = positions.numel()
    keep = math.ceil(n_dynamic * ratio)
    n_dominant = round(keep * (1.0 - options.contextual_ratio))
    n_contextual = keep - n_dominant
    device = window.device
    window_x = window[:, positions]  # (w, n_d, D)
    frames = torch.arange(n_frames, device=device)
    flat = offset + frames[:, None] * per_frame + positions[None, :]  # (w, n_d) flat indices
    dominant = stable_top(score[:, positions], n_dominant)  # (w, n_dom), ties to the lower index
    if n_dominant:
        sources.append(flat.gather(1, dominant).reshape(-1))
        values.append(window_x.gather(1, dominant[..., None].expand(-1, -1, dim)).reshape(-1, dim))
    if n_contextual:
        rest = torch.ones(n_frames, n_dynamic, dtype=torch.bool, device=device)
        rest.scatter_(1, dominant, False)
        rest_idx = rest.nonzero()[:, 1].view(n_frames, n_dynamic - n_dominant)  # index order per frame
        # One DPC-kNN per frame: dpc_knn clusters one token set at a time (frames of a window are few).
        for f in range(n_frames):
            centres, merged = cluster_merge(
                window_x[f, rest_idx[f]], n_contextual, options.knn, options.beta, generator
            )
            sources.append(flat[f, rest_idx[f, centres]])
            values.append(merged)


def _select(video: VideoTokens, retention: float, options: HoliTomOptions) -> VideoSelection:
    if options.port == "authors":
        importance = video.features.to(torch.float32 if options.score_dtype == "float32" else video.features.dtype)
        importance = importance.norm(dim=-1).float()
    else:
        importance = video.signal(VIT_RECEIVED_ATTENTION)
    return holitom_select(video.features, importance, retention, options)


METHOD = Method(
    name="holitom",
    options=HoliTomOptions,
    signals=frozenset({VIT_RECEIVED_ATTENTION}),
    select=_select,
    merges=True,
    summary="DP temporal windows, static tokens averaged and DPC-kNN merged, dynamic top-k by ViT attention",
    needs=lambda options: frozenset() if options.port == "authors" else frozenset({VIT_RECEIVED_ATTENTION}),
)
