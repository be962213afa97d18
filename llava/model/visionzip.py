"""VisionZip (CVPR'25) before the LLM, per frame: keep the tokens the vision tower attends to most
("dominant") and fold the rest into a few "contextual" tokens.

Default (``port="original"``): the SigLIP video port of the VisionZip authors' method for LLaVA-OV /
LLaVA-Video, run on each frame of one video (F frames of P tokens, all frames alike, so every step is
one batched op over frames):

1. S = round(R * P) output tokens per frame (Python's half-even round, at least 1, at most P);
   n_dom = int(S * dominant_ratio) (default 54/64), n_ctx = S - n_dom.
2. Dominant = the n_dom tokens of highest received attention a_j (signal ``vit_received_attention``,
   the feature layer's softmax attention averaged over heads and query rows, pooled onto the token
   grid); ties go to the lower index.
3. The other tokens, in ascending index order, are the remaining set. Their metric is the head-mean
   raw key (signal ``vit_keys``), L2-normalised in float32. Targets are every step-th remaining token,
   step = max(1, |rest| // n_ctx), the first n_ctx of rest[0], rest[step], ...
4. Every other remaining token joins the target of largest metric dot product (ties: the lowest
   target). A contextual token is target + mean of its members (the target alone when it has none):
   a SUM, as upstream computes it, not an average.

How R maps onto the knobs (``visionzip_counts``): upstream's knob is S (env SPATIAL_TOKENS); we set
S = round(R * P). LLaVA-OV (P = 196): R = 0.25 -> 49 = 41 + 8; 0.15 -> 29 = 24 + 5; 0.10 -> 20 = 16 + 4.
LLaVA-Video (P = 169): 0.25 -> 42 = 35 + 7. HoliTom's scripts use S = 50/40/30/20 for "25/20/15/10%".

Output: sources ascending (dominant and contextual interleaved by index); the source of a
contextual token is its target. Merged features are computed and returned in float32 (the adapter
casts them to the model dtype).

Differences from upstream (the SigLIP port):
- Upstream emits each frame as [dominant ascending, contextual in target order]; we emit ascending
  sources, so the two kinds interleave by position (the adapters lay tokens out in video order).
- Upstream ranks with torch.topk on bf16/fp16 attention maps (tie order unspecified); we rank the
  float32 signals, ties to the lower index.
- n_ctx larger than the remaining set is clamped to it (all remaining tokens become targets). With
  R <= 1 and dominant_ratio <= 1 this cannot happen (n_ctx = S - n_dom <= P - n_dom); the clamp only
  guards :func:`visionzip_select_counts` called with explicit counts.

``port="authors"`` reproduces the VidCom2 authors' Qwen port (which is not VisionZip): importance =
L2 norm of the features (no attention; the signals are not read); keep = max(1, int(P * R)),
n_dom = max(1, int(keep * authors_dominant_ratio)) (default 0.6), n_ctx = keep - n_dom; contextual
anchors = the n_ctx remaining tokens of highest density (mean cosine similarity to their k_neighbors
most similar other remaining tokens); every other remaining token joins its most cosine-similar anchor
(ties: the lowest anchor) and a contextual token is the plain mean of its cluster, anchor included.
Differences from that port: it never pads with zero vectors at index 0 (when fewer remaining tokens
than n_ctx exist, n_ctx is clamped; again impossible for R <= 1); an anchor always belongs to its own
cluster (upstream assigns anchors by argmax too, which differs only when two anchors are exact
duplicates); density ranks and importance ties go to the lower index (upstream: torch.topk order);
scores are float32 (upstream: the model dtype); frames are batched (upstream: Python loops).

Execution (``execution``, the original port on CUDA): ``compiled`` (default) runs the selection as the
few dozen kernels torch.compile fuses it into (compiled once per input shape and R, at the first call;
:mod:`llava.model.compiled_select`), ``eager`` as its ~100 unfused kernels. Both select the same
tokens up to float32 rounding: a metric tie within rounding may go to another target. The CPU and the
authors' port always run eager.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from llava.model.compiled_select import compiled
from llava.model.dpc_knn import stable_top
from llava.model.method_api import (
    VIT_KEYS,
    VIT_RECEIVED_ATTENTION,
    Method,
    VideoSelection,
    VideoTokens,
    check_choice,
    check_range,
)
from llava.model.vidcom2 import check_retention, check_video_features

PORTS = ("original", "authors")
EXECUTIONS = ("compiled", "eager")
NON_FINITE = "visionzip: features or signals contain NaN or Inf; refusing to select tokens from them"


@dataclass(frozen=True)
class VisionZipOptions:
    """Every VisionZip knob; the defaults are the original SigLIP video port.

    port: "original" (VisionZip: received attention + key-metric merging) or "authors" (the VidCom2
        authors' Qwen port: feature-norm importance + density anchors; see the module docstring).
    dominant_ratio: share of a frame's S output tokens that are dominant in the original port
        (upstream env DOMINANT_RATIO, default 54/64: the 54 + 10 split of the LLaVA-1.5 README).
    authors_dominant_ratio: the same share in the authors' port (env visionzip_dominant_ratio, 0.6).
    k_neighbors: neighbours in the authors' port's density (env visionzip_k_neighbors, 5).
    execution: "compiled" (default: torch.compile's fused kernels on CUDA) or "eager" (the unfused
        kernels); the CPU and the authors' port always run eager (see the module docstring).
    """

    port: str = "original"
    dominant_ratio: float = 54 / 64
    authors_dominant_ratio: float = 0.6
    k_neighbors: int = 5
    execution: str = "compiled"

    def __post_init__(self) -> None:
        check_choice("visionzip", "port", self.port, PORTS)
        check_choice("visionzip", "execution", self.execution, EXECUTIONS)
        check_range("visionzip", "dominant_ratio", float(self.dominant_ratio), 0.0, 1.0)
        check_range("visionzip", "authors_dominant_ratio", float(self.authors_dominant_ratio), 0.0, 1.0)
        if isinstance(self.k_neighbors, bool) or not isinstance(self.k_neighbors, int) or self.k_neighbors < 1:
            raise ValueError(f"visionzip option k_neighbors must be an integer >= 1, got {self.k_neighbors!r}")


def visionzip_counts(
    tokens_per_frame: int, retention: float, options: VisionZipOptions | None = None
) -> tuple[int, int]:
    """(n_dom, n_ctx) per frame of P = ``tokens_per_frame`` tokens at retention R, for the chosen port.

    original: S = clamp(round(R * P), 1, P), n_dom = int(S * dominant_ratio), n_ctx = S - n_dom.
    authors: keep = clamp(int(P * R), 1, P), n_dom = max(1, int(keep * authors_dominant_ratio)).
    """
    check_retention(retention)
    opts = options or VisionZipOptions()
    per_frame = int(tokens_per_frame)
    if per_frame < 1:
        raise ValueError(f"visionzip: tokens per frame must be >= 1, got {tokens_per_frame}")
    if opts.port == "authors":
        keep = max(1, min(per_frame, int(per_frame * retention)))
        dominant = min(keep, max(1, int(keep * opts.authors_dominant_ratio)))
    else:
        keep = max(1, min(per_frame, round(retention * per_frame)))  # round() is half-even
        dominant = int(keep * opts.dominant_ratio)
    return dominant, keep - dominant


# ----------------------------------------------------------------------------------- shared steps


def _dominant_and_rest(importance: torch.Tensor, n_dom: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, P) float32 scores -> dominant (F, n_dom) ascending, remaining (F, P - n_dom) ascending."""
    n_frames, per_frame = importance.shape
    dominant = stable_top(importance, n_dom).sort(dim=1).values
    remaining = torch.ones(n_frames, per_frame, dtype=torch.int8, device=importance.device)
    remaining.scatter_(1, dominant, 0)
    # every frame has P - n_dom remaining tokens: a stable sort puts them first, in index order
    rest = torch.sort(remaining, dim=1, descending=True, stable=True).indices[:, : per_frame - n_dom]
    return dominant, rest


def _flat_rows(index: torch.Tensor, per_frame: int) -> torch.Tensor:
    """(F, M) indices within each frame's N = ``per_frame`` rows -> (F * M,) indices into the F * N rows."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * per_frame).reshape(-1)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(F, N, C) gathered at (F, M) -> (F, M, C). One index per row (index_select on the flattened rows),
    where torch.gather with an expanded index reads one int64 per element: 3x the traffic at C = 3584."""
    frames, n, channels = x.shape
    return x.reshape(frames * n, channels).index_select(0, _flat_rows(index, n)).view(frames, -1, channels)


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Members (F, M, D) with group ids (F, M) -> per-group sums (F, groups, D) and counts (F, groups)."""
    n_frames, _, dim = x.shape
    flat = _flat_rows(assign, groups)
    sums = x.new_zeros(n_frames * groups, dim).index_add_(0, flat, x.reshape(-1, dim))
    counts = x.new_zeros(n_frames * groups).index_add_(0, flat, torch.ones_like(flat, dtype=x.dtype))
    return sums.view(n_frames, groups, dim), counts.view(n_frames, groups)


def _flatten(local: torch.Tensor, values: torch.Tensor, per_frame: int) -> VideoSelection:
    """(F, S) local indices (disjoint per frame) and (F, S, D) values -> ascending flat VideoSelection."""
    order = local.argsort(dim=1)
    local = torch.gather(local, 1, order)
    values = _rows(values, order)
    offsets = torch.arange(local.shape[0], device=local.device, dtype=torch.int64)[:, None] * per_frame
    return VideoSelection((local + offsets).reshape(-1), values.reshape(-1, values.shape[-1]))


# ----------------------------------------------------------------------------------- the two ports


def visionzip_select_counts(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, n_dom: int, n_ctx: int
) -> VideoSelection:
    """The original (SigLIP port) algorithm with explicit per-frame counts.

    features (F, P, D), attention (F, P), keys (F, P, d) -> sources (K,) ascending into F*P and
    float32 features (K, D), K = F * (n_dom + min(n_ctx, P - n_dom)).
    """
    per_frame = features.shape[1]
    if not 0 <= n_dom <= per_frame or n_ctx < 0 or n_dom + n_ctx == 0:
        raise ValueError(f"visionzip: bad counts n_dom={n_dom}, n_ctx={n_ctx} for P={per_frame}")
    dominant, rest = _dominant_and_rest(attention.float(), n_dom)
    n_rest = per_frame - n_dom
    n_ctx = min(n_ctx, n_rest)  # clamp (impossible for R <= 1): every remaining token is then a target
    if n_ctx == 0:
        return _flatten(dominant, _rows(features, dominant).float(), per_frame)
    step = max(1, n_rest // n_ctx)
    # positions within the remaining set, the same for every frame (built on the device, no sync)
    target_pos = torch.arange(n_ctx, device=features.device) * step
    is_target = torch.zeros(n_rest, dtype=torch.int8, device=features.device).index_fill_(0, target_pos, 1)
    member_pos = torch.sort(is_target, stable=True).indices[: n_rest - n_ctx]  # the others, ascending
    targets = rest[:, target_pos]  # (F, n_ctx) ascending
    members = rest[:, member_pos]  # (F, n_rest - n_ctx)
    metric = F.normalize(keys.float(), dim=-1)
    similarity = _rows(metric, members) @ _rows(metric, targets).transpose(1, 2)  # (F, members, targets)
    assign = similarity.argmax(dim=-1)  # first maximum: the lowest target on ties
    # rows gathered in the features' dtype, then widened (exact): no float32 copy of all F * P tokens
    sums, counts = _cluster_sums(_rows(features, members).float(), assign, n_ctx)
    contextual = _rows(features, targets).float() + sums / counts.clamp(min=1).unsqueeze(-1)  # target + mean
    local = torch.cat([dominant, targets], dim=1)
    values = torch.cat([_rows(features, dominant).float(), contextual], dim=1)
    return _flatten(local, values, per_frame)


def authors_density(tokens: torch.Tensor, k_neighbors: int) -> torch.Tensor:
    """(F, N, D) -> (F, N) float32 mean cosine similarity to each token's k most similar other tokens.

    k is clamped to N - 1; a lone token (N = 1) gets density 0.
    """
    n = tokens.shape[1]
    k = min(int(k_neighbors), n - 1)
    if k <= 0:
        return tokens.new_zeros(tokens.shape[:2], dtype=torch.float32)
    unit = F.normalize(tokens.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
    similarity = similarity.masked_fill(eye, float("-inf"))  # self excluded
    return similarity.topk(k, dim=-1).values.mean(dim=-1)


def authors_select_counts(features: torch.Tensor, n_dom: int, n_ctx: int, k_neighbors: int = 5) -> VideoSelection:
    """The VidCom2 authors' Qwen port with explicit per-frame counts (see the module docstring).

    features (F, P, D) -> sources (K,) ascending into F*P and float32 features (K, D),
    K = F * (n_dom + min(n_ctx, P - n_dom)).
    """
    n_frames, per_frame, _ = features.shape
    if not 0 <= n_dom <= per_frame or n_ctx < 0 or n_dom + n_ctx == 0:
        raise ValueError(f"visionzip: bad counts n_dom={n_dom}, n_ctx={n_ctx} for P={per_frame}")
    x = features.float()
    dominant, rest = _dominant_and_rest(x.norm(dim=-1), n_dom)
    n_rest = per_frame - n_dom
    n_ctx = min(n_ctx, n_rest)  # upstream pads with zero vectors at index 0 instead (impossible for R <= 1)
    if n_ctx == 0:
        return _flatten(dominant, _rows(x, dominant), per_frame)
    rest_x = _rows(x, rest)  # (F, n_rest, D)
    anchor_pos = stable_top(authors_density(rest_x, k_neighbors), n_ctx).sort(dim=1).values  # (F, n_ctx)
    unit = F.normalize(rest_x, dim=-1)
    similarity = unit @ _rows(unit, anchor_pos).transpose(1, 2)  # (F, n_rest, n_ctx)
    assign = similarity.argmax(dim=-1)  # the lowest anchor on ties
    own = torch.arange(n_ctx, device=x.device).expand(n_frames, -1)
    assign = assign.scatter(1, anchor_pos, own)  # an anchor always belongs to its own cluster
    sums, counts = _cluster_sums(rest_x, assign, n_ctx)
    contextual = sums / counts.unsqueeze(-1)  # plain mean, anchor included (count >= 1)
    local = torch.cat([dominant, torch.gather(rest, 1, anchor_pos)], dim=1)
    values = torch.cat([_rows(x, dominant), contextual], dim=1)
    return _flatten(local, values, per_frame)


def _check_signal(name: str, signal: torch.Tensor, frames: int, per_frame: int, rank: int) -> None:
    """Raise unless ``signal`` is (F, P) (rank 2) or (F, P, d) with d > 0 (rank 3)."""
    tensor = isinstance(signal, torch.Tensor)
    ok = tensor and signal.dim() == rank and tuple(signal.shape[:2]) == (frames, per_frame)
    if not ok or (rank == 3 and signal.shape[2] == 0):
        got = tuple(signal.shape) if tensor else type(signal).__name__
        want = f"({frames}, {per_frame}, d)" if rank == 3 else f"({frames}, {per_frame})"
        raise ValueError(f"visionzip: signal {name!r} must have shape {want}, got {got}")


def visionzip_select(video: VideoTokens, retention: float, options: VisionZipOptions | None = None) -> VideoSelection:
    """One video's VisionZip output: sources (K,) int64 ascending into F*P and float32 features (K, D).

    Raises ValueError for a retention outside (0, 1], bad shapes, a missing signal (original port)
    or non-finite input (one host sync reads the finite check).
    """
    selection = _select(video, retention, options)
    if not bool(selection.valid):  # the one host sync
        raise ValueError(NON_FINITE)
    return selection


def _select(video: VideoTokens, retention: float, options: VisionZipOptions | None = None) -> VideoSelection:
    """:func:`visionzip_select` without its host sync: non-finite input comes back as ``valid`` False
    (the registry's path; the adapter reads it with the kept counts)."""
    opts = options or VisionZipOptions()
    features = video.features
    check_video_features(features, retention)
    n_frames, per_frame, _ = features.shape
    grid = tuple(video.grid)
    if len(grid) != 3 or grid[0] != n_frames or grid[1] * grid[2] != per_frame:
        raise ValueError(f"visionzip: grid {grid} does not match features (F, P) = ({n_frames}, {per_frame})")
    n_dom, n_ctx = visionzip_counts(per_frame, float(retention), opts)
    if opts.port == "authors":
        selection = authors_select_counts(features, n_dom, n_ctx, opts.k_neighbors)
        return replace(selection, valid=torch.isfinite(features).all())
    attention = video.signal(VIT_RECEIVED_ATTENTION)
    keys = video.signal(VIT_KEYS)
    _check_signal(VIT_RECEIVED_ATTENTION, attention, n_frames, per_frame, 2)
    _check_signal(VIT_KEYS, keys, n_frames, per_frame, 3)
    select = _original if opts.execution == "eager" or not features.is_cuda else compiled(_original, "visionzip")
    source, values, finite = select(features, attention, keys, n_dom, n_ctx)
    return VideoSelection(source, values, valid=finite)


def _original(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, n_dom: int, n_ctx: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original port as plain tensors (sources, values, finite flag): what torch.compile traces."""
    finite = torch.isfinite(features).all() & torch.isfinite(attention).all() & torch.isfinite(keys).all()
    selection = visionzip_select_counts(features, attention, keys, n_dom, n_ctx)
    return selection.source, selection.features, finite


METHOD = Method(
    name="visionzip",
    options=VisionZipOptions,
    signals=frozenset({VIT_RECEIVED_ATTENTION, VIT_KEYS}),
    select=_select,
    merges=True,
    summary="per frame: most-attended tokens kept, the rest merged into key-similar contextual tokens",
    needs=lambda options: frozenset() if options.port == "authors" else frozenset({VIT_RECEIVED_ATTENTION, VIT_KEYS}),
)
