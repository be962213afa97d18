"""Which video tokens a method keeps, and which tokens each merged output token was made from.

Why: a picture or a table of what a method kept must show what the model really receives. So this
module reads and encodes a video exactly as the family's adapter does (same frame sampling, same
preprocessing, same tower signals) and asks the registry for the selection
(:meth:`CompressionSpec.select_videos`), the path every model uses; it selects nothing itself.

Merge groups: the method contract returns only each output token's source and new value. Which input
tokens went into a merged value is read from the method's own computation, by differentiating it:
with the discrete choices fixed, output token k depends on exactly the tokens of its group. Two
vector-Jacobian products (outputs weighted by k + 1, and by 1) give, for every input token j, the
ratio k + 1 when j feeds one output; a token that feeds several outputs is reported as shared (-2).

Shapes: one video of F token-frames (LLaVA: one sampled frame each; Qwen: one temporal patch of two
frames) on an h x w grid, P = h * w tokens per token-frame, K output tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from llava.model.compression import CompressionSpec
from llava.model.method_api import VideoTokens
from llava.runtime import FrameSampling, StageTimer
from llava.video_io import VideoClip, read_videos

DROPPED, SHARED = -1, -2  # group ids of a token that reaches no output / several outputs


@dataclass
class EncodedVideo:
    """One video as its family's compression stage sees it.

    tokens: the features (F, P, D), grid (F, h, w) and the tower signals asked for.
    pictures: (F, H, W, 3) uint8, one sampled frame per token-frame (Qwen: the first of its two).
    frame_groups: per token-frame, the source frame indices it was made from.
    """

    tokens: VideoTokens
    pictures: np.ndarray
    frame_groups: list[list[int]]
    family: str


@dataclass
class KeptTokens:
    """One method's selection on one video, on the token grid (numpy, host).

    kept: (F, h, w) bool, the output tokens' sources. group: (F, h, w) int64, the output token (index in
    video order) each token's value reaches; DROPPED or SHARED otherwise. merged: (K,) bool, output
    tokens made from more than one token. error: why the method could not run (then the arrays are empty).
    unavailable: why the method runs but the replay cannot show what it keeps (a method acting only inside
    the LLM; arrays empty). note: what the replay leaves out (a stage inside the LLM or at decoding).
    """

    method: str
    retention: float
    kept: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=bool))
    group: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.int64))
    merged: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    error: str = ""
    unavailable: str = ""
    note: str = ""

    @property
    def per_frame(self) -> np.ndarray:
        """(F,) kept tokens of each token-frame (its budget)."""
        return self.kept.reshape(self.kept.shape[0], -1).sum(axis=1)

    @property
    def achieved_retention(self) -> float:
        """Kept video tokens / all video tokens (newlines are not video tokens)."""
        return float(self.kept.mean()) if self.kept.size else 0.0


def sampled_indices(clip: VideoClip) -> list[int]:
    """Source frame index of each sampled frame (timestamps are index / source fps)."""
    return np.rint(clip.timestamps * clip.source_fps).astype(np.int64).tolist()


def _llava_encode(model: Any, video: str | Path, sampling: FrameSampling, signals: Iterable[str]) -> EncodedVideo:
    from llava.model.families import resolve_sampling

    [clip] = read_videos([video], resolve_sampling(sampling, model.family))
    features, sig = model.features_from_frames(clip.frames, StageTimer(), signals)
    tokens = VideoTokens(features.flatten(1, 2), tuple(features.shape[:3]), sig, model.family)
    return EncodedVideo(tokens, clip.frames, [[i] for i in sampled_indices(clip)], model.family)


def _qwen_encode(model: Any, video: str | Path, sampling: FrameSampling, signals: Iterable[str]) -> EncodedVideo:
    from transformers_patched import qwen_stages as stages
    from transformers_patched.qwen_adapter import video_question_messages

    prepared = model.prepare([video_question_messages(video, "")], sampling)
    vision = stages.encode_vision(model.model, prepared.inputs, frozenset(signals))
    [clip] = prepared.clips
    t, gh, gw = vision.video_grid[0]
    m = stages.merge_size(model.model)
    features = vision.video_embeds[0].reshape(t, gh * gw // m**2, -1)
    sig = vision.video_signals[0] if vision.video_signals else {}
    tokens = VideoTokens(features, (t, gh // m, gw // m), sig, model.family)
    span = int(model.processor.video_processor.temporal_patch_size)
    index = sampled_indices(clip)
    groups = [[index[min(f * span + j, len(index) - 1)] for j in range(span)] for f in range(t)]
    pictures = clip.frames[[min(f * span, len(index) - 1) for f in range(t)]]
    return EncodedVideo(tokens, pictures, groups, model.family)


def encode_video(model: Any, video: str | Path, sampling: FrameSampling, signals: Iterable[str] = ()) -> EncodedVideo:
    """Read, sample and encode one video with ``model`` (a loaded family adapter), with ``signals``."""
    if not Path(video).exists():
        raise FileNotFoundError(f"video not found: {video}")
    encode = _llava_encode if hasattr(model, "features_from_frames") else _qwen_encode
    with torch.inference_mode():
        return encode(model, video, sampling, sorted(signals))


def tower_signals(spec: CompressionSpec) -> frozenset[str]:
    """The signals ``spec``'s method needs from the vision tower (those read inside the LM excluded)."""
    return frozenset(getattr(spec, "tower_signals", spec.signals))


def check_spec(model: Any, spec: CompressionSpec) -> str:
    """'' when the model can run ``spec``, else the reason it cannot: a signal its family cannot supply, or
    (for a method acting inside the LLM) a plan its language model's depth does not allow."""
    try:
        spec.check_supported(model.family, model.supplied_signals, getattr(model, "signal_hint", ""))
        if getattr(spec.method, "plan", None) is not None and not spec.is_identity:
            spec.llm_plan(_lm_layers(model))
    except ValueError as exc:
        return str(exc)
    return ""


def acts_in_llm(model: Any, spec: CompressionSpec) -> bool:
    """True when ``spec`` runs a plan inside ``model``'s language model (FastV, PDrop, SparseVLM; HoliTom with
    its in-LLM stage on): what it keeps is then the layer-averaged retention, not the tokens at the LM input.
    ``spec`` must pass :func:`check_spec` (else its plan raises the reason it cannot run)."""
    return spec.llm_plan(_lm_layers(model)) is not None


def _lm_layers(model: Any) -> int:
    """Decoder layers of a loaded adapter's language model (LLaVA: ``model.language_model``; Qwen: the
    checkpoint's text config)."""
    inner = model.model
    lm = getattr(inner, "language_model", None)
    config = lm.config if hasattr(lm, "config") else inner.config.get_text_config()
    return int(config.num_hidden_layers)


def _detached(tokens: VideoTokens, features: torch.Tensor) -> VideoTokens:
    """The video with new ``features`` and plain (non-inference) copies of its signals."""
    signals = {k: v.clone() for k, v in tokens.signals.items()}
    return VideoTokens(features, tokens.grid, signals, tokens.family)


class _OutFree(TorchFunctionMode):
    """Runs ``f(..., out=buf)`` as ``buf.copy_(f(...))``: autograd cannot follow ``out=`` arguments, and a
    method may write its results into a preallocated buffer that way."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's hook
        kwargs = dict(kwargs or {})
        out = kwargs.pop("out", None)
        if isinstance(out, torch.Tensor):
            return out.copy_(func(*args, **kwargs))
        return func(*args, **kwargs)


def merge_groups(spec: CompressionSpec, tokens: VideoTokens, mask: torch.Tensor) -> torch.Tensor:
    """(F*P,) int64: the output token each input token's value reaches (DROPPED / SHARED), for a merging
    method whose selection gave the source ``mask`` (F, P). See the module docstring."""
    x = tokens.features.detach().clone().float().requires_grad_(True)
    with torch.enable_grad(), _OutFree():
        [choice] = spec.select_videos([_detached(tokens, x)])
        if not torch.equal(choice.mask.cpu(), mask.cpu()):
            raise ValueError(f"{spec.describe()}: the selection differs between two identical runs; no merge groups")
        outputs = choice.values[: int(choice.mask.sum())]  # (K, D), video order (rows past K: padding)
        probe = torch.randn(outputs.shape[1], generator=torch.Generator().manual_seed(0)).to(outputs)
        projected = outputs @ probe  # (K,)
        rank = torch.arange(1, projected.shape[0] + 1, dtype=projected.dtype, device=projected.device)
        (weighted,) = torch.autograd.grad((projected * rank).sum(), x, retain_graph=True, allow_unused=True)
        (plain,) = torch.autograd.grad(projected.sum(), x, allow_unused=True)
    if weighted is None or plain is None:
        raise ValueError(f"{spec.describe()}: the merged values do not depend on the features; no merge groups")
    weighted, plain = weighted.flatten(0, 1).double(), plain.flatten(0, 1).double()  # (F*P, D)
    norm = (plain * plain).sum(-1)
    ratio = (weighted * plain).sum(-1) / norm.clamp(min=1e-30)
    group = ratio.round().long() - 1
    residual = (weighted - (group + 1)[:, None] * plain).norm(dim=-1)
    single = residual <= 1e-3 * weighted.norm(dim=-1).clamp(min=1e-30)
    reached = norm > 1e-20 * norm.max().clamp(min=1e-30)
    group = torch.where(single, group, torch.full_like(group, SHARED))
    return torch.where(reached, group, torch.full_like(group, DROPPED))


def kept_tokens(model: Any, encoded: EncodedVideo, spec: CompressionSpec, *, groups: bool = True) -> KeptTokens:
    """What ``spec`` keeps of ``encoded`` and, for a merging method with ``groups``, its merge groups
    (otherwise every token reaches only itself or nothing); a method the family cannot run comes back
    with ``error`` set instead of raising."""
    result = KeptTokens(spec.compressor, float(spec.retention))
    error = check_spec(model, spec)
    if error:
        result.error = error
        return result
    stages = {s.value for s in spec.method.stages} - {"pre_llm"}
    if not spec.is_identity and spec.method.select is None:
        result.unavailable = (
            f"{spec.compressor} acts inside the LLM ({', '.join(sorted(stages))}): which tokens it keeps is decided "
            "layer by layer during prefill, which this pre-LLM replay does not run"
        )
        return result
    if not spec.is_identity and stages:
        result.note = f"pre-LLM stage shown; its {' and '.join(sorted(stages))} stage is not"
    tokens = encoded.tokens
    frames, h, w = tokens.grid
    try:
        with torch.inference_mode():
            if spec.is_identity:
                mask = torch.ones(frames, h * w, dtype=torch.bool)
            else:
                [choice] = spec.select_videos([tokens])
                mask = choice.mask
            spec.check_kept([int(mask.sum())])
        flat = mask.reshape(-1).cpu()
        order = torch.full((flat.numel(),), DROPPED, dtype=torch.int64)
        order[flat] = torch.arange(int(flat.sum()))
        group = order
        if groups and spec.method.merges and not spec.is_identity:
            group = merge_groups(spec, tokens, mask).cpu()
    except ValueError as exc:
        result.error = str(exc)
        return result
    sizes = np.bincount(group[group >= 0].numpy(), minlength=int(flat.sum()))
    result.kept = flat.numpy().reshape(frames, h, w)
    result.group = group.numpy().reshape(frames, h, w)
    result.merged = sizes > 1
    return result
