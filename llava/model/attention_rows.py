"""Attention rows of chosen queries at one decoder layer, without an L x L map and without leaving SDPA.

In-LLM methods (FastV, PDrop, SparseVLM, HoliTom's inner merge, DyCoke's decode pruning) read how much a
few query rows attend to each key at one layer. Their released code runs that layer eager to get the whole
map. Here every layer keeps its own attention kernel: while the driver (llava.model.lm_driver) runs, the
text config's attention implementation is a thin wrapper registered with transformers' AttentionInterface
that calls the real one (sdpa, flash_attention_2 or eager) and, only when the driver passes a
:class:`RowCapture` for that layer, also computes softmax(q_rows K^T / sqrt(d)) from the very query and key
tensors the layer attends with (after q/k norms and RoPE; keys include the cache). Memory O(H * rows * L).

``RowCapture.full_map`` reproduces the authors' behaviour for memory comparisons: it materialises the
layer's whole (B, H, L, L) float32 map, then reads the same rows from it.
``RowCapture.probe`` runs a layer's attention only to read rows (PDrop scores the next layer's
projections on the current hidden states): the attention output is then zeros and is discarded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

WRAPPED_PREFIX = "vidcom2_rows_"
BASE_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass
class RowCapture:
    """Which query rows to read at one layer, and where the result goes.

    rows (B, R) long: query indices into the layer's current queries; row_valid (B, R) bool (ragged rows
    per sample: SparseVLM's raters); key_valid (B, K) bool: keys a row may see (padding off), K = the
    layer's key length including its cache; row_positions (B, R) long: each row's index among the keys
    (a row sees keys <= its own index: causal), None = every valid key (the last token, a decode token).
    After the layer ran, ``scores`` holds (B, K) float32: softmax over keys per head, head mean, mean over
    the valid rows (zero where no key was visible).
    """

    rows: torch.Tensor
    row_valid: torch.Tensor
    key_valid: torch.Tensor
    row_positions: torch.Tensor | None = None
    full_map: bool = False
    probe: bool = False
    scores: torch.Tensor | None = field(default=None, repr=False)


def _repeat_kv(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, K, d) -> (B, heads, K, d) for grouped-query attention."""
    groups = heads // states.shape[1]
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def row_scores(query: torch.Tensor, key: torch.Tensor, capture: RowCapture, scaling: float) -> torch.Tensor:
    """The statistic of :class:`RowCapture` from one layer's query (B, H, Q, d) and key (B, H_kv, K, d)."""
    batch, heads, _, dim = query.shape
    keys = _repeat_kv(key, heads).float()
    n_keys = keys.shape[-2]
    visible = capture.key_valid[:, None, :].expand(batch, capture.rows.shape[1], n_keys)  # (B, R, K)
    if capture.row_positions is not None:
        visible = visible & (torch.arange(n_keys, device=key.device) <= capture.row_positions[..., None])
    if capture.full_map:  # the authors' way: every query row against every key, then read the rows
        everything = torch.matmul(query.float(), keys.transpose(-1, -2)) * scaling  # (B, H, Q, K)
        index = capture.rows[:, None, :, None].expand(batch, heads, capture.rows.shape[1], n_keys)
        logits = torch.gather(everything, 2, index)
    else:
        index = capture.rows[:, None, :, None].expand(batch, heads, capture.rows.shape[1], dim)
        picked = torch.gather(query, 2, index).float()  # (B, H, R, d)
        logits = torch.matmul(picked, keys.transpose(-1, -2)) * scaling  # (B, H, R, K)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)  # (B, R, K), head mean
    weight = capture.row_valid.float()
    return (probs * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1.0)


def _wrapped(base: str):
    def attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs: Any):
        capture: RowCapture | None = kwargs.pop("row_capture", None)
        if capture is not None:
            capture.scores = row_scores(query, key, capture, kwargs.get("scaling") or query.shape[-1] ** -0.5)
            if capture.probe:
                return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
        if base == "eager":  # transformers keeps eager attention in each model's own module
            forward = sys.modules[type(module).__module__].eager_attention_forward
        else:
            forward = ALL_ATTENTION_FUNCTIONS[base]
        return forward(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{WRAPPED_PREFIX}{base}"
    return attention


for _base in BASE_IMPLEMENTATIONS:
    AttentionInterface.register(f"{WRAPPED_PREFIX}{_base}", _wrapped(_base))


def base_implementation(config: Any) -> str:
    """The attention implementation a text config runs (the real one, also while wrapped)."""
    name = getattr(config, "_attn_implementation", None) or "eager"
    name = name.removeprefix(WRAPPED_PREFIX)
    if name not in BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {name!r}: the layer-wise driver runs {', '.join(BASE_IMPLEMENTATIONS)}"
        )
    return name


@contextmanager
def capturing_rows(config: Any) -> Iterator[str]:
    """While inside, ``config``'s layers attend through the wrapper (so a layer call may pass
    ``row_capture=``); yields the base implementation. Restored on exit, also on errors."""
    base = base_implementation(config)
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = f"{WRAPPED_PREFIX}{base}"  # the text config only, not the vision tower's
    try:
        yield base
    finally:
        config._attn_implementation_internal = previous
