"""What a compression method is, in types only: the contract between methods, the registry and models.

A method module (``llava/model/<name>.py``) imports only torch and this module. It exports one
:class:`Method`: its name, the stages it acts in, an options dataclass holding every knob, the signals
it needs from the model, and its functions. The registry (:mod:`llava.model.compression`) lists the
methods; model families declare which signals they supply, so an unsupported pair fails before any work.

Pre-LLM methods work on one video at a time:

    VideoTokens(features (F, P, D), grid (F, h, w), signals {name: tensor}) , R, options
        -> VideoSelection(source (K,) int64 ascending into F*P, features (K, D) or None)

A select-only method returns the kept indices as ``source`` (``features`` None: the tokens stay as they
are). A merging method also returns the new vectors: output token k replaces the video token
``source[k]`` (the token itself, or its group's anchor). Adapters derive everything else from the
sources: LLaVA order and newlines, Qwen M-RoPE positions (the source's (t, h, w)), Qwen3-VL DeepStack
rows (the source's row). Sources are unique and ascending, so output tokens enter the LM in video order.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

import torch


class Stage(str, Enum):
    """Where a method acts."""

    PRE_LLM = "pre_llm"  # on each video's tokens, before the language model
    IN_LLM = "in_llm"  # at layer boundaries of the language model's prefill
    DECODE = "decode"  # on the KV cache while decoding


# Signals a method may need beyond the video's tokens. Every tensor is per video, float32, on the
# features' device; P is the video's tokens per frame (after the model's pooling / 2x2 merge).
GRID = "grid"  # (F, h, w) of the token grid: always supplied, as VideoTokens.grid
VIT_RECEIVED_ATTENTION = "vit_received_attention"
"""(F, P): attention each patch receives in the vision tower's feature layer, within its frame: the mean
over heads and query rows of softmax(q k^T / sqrt(d)), pooled onto the token grid like the features."""
VIT_KEYS = "vit_keys"
"""(F, P, d): the feature layer's raw keys (no RoPE), averaged over heads, pooled like the features."""
FRAME_SALIENCE = "frame_salience"
"""(F, P): FastVID's per-frame salience. LLaVA: the SigLIP attention-pooling head's probe attention over
the frame's patches (head mean), pooled like the features. Qwen: in the last vision block, the attention
of the frame's mean query over its merge units' mean keys (both after RoPE), head mean."""
FRAME_GLOBAL = "frame_global"
"""(F, G): one vector per frame for FastVID's segmentation. LLaVA: the SigLIP attention-pooling head's
output; Qwen: the mean of the frame's merged embeddings."""
QUESTION_TOKENS = "question_tokens"
"""The question's token embeddings at the LM input (in-LLM methods)."""
LLM_ATTENTION_ROWS = "llm_attention_rows"
"""In-LLM: the attention statistic of a boundary's query rows (LayerState.scores), which the layer-wise
driver computes from a layer's own query and keys (llava.model.attention_rows)."""

SIGNALS = (GRID, VIT_RECEIVED_ATTENTION, VIT_KEYS, FRAME_SALIENCE, FRAME_GLOBAL, QUESTION_TOKENS, LLM_ATTENTION_ROWS)


@dataclass(frozen=True)
class VideoTokens:
    """One video as a pre-LLM method sees it.

    features: (F, P, D) the tokens compression chooses from (model dtype).
    grid: (F, h, w) with h * w == P, row-major tokens within a frame.
    signals: the signals the method declared, by name (see the constants above).
    family: llava_onevision, llava_video, qwen2_vl, qwen2_5_vl, qwen3_vl (or "" when unknown).
    """

    features: torch.Tensor
    grid: tuple[int, int, int]
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)
    family: str = ""  # the model family, for methods whose reference has per-model variants (FastVID)

    def signal(self, name: str) -> torch.Tensor:
        try:
            return self.signals[name]
        except KeyError:
            have = ", ".join(sorted(self.signals)) or "none"
            raise ValueError(f"signal {name!r} was not supplied (have: {have})") from None


@dataclass(frozen=True)
class VideoSelection:
    """A pre-LLM method's output for one video.

    source: (K,) int64, unique and ascending, flat indices into the video's F*P tokens.
    features: (K, D) new token values for merging methods, aligned with ``source``; None for select-only
        methods (the output tokens are the sources' own features).
    valid: optional 0-d bool tensor on the features' device, False when the method refuses the input
        (e.g. non-finite features). It lets a method skip a host synchronisation of its own: the adapter
        reads it with the kept counts, in its one sync, and raises then.
    count: optional 0-d int64 tensor for a kept count the data decides: only the first ``count`` entries
        of ``source`` / ``features`` are the selection, the rest padding (sources >= F * P). With it a
        method returns padded outputs instead of reading the count itself; the adapter's read covers it.
    """

    source: torch.Tensor
    features: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    count: torch.Tensor | None = None


@dataclass(frozen=True)
class Boundary:
    """Where an in-LLM method acts: before decoder layer ``layer`` runs (0 < layer < L).

    rows: whose attention it reads: "last" (the last prompt token) or "marked" (the rows its plan marked,
    e.g. SparseVLM's raters; each sees keys up to itself). source: "previous" = the attention of layer
    ``layer - 1`` as it ran (FastV, SparseVLM, HoliTom); "probe" = layer ``layer``'s own projections on
    its input, computed before it runs (PDrop).
    """

    layer: int
    rows: str = "last"
    source: str = "previous"


@dataclass(frozen=True)
class LayerState:
    """The batch at a boundary. hidden (B, L, D) entering the layer; valid (B, L) real tokens (left
    padded); visual (B, L) the video tokens still in; scores (B, L) float32: the requested rows'
    attention, softmax per head, head mean, mean over rows; visual_before / visual_now: per row, video
    tokens at the LM input and now (host ints)."""

    layer: int
    hidden: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    scores: torch.Tensor
    visual_before: tuple[int, ...]
    visual_now: tuple[int, ...]


@dataclass(frozen=True)
class LayerAction:
    """What an in-LLM method keeps at a boundary. keep (B, L) bool over the current tokens (only video
    tokens are read: text always stays); kept_counts: video tokens kept per row (host ints, = keep's
    count per row: they size the shorter batch without a sync); values: optional (B, L, D) new hidden
    states (merging methods), read at the kept tokens."""

    keep: torch.Tensor
    kept_counts: tuple[int, ...]
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class MarkedRows:
    """The query rows "marked" boundaries read. mask (B, L) bool over the LM input; within_last: every
    marked row is among the last ``within_last`` positions of the left-padded batch (host int), so the
    driver reads only those query rows (O(H * within_last * L) per layer, never an L x L map). Later
    boundaries drop only video tokens, which never moves a token away from its row's end, so the bound
    holds at every boundary."""

    mask: torch.Tensor
    within_last: int


@dataclass(frozen=True)
class DecodeStep:
    """What a decode-time plan sees at one step, for layer ``InLLMPlan.decode_layer - 1``.

    step: 0 for the first generated token fed back (the prompt's logits chose it), then 1, 2, ...
    scores: (B, K) float32, the current token's attention over that layer's keys (K = the prompt's keys
        as the cache holds them, the generated tokens, the current one), softmax per head, head mean.
    key_valid: (B, K) bool, keys that are not padding. visual: (B, K) bool, the prompt's video tokens
        among those keys (False for every generated key). prompt_keys: the prompt's part of K (host int).
    visual_counts: video keys per row (host ints). memory: a dict the plan keeps its state in, one per
        request (created at prefill), so nothing carries over from one request to the next.
    """

    step: int
    scores: torch.Tensor
    key_valid: torch.Tensor
    visual: torch.Tensor
    prompt_keys: int
    visual_counts: tuple[int, ...]
    memory: dict[str, Any]


class InLLMPlan:
    """An in-LLM method's plan for one request: its boundaries, its position rule ("inherit": kept
    tokens keep their positions and decoding continues from the uncompressed length; "compact":
    renumbered 0..n-1 after each boundary, each later layer group decoding from its own length), and
    :meth:`act`. Subclasses override what they use.

    A decode-time method (DyCoke's DP) sets ``decode_layer`` = l: at every decode step the driver reads
    the current token's attention row at layer l - 1 and layers >= l attend only to the keys
    :meth:`decode_act` returns (the cache itself stays whole). None (the default) costs decoding nothing.
    """

    boundaries: tuple[Boundary, ...] = ()
    positions: str = "inherit"
    full_map: bool = False  # attention=eager: read rows from the layer's whole (B, H, L, L) map (memory comparisons)
    decode_layer: int | None = None

    def mark_rows(self, embeds: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """(B, L) bool rows whose attention "marked" boundaries read, from the LM input; None if unused."""
        return None

    def mark_prompt(
        self,
        embeds: torch.Tensor,
        visual: torch.Tensor,
        valid: torch.Tensor,
        lengths: Sequence[int],
        visual_counts: Sequence[int],
    ) -> MarkedRows | None:
        """The marked rows with a bound on where they are (see :class:`MarkedRows`); ``lengths`` /
        ``visual_counts``: per row, real and video tokens (host ints). The default wraps :meth:`mark_rows`
        with no bound (every row is read)."""
        mask = self.mark_rows(embeds, visual, valid)
        return None if mask is None else MarkedRows(mask, int(embeds.shape[1]))

    def act(self, boundary: Boundary, state: LayerState) -> LayerAction:
        raise NotImplementedError

    def decode_act(self, step: DecodeStep) -> torch.Tensor | None:
        """(B, K) bool: the keys layers >= ``decode_layer`` may attend to at this step (padding is masked
        by the driver anyway), or None for every key."""
        raise NotImplementedError


InLLMPlanner = Callable[[int, float, Any], "InLLMPlan | None"]
"""(number of LLM layers, R, options) -> the plan of one request (None: nothing to do inside the LLM)."""

PreLLMSelect = Callable[[VideoTokens, float, Any], VideoSelection]
MaskSelect = Callable[[Sequence[torch.Tensor], float, Any], torch.Tensor]
"""Batched select-only form: B same-shape videos (F, P, D), R, options -> (B, F, P) bool keep masks,
computed without a host synchronisation, each video on its own budget (all-False = refused input)."""


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    options: the dataclass of its knobs (defaults = the reference algorithm); built once per spec by
        :func:`parse_options` from ``{name: value}`` (strings from a command line are converted).
    signals: names of the signals it needs (besides the features and the grid).
    select: the pre-LLM function (per video); None for methods acting only inside the LLM.
    plan: the in-LLM planner ``(layers, R, options) -> InLLMPlan | None``; None for methods acting only
        before it. A method whose in-LLM or decode stage is an option returns None when it is off.
    masks: optional batched mask form of a select-only ``select`` (used by the models' fast path).
    merges: True when ``select`` may return new feature values.
    summary: one line for listings.
    label: the name messages use (e.g. "VidCom2"); the registry name when empty.
    needs: optional ``options -> signals``, for methods whose switches change what they read (e.g. a
        port that scores by feature norm needs no attention); ``signals`` is then the most it may need.
    empty_reason: how a valid input can keep no token, for a method whose padded selection reports that
        only through its count (the adapter's message names it beside the non-finite case).
    """

    name: str
    options: type
    stages: tuple[Stage, ...] = (Stage.PRE_LLM,)
    signals: frozenset[str] = frozenset()
    select: PreLLMSelect | None = None
    masks: MaskSelect | None = None
    merges: bool = False
    summary: str = ""
    needs: Callable[[Any], frozenset[str]] | None = None
    label: str = ""  # how messages name the method (default: its name)
    plan: InLLMPlanner | None = None  # the in-LLM planner (methods acting inside the LM)
    empty_reason: str = ""

    def __post_init__(self) -> None:
        if not is_dataclass(self.options):
            raise TypeError(f"method {self.name!r}: options must be a dataclass, got {self.options!r}")
        unknown = set(self.signals) - set(SIGNALS)
        if unknown:
            raise ValueError(f"method {self.name!r} declares unknown signal(s) {sorted(unknown)}; known: {SIGNALS}")
        if Stage.PRE_LLM in self.stages and self.select is None:
            raise ValueError(f"method {self.name!r} acts before the LLM but has no select function")
        if (Stage.IN_LLM in self.stages or Stage.DECODE in self.stages) and self.plan is None:
            raise ValueError(f"method {self.name!r} acts inside the LLM but has no plan function")

    def signals_for(self, options: Any) -> frozenset[str]:
        """The signals the method reads with these options."""
        return frozenset(self.needs(options)) if self.needs is not None else self.signals


@dataclass(frozen=True)
class NoOptions:
    """A method without knobs."""


# ------------------------------------------------------------------------------- options parsing

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(owner: str, key: str, kind: Any, value: Any) -> Any:
    """``value`` (a command-line string or a Python value) as the field type ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return _convert(owner, key, members[0], value)
    if origin is tuple:
        (item, *_) = typing.get_args(kind) or (str,)
        parts = value
        if isinstance(value, str):
            parts = [p for p in value.replace(";", "/").replace(",", "/").split("/") if p.strip()]
        return tuple(_convert(owner, key, item, p) for p in parts)
    if kind is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{owner} option {key} expects true/false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{owner} option {key} expects a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{owner} option {key} expects a number, got {value!r}") from None
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"{owner} option {key} expects an integer, got {value!r}")
            return int(number)
        return number
    return str(value).strip() if isinstance(value, str) else value


def parse_options(owner: str, cls: type, options: Mapping[str, Any] | Any | None) -> Any:
    """``cls`` (an options dataclass) from None, an instance, or ``{field: value}``.

    Strings are converted to each field's annotated type; unknown names raise, listing the valid ones,
    so a typo on a command line never goes unnoticed. The dataclass's own ``__post_init__`` checks ranges.
    """
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown {owner} option(s) {unknown}; valid options: {', '.join(valid) or 'none'}")
    return cls(**{key: _convert(owner, key, hints[key], value) for key, value in options.items()})


def option_defaults(cls: type) -> dict[str, Any]:
    """{field: default} of an options dataclass (for listings and docs)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def check_choice(owner: str, key: str, value: str, allowed: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``allowed`` (options ``__post_init__`` helper)."""
    if value not in allowed:
        raise ValueError(f"{owner} option {key}={value!r} is not one of {', '.join(allowed)}")


STATIC_EXECUTIONS = ("compiled", "static", "eager")
"""The executions of a method with a static-shape formulation (FastVID, HoliTom): compiled, the same
formulation uncompiled, or the eager path sized by a host read."""


def check_static_execution(owner: str, execution: str | None, seed: int | None, why: str) -> None:
    """Raise for an unknown ``execution``, or for ``seed`` with a static one (``why``: what the seeded draws
    need that only the eager path's host layout knows)."""
    if execution is not None:
        check_choice(owner, "execution", execution, STATIC_EXECUTIONS)
    if seed is not None and execution in ("compiled", "static"):
        raise ValueError(f"{owner} option seed {why}: it needs execution=eager (or None), not {execution!r}")


def read_padded(selection: VideoSelection) -> tuple[VideoSelection, bool]:
    """A padded selection cut to its count, and its validity: one host read of both together."""
    count, ok = torch.stack([selection.count, selection.valid.long()]).tolist()
    return VideoSelection(selection.source[:count], selection.features[:count]), bool(ok)


def check_range(owner: str, key: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise unless low <= value <= high (low < value with ``low_open``)."""
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{owner} option {key} must be in {bracket}{low}, {high}], got {value}")


def selecting(indices_of: Callable[[torch.Tensor, float, Any], torch.Tensor]) -> PreLLMSelect:
    """A pre-LLM select function from a select-only index function ``(features (F, P, D), R, options) -> kept
    flat indices (K,)``: the shape of VidCom2, DyCoke, random and uniform."""

    def select(video: VideoTokens, retention: float, options: Any) -> VideoSelection:
        return VideoSelection(indices_of(video.features, retention, options))

    return select

