"""The method registry every model calls, and :class:`CompressionSpec`, what a request asks for.

The registry sits above the methods (each a module exporting a :class:`~llava.model.method_api.Method`,
importing nothing from models or evaluation) and below the models. Adding a method is one module and
one line in :data:`METHODS`. Model adapters never name a method: they say which signals they supply
(:meth:`CompressionSpec.check_supported`, before any work), hand each video's tokens and signals to
:meth:`CompressionSpec.select_videos`, and splice what comes back.

Options are parsed once, when a spec is made, into the method's options dataclass; on a command line
they are ``KEY=VALUE`` pairs, either bare (``dominant_ratio=0.6``) or under the method's name
(``visionzip.dominant_ratio=0.6``), so knobs of different methods and of the wrappers never collide.

R = 1.0 keeps every token for every method (the identity: no method runs), as ``none`` does at any R.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from llava.model import baselines, dycoke, fastv, fastvid, holitom, pdrop, sparsevlm, vidcom2, visionzip
from llava.model.method_api import (
    GRID,
    LLM_ATTENTION_ROWS,
    QUESTION_TOKENS,
    InLLMPlan,
    MaskSelect,
    Method,
    NoOptions,
    VideoSelection,
    VideoTokens,
    option_defaults,
    parse_options,
    selecting,
)
from llava.model.vidcom2 import NON_FINITE_MESSAGE, check_retention

# One line per method; the order is the listing order.
METHODS: tuple[Method, ...] = (
    baselines.NONE,
    vidcom2.METHOD,
    baselines.RANDOM,
    baselines.UNIFORM,
    visionzip.METHOD,
    dycoke.METHOD,
    fastvid.METHOD,
    holitom.METHOD,
    fastv.METHOD,
    pdrop.METHOD,
    sparsevlm.METHOD,
)

IN_LLM_SIGNALS = frozenset({LLM_ATTENTION_ROWS, QUESTION_TOKENS})
"""Signals read inside the LM (by the layer-wise driver), never by a method's pre-LLM selection."""

_REGISTRY: dict[str, Method] = {}

IndexCompressor = Callable[[torch.Tensor, float, Any], torch.Tensor]
"""(F, P, D), R, options -> kept flat indices (K,) int64 ascending: the select-only shorthand."""


def register_method(method: Method) -> Method:
    """Make ``method`` available under its (unique) name to every model, the CLI, the bench and lmms-eval."""
    if method.name in _REGISTRY:
        raise ValueError(f"compressor {method.name!r} is already registered")
    if "." in method.name:
        raise ValueError(f"method names cannot contain '.', got {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def register_compressor(name: str, *, mask: MaskSelect | None = None) -> Callable[[IndexCompressor], IndexCompressor]:
    """Decorator for a select-only method without options: ``fn(features (F, P, D), R, options) -> kept
    indices``; ``mask`` is its optional batched mask form (see method_api.MaskSelect)."""

    def wrap(fn: IndexCompressor) -> IndexCompressor:
        register_method(Method(name, NoOptions, select=selecting(fn), masks=mask))
        return fn

    return wrap


for _method in METHODS:
    register_method(_method)


def available_compressors() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(available_compressors())}") from None


def get_compressor(name: str) -> IndexCompressor:
    """The index form of a select-only method that needs no signal: ``fn(features, R, options dict)``."""
    method = get_method(name)
    if method.merges or method.signals - IN_LLM_SIGNALS or method.select is None:
        raise ValueError(f"compressor {name!r} merges tokens or needs model signals: use CompressionSpec.select_videos")

    def indices(features: torch.Tensor, retention: float, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        config = parse_options(name, method.options, options)
        return method.select(_tokens(features), float(retention), config).source

    return indices


def method_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with keys under ``name.`` unprefixed; a key under another method's name raises."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        prefix, dot, rest = str(key).partition(".")
        if dot:
            if prefix != name:
                get_method(prefix)  # an unknown method name raises here, listing the valid ones
                raise ValueError(f"option {key!r} is a {prefix!r} knob, but the compressor is {name!r}")
            key = rest
        if key in out:
            raise ValueError(f"option {key!r} of {name!r} given twice (bare and as {name}.{key})")
        out[key] = value
    return out


def is_method_option(key: str) -> bool:
    """True for ``method.knob`` keys naming a registered method (their values go to that method)."""
    prefix, dot, rest = str(key).partition(".")
    return bool(dot and rest) and prefix in _REGISTRY


def options_for(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``name.knob`` entries of ``options``, unprefixed (a sweep's options for one of its methods)."""
    return {k.partition(".")[2]: v for k, v in options.items() if k.partition(".")[0] == name and "." in k}


def _tokens(features: torch.Tensor) -> VideoTokens:
    """A (F, P, D) video without a known spatial grid (index form callers): the grid is (F, 1, P)."""
    shape = tuple(features.shape) if isinstance(features, torch.Tensor) else ()
    grid = (shape[0], 1, shape[1]) if len(shape) == 3 else (0, 0, 0)
    return VideoTokens(features, grid)


@dataclass(frozen=True)
class SelectedVideo:
    """What an adapter splices for one video: ``mask`` (F, P) bool of the output tokens' sources and, for
    merging methods, their new values in compact form (None: the tokens are unchanged).

    values: (M, D) in the video's dtype, row j the j-th output token (sources ascending); rows past the
        kept count are padding. M bounds the kept count.
    sources: (M,) each row's source, F * P for padding.
    rank: (F * P + 1,) the row of ``values`` holding each source's output token (where ``mask`` is True;
        elsewhere a valid row, for padded gathers), then M: an adapter that appends rows to ``values`` (a
        newline) indexes the first of them with it.
    features: the video's (F, P, D) tokens, from which :attr:`table` is built on demand.
    """

    mask: torch.Tensor
    values: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    features: torch.Tensor | None = None

    @cached_property
    def table(self) -> torch.Tensor | None:
        """(F*P, D): the video's tokens with each output token's value at its source row (None: unchanged).
        A full copy of the video's tokens: adapters that only need the output tokens use ``values``."""
        if self.values is None or self.sources is None or self.features is None:
            return None
        total, dim = self.mask.numel(), self.values.shape[-1]
        table = torch.cat([self.features.reshape(total, dim), self.features.new_zeros(1, dim)])
        return table.index_copy_(0, self.sources, self.values)[:total]  # padding goes to the spare row


def splice(
    features: torch.Tensor,
    source: torch.Tensor,
    new: torch.Tensor | None,
    count: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A selection's (K,) sources (and ``new`` (K, D) values) -> the (F, P) source mask and, with ``new``, the
    sources with padding at F * P, the values in the features' dtype and the rank of :class:`SelectedVideo`;
    checked on the device: sources that are not unique, ascending and in range, or ``valid`` False, give an
    empty mask. ``count``: a padded selection (0-d; only the first ``count`` entries are real, none at all is
    refused too). Integer and copy work only, so compiling it changes no value."""
    n_frames, per_frame, _ = features.shape
    total = n_frames * per_frame
    if count is None:
        ok = (source[0] >= 0) & (source[-1] < total) & (source[1:] > source[:-1]).all()
        safe = source.clamp(0, total - 1)
    else:
        real = torch.arange(source.shape[0], device=source.device) < count
        ascending = (source[1:] > source[:-1]) | ~real[1:]
        ok = real[0] & (source[0] >= 0) & ((source < total) | ~real).all() & ascending.all()
        safe = torch.where(real, source.clamp(0, total - 1), total)
    if valid is not None:
        ok = ok & valid
    mask = torch.zeros(total + 1, dtype=torch.bool, device=features.device).index_fill_(0, safe, True)
    mask = mask[:total] & ok
    if new is None:
        return mask.view(n_frames, per_frame), None, None, None
    rank = torch.cat([(mask.cumsum(0) - 1).clamp(min=0), torch.full((1,), source.shape[0], device=mask.device)])
    return mask.view(n_frames, per_frame), safe, new.to(features.device, features.dtype), rank


def _padded_splicer(cuda: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
    """:func:`splice` for padded selections, compiled for CUDA inputs when Triton is there (its ~20 small
    kernels become a few; a padded selection's shapes are fixed per video shape, while an exact one's
    follow its count, so only padded ones are compiled); exact either way, so without Triton it runs as
    it is."""
    from torch.utils._triton import has_triton

    if not cuda or not has_triton():
        return splice
    from llava.model.compiled_select import compiled

    return compiled(
        splice, "the registry's splice of padded selections", key=splice,
        alternatives="the method's execution=eager",
    )  # fmt: skip


@dataclass(frozen=True)
class CompressionSpec:
    """What to do to each video of a request: method name, retention R and its options.

    ``none`` (the default) keeps every token. ``options`` are the method's knobs, bare or under the
    method's name; they are parsed once, here, into the method's options dataclass (``config``).
    """

    compressor: str = "none"
    retention: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    config: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        method = get_method(self.compressor)  # fail early on a bad name
        check_retention(self.retention)
        options = method_options(self.compressor, self.options)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "config", parse_options(self.label, method.options, options))

    @property
    def method(self) -> Method:
        return get_method(self.compressor)

    @property
    def label(self) -> str:
        return self.method.label or self.compressor

    @property
    def is_identity(self) -> bool:
        """True when every token is kept, whatever the video."""
        return self.compressor == "none" or float(self.retention) >= 1.0

    @property
    def selects_before_llm(self) -> bool:
        """True when the method changes the video's tokens before the language model."""
        return not self.is_identity and self.method.select is not None

    def llm_plan(self, num_layers: int) -> InLLMPlan | None:
        """The in-LLM plan of one request on an LM of ``num_layers`` layers (None: nothing to do there,
        also when the method's in-LLM or decode stage is an option that is off)."""
        if self.is_identity or self.method.plan is None:
            return None
        return self.method.plan(num_layers, float(self.retention), self.config)

    @property
    def signals(self) -> frozenset[str]:
        """The model signals the method needs beyond the features and the grid (none when identity)."""
        return frozenset() if self.is_identity else self.method.signals_for(self.config) - {GRID}

    @property
    def tower_signals(self) -> frozenset[str]:
        """The signals the vision tower computes for the method (those read inside the LM excluded)."""
        return self.signals - IN_LLM_SIGNALS

    def check_supported(self, family: str, supplied: Iterable[str], hint: str = "") -> None:
        """Raise, before any work, when model family ``family`` cannot supply a signal the method needs
        (``hint``: the family's word on how to get the missing ones, appended)."""
        supplied = set(supplied)
        missing = sorted(self.signals - supplied)
        if missing:
            raise ValueError(
                f"compressor {self.compressor!r} needs the signal(s) {missing}, which model family {family!r} "
                f"cannot supply (it supplies: {', '.join(sorted(supplied)) or 'none'})" + (f"; {hint}" if hint else "")
            )

    # ------------------------------------------------------------------ selection
    def keep_indices(self, features: torch.Tensor) -> torch.Tensor:
        """(F, P, D) of one video -> kept flat indices (K,) int64 ascending (select-only methods)."""
        return get_compressor(self.compressor)(features, float(self.retention), self.config)

    def keep_mask(self, features: torch.Tensor) -> torch.Tensor:
        """(F, P, D) of one video -> keep mask (F, P) bool, without a host synchronisation.

        An all-False mask means the compressor refused the input (VidCom2: non-finite features).
        """
        return self.keep_masks([features])[0]

    def keep_masks(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each video's (F, P) keep mask, in order, for a select-only method that needs no signal.

        Videos of one shape, dtype and device go to the method's mask form together (one launch
        sequence, one graph replay on CUDA, for the whole group); each keeps its own budget.
        """
        for i, video in enumerate(videos):
            if not isinstance(video, torch.Tensor) or video.dim() != 3:
                got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
                raise ValueError(f"video {i}: features must be a (F, P, D) tensor of one video, got {got}")
        mask_fn = self.method.masks
        if mask_fn is None:
            return [self._mask_from_indices(video) for video in videos]
        groups: dict[tuple, list[int]] = {}
        for i, video in enumerate(videos):
            groups.setdefault((tuple(video.shape), video.dtype, video.device), []).append(i)
        masks: list[torch.Tensor] = [torch.empty(0)] * len(videos)
        for members in groups.values():
            selected = mask_fn([videos[i] for i in members], float(self.retention), self.config)
            for i, mask in zip(members, selected, strict=True):
                masks[i] = mask
        return masks

    def select_videos(self, videos: Sequence[VideoTokens]) -> list[SelectedVideo]:
        """Each video's output tokens as a source mask and, for merging methods, a new feature table.

        Select-only methods without signals take the batched mask path (no host synchronisation);
        every other method runs per video and its output is checked (sources unique, ascending, in
        range; new features (K, D)).
        """
        method = self.method
        if not method.merges and not method.signals - IN_LLM_SIGNALS:
            return [SelectedVideo(mask) for mask in self.keep_masks([v.features for v in videos])]
        out = []
        for i, video in enumerate(videos):
            missing = sorted(self.tower_signals - set(video.signals))
            if missing:
                raise ValueError(f"video {i}: compressor {self.compressor!r} needs signal(s) {missing}, not supplied")
            selection = method.select(video, float(self.retention), self.config)
            out.append(self._spliced(i, video, selection))
        return out

    def _spliced(self, i: int, video: VideoTokens, selection: VideoSelection) -> SelectedVideo:
        """The selection as a source mask (and a table for merging methods), checked on the device: sources
        that are not unique, ascending and in range, or a refused input (``valid`` False), give an empty
        mask, which the adapter's one count read reports (:meth:`check_kept`). No host sync here."""
        features = video.features
        dim = features.shape[-1]
        source = selection.source
        which = f"video {i}: compressor {self.compressor!r}"
        if not isinstance(source, torch.Tensor) or source.dim() != 1 or source.dtype != torch.int64:
            got = f"{tuple(source.shape)} {source.dtype}" if isinstance(source, torch.Tensor) else type(source).__name__
            raise ValueError(f"{which} returned sources {got}; expected a (K,) int64 tensor")
        count = int(source.numel())  # a shape: no sync
        if count == 0:
            raise ValueError(f"{which} kept no video token")
        new = selection.features
        if new is not None and tuple(new.shape) != (count, dim):
            got = tuple(new.shape)
            raise ValueError(f"{which} returned features {got} for {count} sources; expected ({count}, {dim})")
        source = source.to(features.device)
        valid = None if selection.valid is None else selection.valid.to(features.device)
        if selection.count is None:
            mask, sources, values, rank = splice(features, source, new, None, valid)
        else:  # padded outputs: one fused function (compiled on CUDA)
            padded = _padded_splicer(features.is_cuda)
            mask, sources, values, rank = padded(features, source, new, selection.count.to(source.device), valid)
        return SelectedVideo(mask, values, sources, rank, None if new is None else features)

    def _mask_from_indices(self, features: torch.Tensor) -> torch.Tensor:
        """The index-only methods' mask, built on the device from their indices (checked: a broken
        plug-in must fail loudly, never run uncompressed or empty)."""
        n_frames, per_frame = features.shape[0], features.shape[1]
        indices = self.keep_indices(features)
        valid = isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.dtype == torch.int64
        if not valid or not len(indices):
            tensor = isinstance(indices, torch.Tensor)
            got = f"{tuple(indices.shape)} {indices.dtype}" if tensor else type(indices).__name__
            raise ValueError(
                f"compressor {self.compressor!r} returned {got}; expected a non-empty (K,) int64 tensor of flat indices"
            )
        mask = torch.zeros(n_frames * per_frame, dtype=torch.bool, device=features.device)
        return mask.index_fill_(0, indices.to(features.device), True).view(n_frames, per_frame)

    def check_kept(self, kept: Sequence[int]) -> None:
        """Raise for the first video of a request that kept nothing (``kept``: counts per video, read in
        the caller's one sync). A method keeps at least one token of valid input unless it declares
        otherwise (``Method.empty_reason``), so an empty selection means the method refused the input
        (non-finite features or signals), returned invalid sources (see :meth:`select_videos`) or met
        the case it declares."""
        for i, count in enumerate(kept):
            if count == 0:
                which = f"video {i} of {len(kept)}: " if len(kept) > 1 else ""
                reason = NON_FINITE_MESSAGE
                if self.method.merges or self.method.signals - IN_LLM_SIGNALS:
                    reason = (
                        "features or signals contain NaN or Inf, or the method returned sources that are not "
                        "unique, ascending and within the video"
                    )
                if self.method.empty_reason:
                    reason += f"; or {self.method.empty_reason}"
                raise ValueError(f"{which}{self.describe()} kept no video token: {reason}")

    def describe(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.compressor}@{self.retention:g}" + (f"[{opts}]" if opts else "")


def compress_video(features: torch.Tensor, spec: CompressionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, P, D) -> (kept tokens (K, D) in original order, kept flat indices (K,)), select-only methods."""
    indices = spec.keep_indices(features)
    return features.reshape(-1, features.shape[-1]).index_select(0, indices), indices


def describe_methods() -> list[dict[str, Any]]:
    """One row per registered method: name, stages, select/merge, signals, option defaults (listings)."""
    return [
        {
            "name": m.name,
            "stages": [s.value for s in m.stages],
            "merges": m.merges,
            "signals": sorted(m.signals),
            "options": option_defaults(m.options),
            "summary": m.summary,
        }
        for m in (get_method(n) for n in available_compressors())
    ]
