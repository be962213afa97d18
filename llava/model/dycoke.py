"""DyCoke, its token temporal merging stage (TTM): drop the tokens a frame repeats from a nearby frame.

What it does, per video of F frames x P tokens (the released code, ``dycole_ttm``, which the
published numbers come from):

1. Pairs (0, 1), (2, 3), ...: the even frame stays whole; the odd frame keeps only its k_p positions
   whose cosine similarity to the SAME position of the even frame is the lowest (what changed).
2. Windows i = 0, 4, 8, ... while i < F - 4 (strictly: when F is a multiple of 4 the last window is
   skipped): frame i + 2, whole after step 1, is cut to its k_p positions of lowest similarity to
   frame i. Similarities always come from the original features (frame i + 3 of step 1 was compared
   with the whole frame i + 2).

So the full ("anchor") frames are 0, 4, 8, ... plus the even frames of the skipped last window: for
F = 32, frames 0, 4, ..., 28 and 30 (A = 9 of 32); for Qwen's F = 16 temporal patches (32 input
frames), 0, 4, 8, 12, 14 (A = 5); F = 64 gives A = 17. Every other visited frame keeps k_p tokens.

Anchor layouts (option ``anchors``):
    released (default): as above.
    every_window: one full frame per complete 4-frame window, the last window included (the paper's
        reading, "R < 25% is not possible"): A = F / 4 for F a multiple of 4; only a multiple-of-4 F
        differs from ``released`` (elsewhere the last window is incomplete in both).

How R maps onto k_p (default ``port="original"``): with A full frames and n_p pruned frames,
    k_p = round((R*F*P - A*P) / n_p), clamped to [0, P]   (round half to even)
    achieved retention = (A*P + n_p*k_p) / (F*P),
where F*P counts every input token (a dropped odd last frame, see below, is in the denominator and
keeps nothing). R below A/F cannot be reached (the anchors alone exceed it) and raises, naming the floor.
Examples at P = 196 (LLaVA-OV):
    F = 32, released (A = 9, n_p = 23): R = 0.30 -> k_p = round(117.6 / 23) = 5, achieved 30.0%;
        R = 0.25 raises (floor 9/32 = 28.1%). The wrapper's default K = 0.7 is k_p = 58 (49.4%).
    F = 32, every_window (A = 8, n_p = 24): R = 0.30 -> k_p = 13; R = 0.25 -> k_p = 0 (the pruned
        frames are dropped whole).
    F = 16 (Qwen, 32 input frames), released (A = 5, n_p = 11): floor 5/16 = 31.25%;
        R = 0.40 -> k_p = round((0.40*16*196 - 5*196) / 11) = round(24.9) = 25, achieved 40.0%.
The authors' Qwen port (``port="authors"``, labelled so: the VidCom2 authors' ``token_compressor``
port) sets DyCoke's merging ratio K = 1 - R and keeps k_p = int((1 - K) * P) as upstream computes it,
so R is the keep fraction of the PRUNED frames only and the achieved retention is above R (R = 0.25,
F = 16: (5 + 11 * 0.25) / 16 = 48%; 46% at F = 32); there is no floor and no error. The double
subtraction is kept on purpose: R = 0.2 at P = 25 gives int(4.999...) = 4 there, as upstream.

Differences from the original (and from the authors' port, which runs the same function):
- Output order: sources ascending (video order). Upstream emits each pruned frame's tokens in order of
  increasing similarity (topk order), frames in order.
- Ties: equal similarities are ranked by position (the lower position is kept first), deterministic;
  upstream's ``topk`` leaves the choice among ties to the kernel.
- Similarity: cosine dot / (max(|a|, 1e-8) * max(|b|, 1e-8)), in float32 by default
  (``score_dtype="model"`` scores in the input dtype, as upstream and the authors' bf16 port do). The
  released pair step L2-normalises first (eps 1e-12); the two agree except for tokens of norm < 1e-8.
- Odd F: upstream never visits the last frame, so it is dropped entirely; we keep that faithfully
  (it counts in F*P for the budget). F <= 4: upstream crashes (it stacks an empty list of window
  similarities); we simply do no window step (``every_window`` does run the one complete window at
  F = 4). F = 1 has no pair and would keep nothing: it raises.
- Families: applied to any (F, P, D) video (upstream acts only on LLaVA-OV's one_token layout); the
  single newline upstream appends, LLaVA-Video's row newlines and Qwen positions are the adapters' job
  (they follow the sources: a kept token keeps its own (t, h, w)).
- The paper says "merge"; the code drops: this is a select-only method (``merges=False``).
- Code before 2025-03-01 compared each pair with the previous pair's similarity; we follow the fix.
- Non-finite features keep nothing (masks) or raise (select), never a silent pass-through.

Decode-time KV pruning (DP, DyCoke's second stage, option ``decode_prune``; VidCom2's DyCoke rows use
TTM only): at every decode step, layer l-1's attention of the current token over its cached keys (head
mean) is sliced to the prompt's video keys; its cosine with the previous step's slice (first step: 0)
decides: below ``prune_threshold`` (0.9), layers >= l attend only to the keys before the video, the top
int(n_img * (1 - p)) video keys by that attention and every key after the video (the current token
included); otherwise to every key that step (a keep list is never reused). The cache stays whole, as
upstream's (a per-step key mask here; upstream gathers the kept keys in every layer). Prefill and the
first answer token are never affected. See :class:`DyCokeDecodePlan` for the differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from llava.model.inllm_select import top_visual
from llava.model.method_api import (
    LLM_ATTENTION_ROWS,
    DecodeStep,
    InLLMPlan,
    Method,
    Stage,
    check_choice,
    check_range,
    parse_options,
    selecting,
)
from llava.model.vidcom2 import NON_FINITE_MESSAGE, check_retention, check_video_features

ANCHOR_LAYOUTS = ("released", "every_window")
PORTS = ("original", "authors")
SCORE_DTYPES = ("float32", "model")
PRUNE_SPANS = ("video", "released")
COSINE_EPS = 1e-8  # on each norm, as torch.nn.functional.cosine_similarity


@dataclass(frozen=True)
class DyCokeOptions:
    """DyCoke TTM knobs; the defaults are the released code's algorithm (scored in float32).

    anchors: which frames stay whole: released (default: frames 0, 4, 8, ... and the even frames of the
        last window, which the released loop skips when F is a multiple of 4) or every_window (one full
        frame per complete 4-frame window, the last one included: the paper's reading).
    port: original (default: k_p solved from R, see the module docstring) or authors (the VidCom2
        authors' Qwen port: K = 1 - R, k_p = int((1 - K) * P); R is the pruned frames' keep fraction).
    score_dtype: float32 (default) or model (the cosine in the input dtype, as upstream and the port).
    decode_prune: also run DyCoke's decode-time KV pruning (DP) [upstream: on with dycoke].
    prune_layer: l, the first layer whose attention DP restricts (layer l-1's attention decides) [dycoke_l].
    prune_ratio: p, the fraction of the video keys DP masks in a pruned step [dycoke_p: 0.7 in the README
        example; the lmms-eval wrapper's default is 0.8].
    prune_threshold: a step prunes when its attention slice's cosine with the previous step's is below it.
    prune_span: video (default: every video key of the prompt) or released (the released code's
        n_img = count - 1: the last video key counts as text and always stays).
    """

    anchors: str = "released"
    port: str = "original"
    score_dtype: str = "float32"
    decode_prune: bool = False
    prune_layer: int = 3
    prune_ratio: float = 0.7
    prune_threshold: float = 0.9
    prune_span: str = "video"

    def __post_init__(self) -> None:
        check_choice("dycoke", "anchors", self.anchors, ANCHOR_LAYOUTS)
        check_choice("dycoke", "port", self.port, PORTS)
        check_choice("dycoke", "score_dtype", self.score_dtype, SCORE_DTYPES)
        if isinstance(self.prune_layer, bool) or not isinstance(self.prune_layer, int) or self.prune_layer < 1:
            raise ValueError(f"dycoke option prune_layer must be an integer >= 1, got {self.prune_layer!r}")
        check_range("dycoke", "prune_ratio", self.prune_ratio, 0.0, 1.0)
        check_range("dycoke", "prune_threshold", self.prune_threshold, -1.0, 1.0)
        check_choice("dycoke", "prune_span", self.prune_span, PRUNE_SPANS)


def _options(options: DyCokeOptions | Mapping[str, Any] | None) -> DyCokeOptions:
    return parse_options("dycoke", DyCokeOptions, options)


def dycoke_layout(n_frames: int, anchors: str = "released") -> tuple[list[int], list[int], list[int]]:
    """(full frames, pruned frames, each pruned frame's reference frame), all ascending by pruned frame.

    Frames not listed (the last one of an odd F) are dropped whole. Host-side: a few small lists of
    frame numbers, built once per call (no tensor work).
    """
    check_choice("dycoke", "anchors", anchors, ANCHOR_LAYOUTS)
    if n_frames < 2:
        raise ValueError(f"dycoke compares frames in pairs: it needs F >= 2 frames, got F = {n_frames}")
    visited = n_frames - n_frames % 2  # the released pair loop never reaches an odd last frame
    last = n_frames - 4 if anchors == "released" else n_frames - 3  # windows i < last (i + 4 <= F if every_window)
    windows = set(range(0, max(last, 0), 4))
    reference = {f: f - 1 for f in range(1, visited, 2)}  # pair step: odd frame against the even one
    reference.update({i + 2: i for i in windows})  # window step: frame i + 2 against frame i
    pruned = sorted(reference)
    full = [f for f in range(0, visited, 2) if f not in reference]
    return full, pruned, [reference[f] for f in pruned]


def _frames_text(frames: Sequence[int]) -> str:
    shown = [str(f) for f in frames]
    if len(shown) > 6:
        shown = shown[:3] + ["..."] + shown[-2:]
    return ", ".join(shown)


def dycoke_plan(
    n_frames: int, per_frame: int, retention: float, options: DyCokeOptions | Mapping[str, Any] | None = None
) -> tuple[list[int], int]:
    """(full frames, k_p): which frames stay whole and how many tokens each pruned frame keeps.

    original: k_p = round((R*F*P - A*P) / n_p) clamped to [0, P]; R < A/F raises, naming the floor.
    authors: k_p = int((1 - K) * P) with K = 1 - R (upstream's float expression), no floor.
    """
    opts = _options(options)
    check_retention(retention)
    if isinstance(per_frame, bool) or not isinstance(per_frame, int) or per_frame < 1:
        raise ValueError(f"dycoke needs P >= 1 tokens per frame, got {per_frame!r}")
    full, pruned, _ = dycoke_layout(n_frames, opts.anchors)
    if opts.port == "authors":
        merge = 1.0 - float(retention)  # the port's DYCOKE_K default
        return full, min(per_frame, int((1.0 - merge) * per_frame))
    anchors = len(full)
    if float(retention) * n_frames < anchors - 1e-9:
        raise ValueError(
            f"dycoke keeps frames {_frames_text(full)} whole: R must be >= {anchors}/{n_frames} = "
            f"{anchors / n_frames:.3f} at F = {n_frames} with anchors={opts.anchors} (got R = {retention:g})"
        )
    k_p = round((float(retention) * n_frames * per_frame - anchors * per_frame) / len(pruned))
    return full, max(0, min(per_frame, k_p))


def dycoke_retention(
    n_frames: int, per_frame: int, retention: float, options: DyCokeOptions | Mapping[str, Any] | None = None
) -> float:
    """Achieved retention (A*P + n_p*k_p) / (F*P) of :func:`dycoke_plan` (for reports)."""
    opts = _options(options)
    full, k_p = dycoke_plan(n_frames, per_frame, retention, opts)
    n_pruned = len(dycoke_layout(n_frames, opts.anchors)[1])
    return (len(full) * per_frame + n_pruned * k_p) / (n_frames * per_frame)


def position_cosine(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., P, D) x (..., P, D) -> (..., P): cosine of each position of ``a`` with the same position of ``b``."""
    a, b = a.to(dtype), b.to(dtype)
    dots = torch.linalg.vecdot(a, b, dim=-1)
    norms = torch.linalg.vector_norm(a, dim=-1).clamp_min(COSINE_EPS) * torch.linalg.vector_norm(b, dim=-1).clamp_min(
        COSINE_EPS
    )
    return dots / norms


@lru_cache(maxsize=64)
def _frame_tensors(n_frames: int, anchors: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(full, pruned, reference) frame numbers as int64 tensors on ``device``, made once per layout:
    a fresh host-to-device copy on every call would make the host wait for the GPU."""
    return tuple(torch.tensor(frames, dtype=torch.int64, device=device) for frames in dycoke_layout(n_frames, anchors))


def _check_videos(videos: Sequence[torch.Tensor], retention: float) -> None:
    if not videos:
        raise ValueError("dycoke needs at least one video")
    for video in videos:
        check_video_features(video, retention)
    shapes = {tuple(v.shape) for v in videos}
    if len(shapes) > 1:
        raise ValueError(f"dycoke's batched masks need videos of one shape, got {sorted(shapes)}")


def dycoke_keep_masks(
    videos: Sequence[torch.Tensor], retention: float, options: DyCokeOptions | Mapping[str, Any] | None = None
) -> torch.Tensor:
    """B same-shape videos (F, P, D) -> (B, F, P) bool keep masks, without a host synchronisation.

    All pair and window comparisons of all videos run as one batched cosine (B, n_p, P); each pruned
    frame keeps its k_p lowest positions (ties: lower position first). A video with NaN/Inf keeps
    nothing (all-False: the registry reports the refusal).
    """
    opts = _options(options)
    _check_videos(videos, retention)
    x = torch.stack(list(videos)) if len(videos) > 1 else videos[0][None]
    n_videos, n_frames, per_frame, _ = x.shape
    k_p = dycoke_plan(n_frames, per_frame, retention, opts)[1]
    full_t, pruned_t, reference_t = _frame_tensors(n_frames, opts.anchors, x.device)
    mask = torch.zeros(n_videos, n_frames, per_frame, dtype=torch.bool, device=x.device)
    mask.index_fill_(1, full_t, True)  # not mask[:, full_t] = True: that index_put_ of a host scalar syncs on CUDA
    if k_p > 0:
        dtype = torch.float32 if opts.score_dtype == "float32" else x.dtype
        similarity = position_cosine(x[:, reference_t], x[:, pruned_t], dtype)  # (B, n_p, P)
        lowest = torch.sort(similarity, dim=-1, stable=True).indices[..., :k_p]
        keep = torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, lowest, True)
        mask[:, pruned_t] = keep
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    return mask & finite[:, None, None]


def dycoke_keep_indices(
    features: torch.Tensor, retention: float, options: DyCokeOptions | Mapping[str, Any] | None = None
) -> torch.Tensor:
    """(F, P, D) of one video -> kept flat indices (K,) int64, ascending. Raises on NaN/Inf features."""
    check_video_features(features, retention)
    indices = dycoke_keep_masks([features], retention, options)[0].reshape(-1).nonzero().squeeze(1)
    if indices.numel() == 0:  # frame 0 is always whole, so an empty selection means non-finite input
        raise ValueError(NON_FINITE_MESSAGE)
    return indices


# ------------------------------------------------------------------------------ decode-time pruning (DP)


class DyCokeDecodePlan(InLLMPlan):
    """DyCoke's DP as a decode-time plan (llava.model.lm_driver runs it at every decode step).

    Differences from upstream (PrunableDynamicCache), labelled:
    - State per request and per row: the previous step's slice starts empty for every request (upstream
      keeps it on the model, so a sample's first step is compared with the previous sample's last).
    - The span is the prompt's video keys as the cache holds them (after TTM; LLaVA-Video's row newlines
      are not video keys and always stay); upstream slices [s0, s0 + n_img) with s0 = 14 hard-coded for the
      qwen_1_5 template and n_img = count - 1 (``prune_span=released`` reproduces the off-by-one).
    - The attention row is float32, from layer l-1's own query and keys (upstream: that layer's returned
      weights); video-key ties go to the lower index (upstream's topk leaves them to the kernel).
    - Batch > 1 (upstream: batch 1): each row decides and prunes on its own.
    """

    def __init__(self, layer: int, ratio: float, threshold: float, span: str) -> None:
        self.decode_layer = layer
        self.ratio = ratio
        self.threshold = threshold
        self.span = span

    def decode_act(self, step: DecodeStep) -> torch.Tensor:
        span, counts = step.visual, step.visual_counts
        if self.span == "released":  # the released n_img = count - 1: the last video key is not in the span
            index = torch.arange(span.shape[1], device=span.device)
            last = torch.where(span, index, -1).amax(dim=1, keepdim=True)
            span = span & (index != last)
            counts = tuple(max(0, n - 1) for n in counts)
        now = (step.scores * span)[:, : step.prompt_keys]  # the slice, zero elsewhere: cosine over the span
        previous = step.memory.get("dycoke_slice")
        if previous is None:
            similarity = torch.zeros(now.shape[0], device=now.device)
        else:
            similarity = torch.nn.functional.cosine_similarity(now, previous, dim=-1, eps=COSINE_EPS)
        step.memory["dycoke_slice"] = now
        pruned = similarity < self.threshold  # (B,)
        top = top_visual(step.scores, span, [int(n * (1 - self.ratio)) for n in counts])
        return ~span | top | ~pruned[:, None]


def decode_plan(num_layers: int, retention: float, options: DyCokeOptions) -> DyCokeDecodePlan | None:
    """The decode stage of one request (None unless ``decode_prune``)."""
    if not options.decode_prune:
        return None
    if options.prune_layer >= num_layers:
        raise ValueError(
            f"dycoke option prune_layer={options.prune_layer}: the language model has {num_layers} layers "
            f"(valid 1..{num_layers - 1})"
        )
    return DyCokeDecodePlan(options.prune_layer, options.prune_ratio, options.prune_threshold, options.prune_span)


METHOD = Method(
    name="dycoke",
    options=DyCokeOptions,
    stages=(Stage.PRE_LLM, Stage.DECODE),
    signals=frozenset({LLM_ATTENTION_ROWS}),
    select=selecting(dycoke_keep_indices),
    masks=dycoke_keep_masks,
    merges=False,
    summary="DyCoke TTM: whole anchor frames; other frames keep the positions least similar to their anchor "
    "(decode_prune: DP on the KV cache)",
    needs=lambda options: frozenset({LLM_ATTENTION_ROWS}) if options.decode_prune else frozenset(),
    plan=decode_plan,
)
