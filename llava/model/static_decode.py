"""Opt-in faster decoding: a static KV cache filled from the prefill, and optionally one compiled step.

Why: eager decoding feeds one token at a time through a DynamicCache, so on a GPU it is bound by kernel
launches (tens of ms per token for a 7B model, against a few ms to read the weights). With a static
cache every decode step has the same shapes, so the step can be compiled with
``torch.compile(mode="reduce-overhead")`` and replayed as a CUDA graph.

Both model families share this module; each supplies a ``forward(model, cache, tokens, mask, positions)
-> logits (B, V) float32`` for one token per row. The prefill is not touched: it still runs eagerly on a
DynamicCache (same time to first token, same first token). :func:`start_static_decode` then copies the
prefill's keys and values into a transformers ``StaticCache`` of ``prompt_len + max_new_tokens`` slots
rounded up to :data:`CACHE_BUCKET` (bucketing bounds recompiles across requests), and every
:meth:`StaticDecoder.step` writes one slot.

The 2-D mask handed to the model is (B, cache length): the prompt's mask (left padding 0), then 1 for
each generated slot filled so far, 0 beyond; the causal mask built from the cache offset hides the
empty slots as well. Static caches, masks and compiled steps are kept per model instance and per
(mode, batch, cache length, dtype, device), so requests of the same shape reuse one compiled graph.

Modes: ``"static"`` runs the step eagerly (the same numerics route, testable anywhere), ``"compiled"``
compiles it (``fullgraph=True, dynamic=False``); on CUDA the graph is replayed, on the CPU it is only
compiled. One decode at a time per model: a request's decoder must be done before the next request
of the same shape starts (the adapters run requests one after another).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers import Cache, StaticCache
from transformers.cache_utils import StaticLayer

from llava.runtime import check_decode_mode

CACHE_BUCKET = 256  # static cache lengths are multiples of this
MAX_SHAPES_PER_MODEL = 4  # cached (cache, compiled step) entries per model; the least recently used is dropped
# see check_attention; sdpa_varlen (Qwen) keeps its LM on sdpa
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "sdpa_varlen")

# Test hook: a torch.compile backend (name or callable) instead of inductor with CUDA graphs, e.g. one that
# records the captured graph. None in normal use.
_COMPILE_BACKEND: str | Callable[..., Any] | None = None
_ISOLATED = "isolate_recompiles" in inspect.signature(torch.compile).parameters  # torch.compile option, newer torch

StepForward = Callable[[Any, Cache, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def static_cache_length(prompt_len: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """Slots of the static cache: prompt plus new tokens, rounded up to a multiple of ``bucket``."""
    if prompt_len < 1 or max_new_tokens < 1 or bucket < 1:
        raise ValueError(f"need positive sizes, got prompt_len={prompt_len}, max_new_tokens={max_new_tokens}")
    return -(-(prompt_len + max_new_tokens) // bucket) * bucket


def resolve_decode_mode(
    mode: str,
    device: torch.device,
    attn_implementation: str,
    in_llm: bool,
    max_new_tokens: int,
    *,
    split: bool = False,
) -> str:
    """The mode a request decodes in. ``auto``: ``compiled`` on CUDA when the step can be one graph (sdpa or
    eager attention, no in-LLM method keeping shorter caches, more than one token to decode, the model on
    one device), else ``eager``.

    Why compiled: eager decoding is launch-bound (LLaVA-OV-7B on an H200: 16-54 ms/token against 6.3 compiled);
    float32 ids equal eager's, bf16 ids may differ where two logits are within rounding (results/NOTES.md).
    Not on the CPU: inductor's C++ compile would cost more than it saves there. Not on a ``split`` model
    (llava.placement): one static cache and one graph cannot span the devices its layers sit on, so static
    and compiled are refused there and ``auto`` decodes eagerly (results say ``decode_mode: eager``)."""
    check_decode_mode(mode)
    if split and mode in ("static", "compiled"):
        raise ValueError(
            f"decode_mode={mode!r} copies the KV cache into one static cache replayed as one graph; this model "
            "is split over devices (device_map), each layer's cache on its own device: use decode_mode=eager or auto"
        )
    if mode != "auto":
        return mode
    graphable = attn_implementation in ATTENTION_IMPLEMENTATIONS and not in_llm and max_new_tokens > 1 and not split
    return "compiled" if device.type == "cuda" and graphable else "eager"


def check_attention(attn_implementation: str, mode: str) -> None:
    """Static / compiled decoding needs sdpa or eager attention: flash-attention-2's masking of a static
    cache checks the mask on the host (a graph break and a sync per step). eager needs nothing, and auto
    decodes eagerly where the attention does not allow a static cache (:func:`resolve_decode_mode`)."""
    if mode in ("eager", "auto"):
        return
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"decode_mode={mode!r} needs attn_implementation {' or '.join(ATTENTION_IMPLEMENTATIONS)}, "
            f"got {attn_implementation!r}; load the model with sdpa"
        )


@dataclass
class _Runner:
    """The persistent part of one (model, mode, shape): the cache, the mask buffer and the step."""

    cache: StaticCache
    mask: torch.Tensor
    step: Callable[..., torch.Tensor]
    compiled: bool
    calls: int = 0


_RUNNERS: WeakKeyDictionary[torch.nn.Module, OrderedDict[tuple, _Runner]] = WeakKeyDictionary()


def cached_shapes(model: torch.nn.Module) -> list[tuple]:
    """Keys (forward name, mode, batch, cache length, dtype, device) of the steps kept for ``model``."""
    return list(_RUNNERS.get(model, {}))


def release_static_decode(model: torch.nn.Module) -> None:
    """Drop the static caches and compiled steps kept for ``model`` or any of its submodules (frees the
    caches' memory; the next request of a dropped shape compiles again)."""
    for module in model.modules():
        _RUNNERS.pop(module, None)


def _compile(forward: StepForward) -> Callable[..., torch.Tensor]:
    """One compiled region per runner, so dynamo's recompile limit (8) counts shapes per runner, not per
    process (every runner compiles the same function: without isolation, see :func:`_first_call`)."""
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if _COMPILE_BACKEND is None:
        kwargs["mode"] = "reduce-overhead"
    else:
        kwargs["backend"] = _COMPILE_BACKEND
    if _ISOLATED:
        kwargs["isolate_recompiles"] = True
    return torch.compile(forward, **kwargs)


def _first_call(runner: _Runner) -> Any:
    """Context of a runner's first (compiling) call. Older torch shares one recompile count among all
    runners of a function, and fullgraph turns hitting it into an error: lift it for that call only."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if _ISOLATED or not runner.compiled or runner.calls:
        return contextlib.nullcontext()
    return config.patch({name: max(getattr(config, name), 1024)})


def _build_runner(
    config: Any, forward: StepForward, mode: str, batch: int, length: int, prefill_cache: Cache, mask_dtype: torch.dtype
) -> _Runner:
    """Allocate a runner's cache and mask up front and pick its step (compiled or not)."""
    cache = StaticCache(config=config, max_cache_len=length)
    if len(cache.layers) != len(prefill_cache.layers):
        raise ValueError(f"the prefill cache has {len(prefill_cache.layers)} layers, the config {len(cache.layers)}")
    for i, layer in enumerate(cache.layers):
        if type(layer) is not StaticLayer:
            raise ValueError(
                f"decode_mode={mode!r} supports full-attention layers only; layer {i} is {type(layer).__name__}"
            )
    first = prefill_cache.layers[0].keys
    cache.early_initialization(  # allocate now: lazy allocation inside a captured graph would break it
        batch_size=batch,
        num_heads=[layer.keys.shape[1] for layer in prefill_cache.layers],
        head_dim=[layer.keys.shape[-1] for layer in prefill_cache.layers],
        dtype=first.dtype,
        device=first.device,
    )
    mask = torch.zeros((batch, length), dtype=mask_dtype, device=first.device)
    torch._dynamo.mark_static_address(mask)  # written in place between replays, read live by the graph
    compiled = mode == "compiled"
    return _Runner(cache=cache, mask=mask, step=_compile(forward) if compiled else forward, compiled=compiled)


class StaticDecoder:
    """One request's decoding on a kept runner: :meth:`step` feeds one token per row."""

    def __init__(self, model: torch.nn.Module, runner: _Runner, slot: int) -> None:
        self._model = model
        self._runner = runner
        self._slot = slot  # the cache slot the next token is written to (a host int: no sync)

    @property
    def cache(self) -> StaticCache:
        """The kept static cache this request decodes on (shared with later requests of its shape)."""
        return self._runner.cache

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, cache length): the prompt's mask, 1 for each generated slot filled so far, 0 beyond."""
        return self._runner.mask

    @property
    def next_slot(self) -> int:
        """The cache slot the next step writes (prompt length + steps so far)."""
        return self._slot

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (B,) at ``positions`` (the family's position_ids for one token); next logits (B, V)."""
        runner = self._runner
        if self._slot >= runner.mask.shape[1]:
            raise RuntimeError(f"the static cache of {runner.mask.shape[1]} slots is full")
        runner.mask[:, self._slot] = 1
        if runner.compiled and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # each step is a new graph replay
        with _first_call(runner):
            logits = runner.step(self._model, runner.cache, tokens, runner.mask, positions)
        runner.calls += 1
        self._slot += 1
        # a replayed graph overwrites its outputs on the next replay: hand out a copy
        return logits.clone() if runner.compiled else logits


@torch.inference_mode()
def start_static_decode(
    model: torch.nn.Module,
    forward: StepForward,
    config: Any,
    prefill_cache: Cache,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    mode: str,
) -> StaticDecoder:
    """Copy the prefill's KV into a kept static cache of this shape and return the request's decoder.

    ``model`` is what ``forward`` receives (and the key the compiled steps are kept under); ``config``
    is the decoder's text config (layer types, attention implementation); ``prompt_mask`` is the
    prompt's (B, L) 2-D mask, L being the prefill cache's length.
    """
    check_decode_mode(mode)
    if mode in ("eager", "auto"):
        raise ValueError("start_static_decode needs decode_mode 'static' or 'compiled' (auto resolved)")
    check_attention(getattr(config, "_attn_implementation", None) or "eager", mode)
    batch, prompt_len = prompt_mask.shape
    cached = prefill_cache.layers[0].keys if prefill_cache.layers else None
    if cached is None or cached.shape[0] != batch or cached.shape[-2] != prompt_len:
        have = None if cached is None else tuple(cached.shape)
        raise ValueError(f"the prefill cache (keys {have}) does not match the prompt mask {tuple(prompt_mask.shape)}")
    length = static_cache_length(prompt_len, max_new_tokens)
    name = f"{getattr(forward, '__module__', '')}.{getattr(forward, '__qualname__', repr(forward))}"
    key = (name, mode, batch, length, cached.dtype, str(cached.device))
    runners = _RUNNERS.setdefault(model, OrderedDict())
    runner = runners.get(key)
    if runner is None:
        runner = _build_runner(config, forward, mode, batch, length, prefill_cache, prompt_mask.dtype)
        runners[key] = runner
        while len(runners) > MAX_SHAPES_PER_MODEL:
            runners.popitem(last=False)
    runners.move_to_end(key)
    for static, dynamic in zip(runner.cache.layers, prefill_cache.layers, strict=True):
        static.keys[:, :, :prompt_len].copy_(dynamic.keys)
        static.values[:, :, :prompt_len].copy_(dynamic.values)
        static.keys[:, :, prompt_len:].zero_()  # stale slots of an earlier request: masked, but keep them finite
        static.values[:, :, prompt_len:].zero_()
        static.cumulative_length.fill_(prompt_len)
    runner.mask[:, :prompt_len].copy_(prompt_mask)
    runner.mask[:, prompt_len:].zero_()
    return StaticDecoder(model, runner, prompt_len)
