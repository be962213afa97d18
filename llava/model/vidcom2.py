"""VidCom2 token selection: frame budgets from frame uniqueness, then per-frame top-k, per video.

The maths follows the authors' released code (the published numbers come from it), which differs
from the paper's prose: scores use a multi-scale Gaussian kernel on the lowest-variance half of the
channels, not cosine similarity. Every knob is a field of :class:`VidCom2Config`, so an ablation is
a parameter change, never an edit of this file.

Shapes: one video's ``features`` are (F, P, D) - F frames, P tokens per frame, D channels. The steps
work on a batch of B same-shape videos, (B, F, P, D), each on its own budget exactly as alone, so a
request's videos share one launch sequence (:func:`vidcom2_keep_masks`). Everything is vectorised over
videos, frames and tokens; the only host synchronisation is the final ``nonzero`` of
:func:`vidcom2_keep_indices` (the kept count is data dependent), which also carries the finite-input
check (non-finite input keeps nothing).

This module imports nothing from models or evaluation (only the method contract, llava.model.method_api).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache, partial, wraps
from typing import Any

import torch

from llava.model.compiled_select import compiled
from llava.model.method_api import Method, selecting

FRAME_SCORES = ("neg_mean", "pos_mean", "neg_max", "pos_max", "neg_min", "pos_min", "equal")
TOKEN_SCORES = ("v+f", "f", "v", "-(v+f)", "-f", "-v", "external")
SIMILARITIES = ("gaussian", "cosine")
SCORE_DTYPES = ("float32", "model")
EXECUTIONS = ("compiled", "compiled_graph", "cuda_graph", "eager")


@dataclass(frozen=True)
class VidCom2Config:
    """Every VidCom2 knob; the defaults reproduce the authors' released code (scored in float32).

    channel_ratio: fraction of channels (lowest variance over the video) used for scoring.
    alphas: bandwidths a of the kernel sum_a exp(-|x - c|^2 / (2a)).
    temperature: tau of the frame-budget softmax.
    frame_score: frame uniqueness s_t from the token-to-video similarity v[t, :]:
        neg_mean (default, -mean_m v), pos_mean, neg_max, pos_max, neg_min, pos_min, or
        equal (every frame gets the retention R).
    token_score: the per-token score whose LOWEST values are kept: v+f (default), f, v, their
        negations -(v+f), -f, -v, or external (scores passed by the caller, e.g. attention).
    similarity: gaussian (default, released code) or cosine (the paper's prose).
    score_dtype: float32 (default) or model (score in the input dtype, as upstream does in fp16/bf16).
    exact_count: when True the kept total is exactly round(R*F*P) (at least F), trimmed or topped up
        by token score; when False (upstream) rounding per frame lets it drift by up to about F/2.
    execution: how the selection runs on CUDA (CPU always runs eager):
        compiled (default): the ~20 kernels torch.compile fuses the method into, launched directly. They
            keep no GPU memory between requests (their intermediates come from, and go back to, PyTorch's
            caching allocator). Compiled once per input shape: ~17 s for a process's first, ~4 s for each
            further one. Launching them costs ~0.3 ms of host time, hidden when the GPU is still busy with
            the vision tower (the pipelines queue the selection behind it).
        compiled_graph: the same kernels replayed from a captured CUDA graph, one per input shape: one
            launch, for a host that waits on an idle GPU, but each graph keeps its static input and its
            intermediates' pool between requests.
        cuda_graph: a graph of the ~60 unfused kernels (no compilation; memory as compiled_graph).
        eager: every unfused kernel launched from Python; keeps nothing, compiles nothing.
        cuda_graph and eager select the same tokens bit for bit; the compiled modes sum in another
        order, so a token whose score ties a frame's last kept one to float32 rounding may swap with it.
    """

    channel_ratio: float = 0.5
    alphas: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    temperature: float = 0.01
    frame_score: str = "neg_mean"
    token_score: str = "v+f"
    similarity: str = "gaussian"
    score_dtype: str = "float32"
    exact_count: bool = False
    execution: str = "compiled"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.channel_ratio) <= 1.0:
            raise ValueError(f"VidCom2Config.channel_ratio must be in (0, 1], got {self.channel_ratio}")
        alphas = tuple(float(a) for a in self.alphas)
        if not alphas or any(a <= 0 for a in alphas):
            raise ValueError(f"VidCom2Config.alphas must be non-empty and positive, got {self.alphas}")
        object.__setattr__(self, "alphas", alphas)
        if not float(self.temperature) > 0.0:
            raise ValueError(f"VidCom2Config.temperature must be > 0, got {self.temperature}")
        for name, allowed in (
            ("frame_score", FRAME_SCORES),
            ("token_score", TOKEN_SCORES),
            ("similarity", SIMILARITIES),
            ("score_dtype", SCORE_DTYPES),
            ("execution", EXECUTIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"VidCom2Config.{name}={value!r} is not one of {', '.join(allowed)}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | VidCom2Config | None) -> VidCom2Config:
        """Build from a config, None, or a flat dict of field -> value (strings are parsed).

        Unknown keys raise, naming the valid ones, so a typo on a command line never goes unnoticed.
        """
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        valid = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown VidCom2 option(s) {unknown}; valid options: {', '.join(valid)}")
        return cls(**{key: _parse_option(key, value) for key, value in options.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_option(key: str, value: Any) -> Any:
    """Turn command-line strings ("0.5", "true", "0.125/0.25") into the field's type."""
    if not isinstance(value, str):
        return tuple(value) if key == "alphas" else value
    if key == "alphas":
        parts = [p for p in value.replace(";", "/").replace(",", "/").split("/") if p.strip()]
        return tuple(float(p) for p in parts)
    if key in ("channel_ratio", "temperature"):
        return float(value)
    if key == "exact_count":
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"VidCom2 option {key} expects true/false, got {value!r}")
    return value


def check_video_features(features: torch.Tensor, retention: float) -> None:
    """Shape and retention checks shared by every compressor (cheap: no device sync)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (F, P, D) tensor of one video, got shape {shape}")
    n_frames, per_frame, dim = features.shape
    if n_frames == 0 or per_frame == 0 or dim == 0:
        raise ValueError(
            f"features must have F, P, D > 0 (frames, tokens per frame, channels), got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    check_retention(retention)


def check_retention(retention: float) -> None:
    if isinstance(retention, bool) or not isinstance(retention, (int, float)):
        raise ValueError(f"retention must be a number in (0, 1], got {retention!r}")
    if not 0.0 < float(retention) <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")


# ---------------------------------------------------------------------------------------------
# The steps of the method, each a small pure function.
# ---------------------------------------------------------------------------------------------


def channel_variance(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, F, P, D) -> (B, D) population variance of each channel over each video's F*P tokens, in ``dtype``.

    Computed per frame and combined (frames are equal in size): Var = mean_t var_t + var_t mean_t.
    A single reduction over F*P tokens per channel has only D outputs, so CUDA splits each one over
    many blocks and stages partial Welford states (about 530 MB at 32 x 196 x 3584); per frame there
    are F*D outputs and no staging. The per-frame reductions read bf16/fp16 input as it is and
    accumulate in ``dtype`` (their outputs are ``dtype`` tensors), with no float32 copy of the features.
    A non-finite feature makes its channel's variance non-finite, which is how the NaN check avoids a
    second pass over the features.
    """
    batch, frames, _, dim = features.shape
    out = torch.empty(batch, frames, dim, dtype=dtype, device=features.device)
    frame_var = torch.var(features, dim=2, correction=0, out=out)
    frame_mean = torch.mean(features, dim=2, dtype=dtype)
    return frame_var.mean(dim=1) + frame_mean.var(dim=1, correction=0)


def select_low_variance_channels(features: torch.Tensor, variance: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, F, P, D), (B, D) -> (B, F, P, floor(D*ratio)): each video's channels of lowest variance
    (ties: lower channel index first), in ascending variance order."""
    dim = features.shape[-1]
    keep = max(1, int(dim * ratio))
    if keep >= dim:
        return features
    channels = torch.argsort(variance, dim=-1, stable=True)[:, :keep]
    if features.shape[0] == 1:
        return features.index_select(-1, channels[0])
    return torch.gather(features, -1, channels[:, None, None, :].expand(*features.shape[:-1], keep))


def _kernel(dots: torch.Tensor, sq_norms: torch.Tensor, centre_sq: torch.Tensor, cfg: VidCom2Config) -> torch.Tensor:
    """Similarity of tokens to centres from their dot products: (B, F, P, K) -> (B, F, P, K).

    ``centre_sq`` (B, F, 1, K) is |c|^2 of each token's centres. |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, so no
    (F, P, C) difference tensor is ever formed; the K centres (video, frame) share every kernel launch.
    """
    if cfg.similarity == "cosine":
        return dots / centre_sq.sqrt().clamp_min(1e-12)
    sq_dist = (sq_norms.unsqueeze(-1) + centre_sq).sub_(dots, alpha=2.0).clamp_min_(0.0)
    scales = _bandwidth_scales(cfg.alphas, sq_dist.dtype, sq_dist.device)
    return torch.exp(sq_dist.unsqueeze(-1) * scales).sum(-1)  # all bandwidths in one pass


def _device_constant(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``make(*args)`` made once per arguments and cached (outside inference mode, so the tensor is
    usable whatever mode later calls run in): no host-to-device copy or extra kernel on the hot path.
    Under torch.compile it is traced inline instead, since the compiler does not see through a cache."""

    @lru_cache(maxsize=64)
    def cached(*args: Any) -> torch.Tensor:
        with torch.inference_mode(False):
            return make(*args)

    @wraps(make)
    def get(*args: Any) -> torch.Tensor:
        return make(*args) if torch.compiler.is_compiling() else cached(*args)

    return get


@_device_constant
def _bandwidth_scales(alphas: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-1/(2a) per bandwidth."""
    return torch.tensor([-0.5 / a for a in alphas], dtype=dtype, device=device)


def similarity_to_centres(
    features: torch.Tensor, cfg: VidCom2Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, F, P, D) -> v, f each (B, F, P) and the channel variance (B, D).

    v: similarity of each token to its video's centre; f: to its own frame's centre. Tokens are
    L2-normalised on the selected channels; centres are plain means, not re-normalised.
    Low-precision features are never copied to float32 as a whole: the reductions accumulate in the
    scoring dtype and the normalisation casts while it scales.
    """
    dtype = torch.float32 if cfg.score_dtype == "float32" else features.dtype
    variance = channel_variance(features, dtype)
    x = select_low_variance_channels(features, variance, cfg.channel_ratio)  # input dtype: half the bytes
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)  # (B, F, P, 1)
    inverse = norms.clamp_min(1e-12).reciprocal_()
    x = torch.mul(x, inverse).to(dtype)  # a bf16 x is promoted to float32 inside the multiply
    sq_norms = (norms * inverse).squeeze(-1).square()  # 1, or 0 for an all-zero token
    batch, frames, per_frame, channels = x.shape
    frame_centre = x.mean(dim=2)  # (B, F, C)
    video_centre = frame_centre.mean(dim=1, keepdim=True)  # (B, 1, C): frames are equal in size, so the token mean
    # v and f side by side, (B, F, P, 2): one pass of the kernel's elementwise work serves both.
    if torch.compiler.is_compiling():
        # Compiled, a multiply-and-sum is one fused reduction that never writes the product, and it needs
        # no cuBLAS, whose per-stream workspace (32 MiB) a captured graph would keep for good.
        dots = torch.stack(
            [(x * video_centre.unsqueeze(2)).sum(-1), (x * frame_centre.unsqueeze(2)).sum(-1)], dim=-1
        )
    else:
        # Eager, the products stay matrix-vector ones: a (C, 2) right-hand side picks a slow float32 GEMM on
        # H100, and a multiply-and-sum writes and reads a (B, F, P, 2, C) product (3x slower at 32 frames).
        to_video = torch.bmm(x.reshape(batch, frames * per_frame, channels), video_centre.transpose(1, 2))
        to_frame = torch.bmm(x.reshape(batch * frames, per_frame, channels), frame_centre.reshape(-1, channels, 1))
        dots = torch.cat(
            [to_video.reshape(batch, frames, per_frame, 1), to_frame.reshape(batch, frames, per_frame, 1)], dim=-1
        )
    centres = torch.cat([video_centre, frame_centre], dim=1)  # (B, 1 + F, C)
    sq = centres.square().sum(-1)  # |g_v|^2, then each |g_t|^2
    centre_sq = torch.stack([sq[:, :1].expand(batch, frames), sq[:, 1:]], dim=-1).unsqueeze(2)  # (B, F, 1, 2)
    similarity = _kernel(dots, sq_norms, centre_sq, cfg)
    return similarity[..., 0], similarity[..., 1], variance


def frame_scales(v: torch.Tensor, retention: float | torch.Tensor, cfg: VidCom2Config) -> torch.Tensor:
    """v (B, F, P) -> per-frame retention scale_t (B, F), about R each, in [R(1-1/F), R(2-1/F)], <= 1.

    ``retention`` may be a 0-d tensor (the CUDA-graph path feeds it as an input of the graph).
    """
    if cfg.frame_score == "equal":
        return torch.ones(v.shape[:-1], dtype=v.dtype, device=v.device) * retention
    reduce = cfg.frame_score.split("_", 1)[1]
    if reduce == "mean":
        stat = v.mean(dim=-1)
    elif reduce == "max":
        stat = v.amax(dim=-1)
    else:
        stat = v.amin(dim=-1)
    # uniqueness s = -stat (neg_*) or +stat; s - max(s) is min(stat) - stat or stat - max(stat), exactly
    if cfg.frame_score.startswith("neg"):
        shifted = stat.amin(dim=-1, keepdim=True) - stat
    else:
        shifted = stat - stat.amax(dim=-1, keepdim=True)
    weights = torch.softmax(shifted / cfg.temperature, dim=-1)
    return (retention * (1.0 + weights - weights.mean(dim=-1, keepdim=True))).clamp(max=1.0)


def budgets_from_scales(scales: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """scale_t (..., F) -> k_t = max(1, round_half_even(scale_t * P)) as int64 (..., F)."""
    counts = torch.round(scales.float() * tokens_per_frame).to(torch.int64)
    return counts.clamp(min=1, max=tokens_per_frame)


def token_scores(
    v: torch.Tensor, f: torch.Tensor, cfg: VidCom2Config, external: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, F, P) score per token; the LOWEST are kept."""
    if cfg.token_score == "external":
        if external is None or external.shape != v.shape:
            got = None if external is None else tuple(external.shape)
            want = tuple(v.shape[1:]) if v.shape[0] == 1 else tuple(v.shape)
            raise ValueError(f"token_score='external' needs token_scores of shape {want}, got {got}")
        if not bool(torch.isfinite(external).all()):  # eager path only: external scores are never graphed
            raise ValueError("token_score='external': the token scores contain NaN or Inf")
        return external.to(v.dtype)
    name = cfg.token_score
    negate = name.startswith("-")
    base = name.strip("-()")
    score = v + f if base == "v+f" else (f if base == "f" else v)
    return -score if negate else score


_PAIRWISE_RANK_LIMIT = 1 << 24  # F*P*P comparisons (16 MB of bools); beyond it, one stable sort


@_device_constant
def _earlier(per_frame: int, device: torch.device) -> torch.Tensor:
    """(P, P) bool, [i, j] = j < i."""
    index = torch.arange(per_frame, device=device)
    return index.unsqueeze(0) < index.unsqueeze(1)


def rank_within_frame(scores: torch.Tensor) -> torch.Tensor:
    """(..., P) -> (..., P) int64 rank of each token in its frame by ascending score (ties: lower index).

    Up to ``_PAIRWISE_RANK_LIMIT`` comparisons the rank is counted directly: the tokens before it with
    a score <= its own plus the tokens after it with a lower score. That is a few elementwise kernels
    instead of a segmented sort and a scatter, and the same ranks as the stable sort for finite scores
    (external scores must be finite; features that are not finite give no selection at all, see
    ``_mask_from_scores``).
    """
    per_frame = scores.shape[-1]
    rows = scores.reshape(-1, per_frame)
    if rows.shape[0] * per_frame * per_frame <= _PAIRWISE_RANK_LIMIT:
        mine, other = rows.unsqueeze(2), rows.unsqueeze(1)  # (R, P, 1) against (R, 1, P)
        ranks = torch.where(_earlier(per_frame, scores.device), other <= mine, other < mine).sum(dim=2)
    else:
        order = torch.argsort(rows, dim=1, stable=True)
        positions = torch.arange(per_frame, device=scores.device).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks.reshape(scores.shape)


def exact_total_budgets(
    budgets: torch.Tensor, scores: torch.Tensor, ranks: torch.Tensor, retention: float | torch.Tensor
) -> torch.Tensor:
    """Keep mask (B, F, P) with exactly max(F, round(R*F*P)) tokens per video: the per-frame top-k, then
    the video's globally best extra tokens added (or its globally worst kept ones, never a frame's
    best, dropped)."""
    batch, n_frames, per_frame = scores.shape
    if isinstance(retention, torch.Tensor):  # float64, so the rounding matches Python's round() exactly
        target = torch.round(retention.double() * (n_frames * per_frame)).clamp(min=n_frames).to(torch.int64)
    else:
        target = max(n_frames, round(retention * n_frames * per_frame))
    keep = ranks < budgets[..., None]
    # Order each video's tokens by (score, frame, rank) through a stable sort of its scores.
    order = torch.argsort(scores.reshape(batch, -1), dim=1, stable=True)
    kept_sorted = keep.reshape(batch, -1).gather(1, order)
    missing = target - budgets.sum(dim=1, keepdim=True)  # (B, 1), may be negative; on the device, no sync
    # Top up: the first `missing` not-kept tokens in ascending score order.
    add_rank = torch.cumsum((~kept_sorted).to(torch.int64), 1)
    add = (~kept_sorted) & (add_rank <= missing)
    # Trim: the last `-missing` kept tokens in ascending score order, excluding each frame's best.
    droppable = kept_sorted & (ranks.reshape(batch, -1).gather(1, order) > 0)
    drop_rank = torch.cumsum(droppable.flip(1).to(torch.int64), 1).flip(1)
    drop = droppable & (drop_rank <= -missing)
    new_sorted = (kept_sorted | add) & ~drop
    return torch.empty_like(new_sorted).scatter_(1, order, new_sorted).reshape(batch, n_frames, per_frame)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def vidcom2_frame_budgets(
    features: torch.Tensor, retention: float = 0.25, config: VidCom2Config | dict[str, Any] | None = None
) -> torch.Tensor:
    """Per-frame token budgets k_t (F,) int64 of one video (F, P, D), before any exact-count adjustment.

    Retention 1.0 keeps every token (the raw formula would still move budget between frames and,
    after clamping at 1, drop tokens; R = 1 means "no compression" here).
    """
    cfg = VidCom2Config.from_options(config)
    check_video_features(features, retention)
    n_frames, per_frame, _ = features.shape
    if float(retention) >= 1.0:
        return torch.full((n_frames,), per_frame, dtype=torch.int64, device=features.device)
    with torch.no_grad():
        v, _, _ = similarity_to_centres(features.unsqueeze(0), cfg)
        return budgets_from_scales(frame_scales(v, float(retention), cfg), per_frame)[0]


@torch.no_grad()
def _mask_from_scores(
    features: torch.Tensor,
    retention: float | torch.Tensor,
    cfg: VidCom2Config,
    token_scores_external: torch.Tensor | None,
) -> torch.Tensor:
    """The whole selection of B same-shape videos (B, F, P, D) up to their keep masks (B, F, P): pure
    tensor code with no host synchronisation, every video on its own budget.

    Non-finite features give their video an all-False mask (a valid selection keeps >= 1 token per
    frame), so the caller's one synchronisation, on the kept count, also carries the NaN check. The
    check reads the channel variance, which any non-finite feature makes non-finite: no second pass.
    Selection is not differentiable, so no autograd graph is built even for features that need grad."""
    per_frame = features.shape[2]
    v, f, variance = similarity_to_centres(features, cfg)
    budgets = budgets_from_scales(frame_scales(v, retention, cfg), per_frame)
    scores = token_scores(v, f, cfg, token_scores_external)
    ranks = rank_within_frame(scores)
    if cfg.exact_count:
        keep = exact_total_budgets(budgets, scores, ranks, retention)
    else:
        keep = ranks < budgets[..., None]
    return keep & torch.isfinite(variance).all(dim=-1)[:, None, None]


Videos = torch.Tensor | Sequence[torch.Tensor]


_COMPILED_EXECUTIONS = ("compiled", "compiled_graph")


def _selection(cfg: VidCom2Config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The selection as f(features (B, F, P, D), retention 0-d tensor) -> masks: the eager kernels, or for
    the compiled executions the kernels torch.compile fuses them into (~20 instead of ~60; compiled once
    per shape, at the first call). execution='compiled' launches them directly; 'compiled_graph' and
    'cuda_graph' have our own graph capture them (torch.compile's own CUDA graphs, mode='reduce-overhead',
    would add a guard check and an input copy per call and keep a pool of their own)."""
    select = partial(_mask_from_scores, cfg=cfg, token_scores_external=None)
    if cfg.execution not in _COMPILED_EXECUTIONS:
        return select
    # one compilation per config and input shape, at most compiled_select.MAX_SHAPES shapes a process
    alternatives = "execution=cuda_graph or execution=eager (nothing to compile)"
    return compiled(select, "VidCom2", key=cfg, execution=cfg.execution, alternatives=alternatives)


@_device_constant
def _retention_tensor(retention: float, device: torch.device) -> torch.Tensor:
    """The retention as a 0-d float64 device tensor, an input of the compiled selection: as a Python float
    it would be a constant of the compiled code, and every retention of a sweep would compile anew."""
    return torch.tensor(retention, dtype=torch.float64, device=device)


def _compiled(videos: Videos, retention: float, cfg: VidCom2Config) -> torch.Tensor:
    """execution='compiled': the fused kernels launched directly. Their intermediates are ordinary
    allocations, freed when the selection returns, so nothing stays reserved between requests."""
    features = _stacked(videos)
    return _selection(cfg)(features, _retention_tensor(retention, features.device))


class _CapturedSelection:
    """The selection (:func:`_selection`) captured once as a CUDA graph for one batch shape (B, F, P, D),
    dtype, device and config.

    Features and retention are inputs of the graph (static buffers, filled video by video, so a batch
    is never stacked first), so one graph - and one memory pool for its intermediates - serves every
    retention of a sweep.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, cfg: VidCom2Config) -> None:
        select = _selection(cfg)
        side = _capture_stream(device, cublas=cfg.execution == "cuda_graph")
        side.wait_stream(torch.cuda.current_stream(device))
        # The static buffers live as long as the graph. Allocated on the side stream, whose cached memory
        # is only ever ours, they get segments of their own: on the request's stream they could split a
        # large block of a tensor still alive there (the vision tower's output) and keep its whole
        # segment reserved after it is freed. Work on the side stream always waits for the request's
        # stream first (above, and capturing synchronises the device), so reusing them later is safe.
        with torch.cuda.stream(side), torch.inference_mode(False):  # ordinary tensors, refilled in any mode
            self.features = torch.zeros(shape, dtype=dtype, device=device)
            self.retention = torch.full((), 0.5, dtype=torch.float64, device=device)
        self.last_retention = 0.5
        with torch.cuda.stream(side):  # warm-up outside the graph (cached constants; compilation)
            select(self.features, self.retention)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=_graph_pool(device), stream=side):
            self.mask = select(self.features, self.retention)

    def __call__(self, videos: Videos, retention: float) -> torch.Tensor:
        if isinstance(videos, torch.Tensor):
            self.features.copy_(videos)
        else:
            for slot, video in zip(self.features, videos, strict=True):
                slot.copy_(video)
        if retention != self.last_retention:  # a sweep changes it, an evaluation does not: no fill kernel then
            self.retention.fill_(retention)
            self.last_retention = retention
        self.graph.replay()
        return self.mask.clone()  # the next replay overwrites the graph's own output


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_CUBLAS_READY: set[torch.device] = set()


def _capture_stream(device: torch.device, cublas: bool = True) -> torch.cuda.Stream:
    """One side stream per device for every selection graph's warm-up and capture. The allocator caches
    memory per stream and cuBLAS keeps a workspace per stream for the life of the process, so a fresh
    stream per captured shape would strand a workspace, and the memory segment it pins, at every capture.
    ``cublas``: the graph will call cuBLAS (the eager kernels do; the compiled ones do not), so the
    workspace is made first, before any large block exists on the stream that it could split and pin."""
    key = torch.device(device)
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(key)
    stream = _CAPTURE_STREAMS[key]
    if cublas and key not in _CUBLAS_READY:
        with torch.cuda.stream(stream):  # kept for the process
            one = torch.ones(1, 1, 1, device=key)
            torch.bmm(one, one)
        _CUBLAS_READY.add(key)
    return stream


_GRAPH_POOLS: dict[torch.device, Any] = {}


def _graph_pool(device: torch.device) -> Any:
    """One memory pool for all selection graphs of a device. They are replayed one at a time on one
    stream, read their inputs from static buffers outside the pool, and each output is cloned right
    after its replay, so no pool memory is live across replays: the graphs can share their
    intermediates' memory, and the pool is as large as the largest graph, not the sum of all."""
    key = torch.device(device)
    if key not in _GRAPH_POOLS:
        _GRAPH_POOLS[key] = torch.cuda.graph_pool_handle()
    return _GRAPH_POOLS[key]


_GRAPHS: OrderedDict[tuple, _CapturedSelection] = OrderedDict()
_MAX_GRAPHS = 4  # evaluations reuse one shape; Qwen's resolutions may vary
# Videos selected by one graph replay hold at most this many feature elements (one 32-frame LLaVA video,
# 32 x 196 x 3584): a graph keeps its static input and intermediates between requests, so the bound
# caps that memory (about 0.15 GB) whatever the batch; larger batches replay it chunk by chunk.
_GRAPH_MAX_ELEMENTS = 32 * 196 * 3584


def _graphed(videos: Videos, shape: tuple[int, ...], retention: float, cfg: VidCom2Config) -> torch.Tensor:
    batch, per_video = shape[0], math.prod(shape[1:])
    chunk = max(1, _GRAPH_MAX_ELEMENTS // per_video)
    if batch > chunk:
        parts = [videos[i : i + chunk] for i in range(0, batch, chunk)]
        return torch.cat([_graphed(part, (len(part), *shape[1:]), retention, cfg) for part in parts])
    first = videos[0]
    key = (shape, first.dtype, first.device, cfg)
    captured = _GRAPHS.pop(key, None)
    if captured is None:
        captured = _CapturedSelection(shape, first.dtype, first.device, cfg)
        while len(_GRAPHS) >= _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS[key] = captured  # most recently used last
    return captured(videos, retention)


def release_selection_graphs() -> None:
    """Drop the captured selection graphs (their static inputs and memory pools, freed by the next
    ``torch.cuda.empty_cache()``): e.g. between benchmark cases, so one case's graphs are not charged
    to the next case's memory. The next call of a shape captures again."""
    _GRAPHS.clear()
    _GRAPH_POOLS.clear()  # the next capture starts a new pool; the old one goes with its last graph


def _stacked(videos: Videos) -> torch.Tensor:
    """(B, F, P, D) without a copy when there is one video (or the batch is one tensor already)."""
    if isinstance(videos, torch.Tensor):
        return videos
    return videos[0].unsqueeze(0) if len(videos) == 1 else torch.stack(list(videos))


def _check_videos(videos: Videos, retention: float) -> tuple[int, ...]:
    """(B, F, P, D) of a batch of same-shape videos, each checked like a single one."""
    if isinstance(videos, torch.Tensor):
        if videos.dim() != 4:
            raise ValueError(f"a batch of videos must be a (B, F, P, D) tensor, got shape {tuple(videos.shape)}")
        items: Sequence[torch.Tensor] = list(videos) if videos.shape[0] else []
    else:
        items = list(videos)
    if not items:
        raise ValueError("no videos given: a batch needs at least one (F, P, D) video")
    for video in items:
        check_video_features(video, retention)
    first = items[0]
    for i, video in enumerate(items):
        if video.shape != first.shape or video.dtype != first.dtype or video.device != first.device:
            raise ValueError(
                f"videos selected together must share shape, dtype and device: video 0 is {tuple(first.shape)} "
                f"{first.dtype} on {first.device}, video {i} is {tuple(video.shape)} {video.dtype} on {video.device}"
            )
    return (len(items), *first.shape)


def vidcom2_keep_masks(
    videos: Videos,
    retention: float = 0.25,
    config: VidCom2Config | dict[str, Any] | None = None,
    token_scores_external: torch.Tensor | None = None,
) -> torch.Tensor:
    """B same-shape videos ((B, F, P, D), or a sequence of (F, P, D)) -> keep masks (B, F, P), without
    any host synchronisation. Each video is selected on its own budget, exactly as alone; together
    they share the kernel launches (and, with a graph execution, one replay).

    Every frame keeps at least one token; an all-False mask means that video's features were not finite
    (callers that count the kept tokens raise then, as :func:`vidcom2_keep_indices` does).
    ``token_scores_external`` is (B, F, P) for ``token_score='external'``.
    """
    cfg = VidCom2Config.from_options(config)
    shape = _check_videos(videos, retention)
    batch, n_frames, per_frame, _ = shape
    if float(retention) >= 1.0:
        finite = torch.stack([torch.isfinite(video).all() for video in videos])
        return finite[:, None, None].expand(batch, n_frames, per_frame).clone()
    first = videos[0]
    if (
        cfg.execution != "eager"
        and first.is_cuda
        and token_scores_external is None
        and not torch.cuda.is_current_stream_capturing()
    ):
        if cfg.execution == "compiled":
            return _compiled(videos, float(retention), cfg)
        return _graphed(videos, shape, float(retention), cfg)
    return _mask_from_scores(_stacked(videos), float(retention), cfg, token_scores_external)


def vidcom2_keep_mask(
    features: torch.Tensor,
    retention: float = 0.25,
    config: VidCom2Config | dict[str, Any] | None = None,
    token_scores_external: torch.Tensor | None = None,
) -> torch.Tensor:
    """(F, P, D) -> boolean keep mask (F, P) of one video, computed without any host synchronisation.

    Every frame keeps at least one token; an all-False mask means the features were not finite
    (callers that count the kept tokens raise then, as :func:`vidcom2_keep_indices` does).
    """
    external = None if token_scores_external is None else token_scores_external.unsqueeze(0)
    return vidcom2_keep_masks([features], retention, config, external)[0]


NON_FINITE_MESSAGE = "features contain NaN or Inf; refusing to select tokens from them"


def vidcom2_keep_indices(
    features: torch.Tensor,
    retention: float = 0.25,
    config: VidCom2Config | dict[str, Any] | None = None,
    token_scores_external: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Kept flat indices into F*P (int64, sorted ascending) of one video's (F, P, D) tokens.

    Raises ValueError for a retention outside (0, 1], a wrong rank, an empty dimension or
    non-finite features.
    """
    mask = vidcom2_keep_mask(features, retention, config, token_scores_external)
    indices = mask.reshape(-1).nonzero().squeeze(1)  # the one host sync
    if indices.numel() == 0:  # known on the host once nonzero returns: no second sync
        raise ValueError(NON_FINITE_MESSAGE)
    return indices


METHOD = Method(
    name="vidcom2",
    options=VidCom2Config,
    select=selecting(vidcom2_keep_indices),
    masks=vidcom2_keep_masks,
    summary="frame budgets from frame uniqueness, then each frame's most unique tokens",
    label="VidCom2",
)
