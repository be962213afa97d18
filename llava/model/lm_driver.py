"""One layer-wise prefill and decode for every family's language model, with room for in-LLM methods.

Both families (LLaVA's Qwen2 LM; Qwen2-VL / Qwen2.5-VL / Qwen3-VL's text decoder with M-RoPE and
DeepStack) describe their decoder as a :class:`DecoderStack` (where the embedding, layers, norm, head and
rotary table are) and their prompt as :class:`LMInputs`. The driver runs transformers' own decoder layers
one by one, as the stock forward does, and builds only what the stock forward would build itself: the
rotary table once per position set, and a mask only where one is needed (none at batch 1 without padding,
so SDPA takes its causal flash path; DeepStack rows are added at precomputed flat indices, with no host
synchronisation).

An in-LLM method (llava.model.method_api.InLLMPlan) acts at declared layer boundaries: before layer b
runs, it sees the hidden states, the current visual tokens and the attention statistic it asked for
(llava.model.attention_rows), and keeps a subset (optionally with new values). From layer b on, the
hidden states, positions, masks and the KV cache of later layers are the shorter sequence's; earlier
layers keep their full cache. Layers between two boundaries form a *group*: in decoding each group has
its own key-padding mask and, under the ``compact`` position rule, its own next position.

Ragged batches stay left padded: after a boundary each row keeps its own count and is re-packed to the
left of the new (host-known) length, so nothing waits for the GPU.

"Marked" rows (SparseVLM's raters) are read only within the last ``MarkedRows.within_last`` positions,
never as an L x L map. A plan with a decode stage (``InLLMPlan.decode_layer`` = l, DyCoke's DP) makes
every decode step read the current token's attention row at layer l - 1 and run layers >= l with the key
mask the plan returns (:func:`_decode_step_masked`); without one, decoding does no extra work.

A model split over devices (llava.placement; ``DecoderStack.split``) runs each layer where accelerate put
it: the driver reads every layer's execution device once per request, moves the sequence state (hidden
states, positions, rope tables, masks, keep flags, DeepStack targets, a plan's attention rows) with the
hidden states when the next layer sits elsewhere, and returns the logits to the input device. Each layer's
KV cache is made on its own device by its first update. An unsplit model takes none of these branches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache

from llava.model.attention_rows import RowCapture, base_implementation, capturing_rows
from llava.model.kv_arena import arena_cache
from llava.model.method_api import Boundary, DecodeStep, InLLMPlan, LayerAction, LayerState
from llava.model.static_decode import resolve_decode_mode, start_static_decode
from llava.placement import execution_device
from llava.runtime import GenerationOptions, maybe_stage


@dataclass
class DecoderStack:
    """Where a family's decoder parts are. rope_rows: 1 (1-D positions, LLaVA) or 3 (M-RoPE).

    static_model / static_step: the stock one-token forward on a static cache that the static and
    compiled decode modes run (llava.model.static_decode); static_positions turns the driver's (P, B)
    next positions into that forward's position_ids.
    """

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module
    config: Any
    rope_rows: int = 1
    static_model: nn.Module | None = None
    static_step: Callable[..., torch.Tensor] | None = None
    static_positions: Callable[[torch.Tensor], torch.Tensor] | None = None
    split: bool = False  # the model is dispatched over several devices (llava.placement)
    layer_devices: tuple[torch.device, ...] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # read once per request, and only for a split model: an unsplit one pays nothing per layer
        if self.split:
            self.layer_devices = tuple(execution_device(layer) for layer in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class LMInputs:
    """A left-padded prompt batch.

    embeds (B, L, D); valid (B, L) bool (False = left padding); positions (P, B, L) long (P = rope rows);
    next_position (P, B): the first generated token's position; visual (B, L) bool: the video tokens an
    in-LLM method may drop; lengths / visual_counts: per row, real tokens and video tokens (host ints, so
    shapes after a boundary are known without a sync). deepstack: Qwen3-VL's per-layer (N, D) rows, added
    after layer i's output at deepstack_index (N,) flat positions into B * L.
    """

    embeds: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    next_position: torch.Tensor
    visual: torch.Tensor
    lengths: tuple[int, ...]
    visual_counts: tuple[int, ...]
    deepstack: list[torch.Tensor] | None = None
    deepstack_index: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def padded(self) -> bool:
        return len(set(self.lengths)) > 1 or self.lengths[0] != int(self.embeds.shape[1])

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, L) int64, the stock forward's 2-D mask (1 = real token)."""
        return self.valid.long()

    @property
    def position_ids(self) -> torch.Tensor:
        """The stock forward's position ids: (B, L) for 1-D positions; (4, B, L) for M-RoPE (a running
        text row first, as transformers' Qwen-VL text models take them)."""
        if self.positions.shape[0] == 1:
            return self.positions[0]
        text = (self.valid.long().cumsum(1) - 1).clamp(min=0) * self.valid.long()
        return torch.cat([text[None], self.positions])


def layer_mask(
    base: str, key_valid: torch.Tensor, query_len: int, padded: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """The attention mask one layer call needs: None where the kernel's own causal rule suffices
    (no padding), else the implementation's format. key_valid (B, K) bool; queries are the last
    ``query_len`` keys (prefill: all of them; decode: one)."""
    if not padded and (base != "eager" or query_len == 1):
        return None
    if base == "flash_attention_2":
        return key_valid.long() if padded else None
    n_keys = key_valid.shape[1]
    keys = torch.arange(n_keys, device=key_valid.device)
    queries = keys[n_keys - query_len :, None]
    allowed = key_valid[:, None, None, :] & (keys <= queries)  # (B, 1, q, K)
    allowed = allowed | (keys == queries)  # a padding query sees itself: no empty row, no NaN
    if base == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _gather_seq(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (..., B, L, d) gathered along L at index (B, L') -> (..., B, L', d)."""
    lead = values.dim() - 3
    idx = index.view(*([1] * lead), *index.shape, 1).expand(*values.shape[:-2], index.shape[1], values.shape[-1])
    return torch.gather(values, -2, idx)


@dataclass
class _Group:
    """Layers [start, end) that share a sequence: their keys' validity and, in decoding, next position."""

    start: int
    key_valid: torch.Tensor  # (B, K)
    padded: bool
    next_position: torch.Tensor  # (P, B)
    own_positions: bool = False  # compact rule: this group numbers its own tokens; else group 0's positions
    visual: torch.Tensor | None = None  # (B, K0) the prompt's video keys (read by decode-time plans only)
    visual_counts: tuple[int, ...] = ()  # video keys per row (host ints)


@dataclass
class _Sequence:
    hidden: torch.Tensor  # (B, L, D)
    valid: torch.Tensor  # (B, L)
    visual: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (P, B, L)
    rope: tuple[torch.Tensor, torch.Tensor]
    lengths: list[int]
    visual_counts: list[int]
    where: torch.Tensor  # (B * L0,) current flat position of each original token, -1 once dropped
    extra_rows: torch.Tensor | None = None  # (B, L) bool, e.g. SparseVLM's raters, compacted with the rest
    extra_window: int = 0  # every extra row is among the last extra_window positions (MarkedRows.within_last)

    def moved(self, device: torch.device) -> _Sequence:
        """The sequence state on ``device``: on a split model it follows the hidden states to the next
        layer's device, so positions, masks, keep flags and a plan's inputs sit beside them."""
        return _Sequence(
            self.hidden.to(device), self.valid.to(device), self.visual.to(device), self.positions.to(device),
            (self.rope[0].to(device), self.rope[1].to(device)), self.lengths, self.visual_counts,
            self.where.to(device), _to(self.extra_rows, device), self.extra_window,
        )  # fmt: skip


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None


@dataclass
class PrefillResult:
    """First-token logits (B, V) float32, the cache, the layer groups for decoding and the visual tokens
    entering each layer per row (layer_visual (layers, B), host ints); a plan with a decode stage and the
    state it keeps for this request (memory)."""

    logits: torch.Tensor
    cache: Cache
    groups: list[_Group]
    layer_visual: list[list[int]] = field(default_factory=list)
    plan: InLLMPlan | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    steps: int = 0  # decode steps run so far


def position_rule(rule: str, stack: DecoderStack) -> str:
    """A plan's position rule on this decoder: "auto" is compact on 1-D positions, inherit on M-RoPE."""
    if rule == "auto":
        return "compact" if stack.rope_rows == 1 else "inherit"
    if rule not in ("inherit", "compact"):
        raise ValueError(f"unknown position rule {rule!r}; valid: inherit, compact, auto")
    return rule


def _rope(stack: DecoderStack, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if stack.split:  # the table is computed on hidden's device; a later group's positions may sit elsewhere
        positions = positions.to(hidden.device)
    return stack.rotary(hidden, positions if stack.rope_rows > 1 else positions[0])


def _last_row_capture(seq: _Sequence) -> RowCapture:
    batch, length = seq.valid.shape
    rows = torch.full((batch, 1), length - 1, dtype=torch.long, device=seq.valid.device)
    return RowCapture(rows, torch.ones_like(rows, dtype=torch.bool), seq.valid)


def _rows_capture(seq: _Sequence, boundary: Boundary, probe: bool, full_map: bool) -> RowCapture:
    """The rows a boundary asked for: the last prompt token, or the plan's marked rows (causal)."""
    if boundary.rows == "last":
        capture = _last_row_capture(seq)
    elif boundary.rows == "marked":
        if seq.extra_rows is None:
            raise ValueError("the in-LLM plan asks for marked rows but marked none (InLLMPlan.mark_rows)")
        batch, length = seq.valid.shape
        window = min(seq.extra_window, length)  # the marked rows are among the last `window` positions
        index = torch.arange(length - window, length, device=seq.valid.device).expand(batch, window)
        marked = (seq.extra_rows & seq.valid)[:, length - window :]
        capture = RowCapture(index, marked, seq.valid, row_positions=index)
    else:
        raise ValueError(f"unknown attention rows {boundary.rows!r}; valid: last, marked")
    capture.probe, capture.full_map = probe, full_map
    return capture


def _compact(stack: DecoderStack, seq: _Sequence, action: LayerAction, rule: str) -> _Sequence:
    """Keep ``action.keep`` (B, L) (non-visual tokens always), re-pack left to the new host-known length."""
    keep = action.keep | (seq.valid & ~seq.visual)
    keep = keep & seq.valid
    lengths = [n - v + k for n, v, k in zip(seq.lengths, seq.visual_counts, action.kept_counts, strict=True)]
    new_len = max(lengths)
    batch, length = keep.shape
    lengths_t = torch.tensor(lengths, device=keep.device)
    rank = keep.long().cumsum(1) - 1  # position among the row's kept tokens
    dest = rank + (new_len - lengths_t)[:, None]
    dest = torch.where(keep, dest, new_len)  # dropped tokens go to a spill column, cut below
    index = torch.zeros(batch, new_len + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, dest, torch.arange(length, device=keep.device).expand(batch, length))
    index = index[:, :new_len]
    valid = torch.arange(new_len, device=keep.device)[None] >= (new_len - lengths_t)[:, None]
    hidden = action.values if action.values is not None else seq.hidden
    hidden = torch.gather(hidden, 1, index[..., None].expand(batch, new_len, hidden.shape[-1]))
    positions = torch.gather(seq.positions, 2, index[None].expand(seq.positions.shape[0], batch, new_len))
    if rule == "compact":  # renumber the real tokens 0..n-1 in every rope row
        running = (valid.long().cumsum(1) - 1).clamp(min=0)
        positions = running[None].expand_as(positions).contiguous()
        rope = _rope(stack, hidden, positions)
    else:
        rope = (_gather_seq(seq.rope[0], index), _gather_seq(seq.rope[1], index))
    flat_old = torch.arange(batch, device=keep.device)[:, None] * length + index  # (B, L') old flat positions
    moved = torch.full((batch * length + 1,), -1, dtype=torch.long, device=keep.device)  # + a spill slot
    new_flat = torch.arange(batch, device=keep.device)[:, None] * new_len + torch.arange(new_len, device=keep.device)
    moved.scatter_(0, torch.where(valid, flat_old, batch * length).reshape(-1), new_flat.reshape(-1))  # no host sync
    moved = moved[:-1]
    where = torch.where(seq.where >= 0, moved[seq.where.clamp(min=0)], seq.where)
    visual = torch.gather(seq.visual, 1, index) & valid
    extra = torch.gather(seq.extra_rows, 1, index) & valid if seq.extra_rows is not None else None
    counts = list(action.kept_counts)
    return _Sequence(hidden, valid, visual, positions, rope, lengths, counts, where, extra, seq.extra_window)


def _deepstack_add(hidden: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D) + DeepStack rows (N, D) at their tokens' current flat positions (dropped: none)."""
    flat = hidden.reshape(-1, hidden.shape[-1]).clone()
    alive = where >= 0
    rows = rows.to(device=flat.device, dtype=flat.dtype)  # a split model's layer may sit on another device
    flat.index_add_(0, where.clamp(min=0), rows * alive[:, None].to(flat.dtype))
    return flat.view_as(hidden)


@torch.inference_mode()
def prefill(
    stack: DecoderStack, inputs: LMInputs, *, room: int = 0, plan: InLLMPlan | None = None
) -> PrefillResult:
    """Run the prompt through every layer (an in-LLM ``plan`` acting at its boundaries); the KV cache has
    room for ``room`` more tokens (llava.model.kv_arena). A plan with ``full_map`` reads its attention rows
    from the layer's whole map, as the authors' code does (for memory comparisons)."""
    base = base_implementation(stack.config)
    cache = arena_cache(stack.config, room)
    batch, length = inputs.valid.shape
    boundaries = {b.layer: b for b in (plan.boundaries if plan is not None else ())}
    for b in boundaries:
        if not 0 < b < stack.num_layers:
            raise ValueError(f"in-LLM boundary before layer {b}: the model has layers 0..{stack.num_layers - 1}")
    if plan is not None and plan.decode_layer is not None:
        _check_decode_layer(plan.decode_layer, boundaries, stack.num_layers)
    rope = _rope(stack, inputs.embeds, inputs.positions)
    flat = torch.arange(batch * length, device=inputs.embeds.device)
    seq = _Sequence(
        inputs.embeds, inputs.valid, inputs.visual, inputs.positions, rope,
        list(inputs.lengths), list(inputs.visual_counts), flat,
    )  # fmt: skip
    rule = "inherit"
    if plan is not None:
        marked = plan.mark_prompt(inputs.embeds, inputs.visual, inputs.valid, inputs.lengths, inputs.visual_counts)
        if marked is not None:
            seq.extra_rows, seq.extra_window = marked.mask, int(marked.within_last)
        rule = position_rule(plan.positions, stack)
    padded = inputs.padded
    mask = layer_mask(base, seq.valid, length, padded, inputs.embeds.dtype)
    first = inputs.next_position.clone()  # a copy: decoding advances it
    groups = [_Group(0, seq.valid, padded, first, False, seq.visual, tuple(seq.visual_counts))]
    deepstack = inputs.deepstack or []
    ds_where = seq.where[inputs.deepstack_index] if deepstack else None
    layer_visual: list[list[int]] = []
    hidden = seq.hidden
    pending: RowCapture | None = None
    devices = stack.layer_devices
    with capturing_rows(stack.config) if plan is not None else nullcontext():
        for i, layer in enumerate(stack.layers):
            if devices is not None and devices[i] != hidden.device:  # split: the state follows the layers
                seq.hidden = hidden
                seq, mask, ds_where = seq.moved(devices[i]), _to(mask, devices[i]), _to(ds_where, devices[i])
                hidden = seq.hidden
                if pending is not None and pending.scores is not None:
                    pending.scores = pending.scores.to(devices[i])
            boundary = boundaries.get(i)
            if boundary is not None:
                seq.hidden = hidden
                if boundary.source == "probe":
                    capture = _rows_capture(seq, boundary, probe=True, full_map=plan.full_map)
                    layer.self_attn(
                        hidden_states=layer.input_layernorm(hidden), position_embeddings=seq.rope,
                        attention_mask=None, past_key_values=None, row_capture=capture,
                    )  # fmt: skip
                else:
                    capture = pending
                if capture is None or capture.scores is None:
                    raise RuntimeError(f"layer {i - 1} did not report the attention rows the plan asked for")
                state = LayerState(
                    layer=i, hidden=hidden, valid=seq.valid, visual=seq.visual, scores=capture.scores,
                    visual_before=tuple(inputs.visual_counts), visual_now=tuple(seq.visual_counts),
                )  # fmt: skip
                action = plan.act(boundary, state)
                if len(action.kept_counts) != batch:
                    raise ValueError(f"in-LLM plan returned {len(action.kept_counts)} counts for a batch of {batch}")
                seq = _compact(stack, seq, action, rule)
                if devices is not None:  # the compact rule's fresh rope table comes from the rotary's device
                    seq = seq.moved(devices[i])
                if deepstack:
                    ds_where = seq.where[inputs.deepstack_index]
                hidden = seq.hidden
                padded = len(set(seq.lengths)) > 1
                mask = layer_mask(base, seq.valid, seq.valid.shape[1], padded, hidden.dtype)
                own = rule == "compact"  # else every group continues from the uncompressed length
                next_position = groups[0].next_position
                if own:
                    lengths_t = torch.tensor(seq.lengths, device=hidden.device)
                    next_position = lengths_t[None].expand_as(next_position).contiguous()
                groups.append(_Group(i, seq.valid, padded, next_position, own, seq.visual, tuple(seq.visual_counts)))
            layer_visual.append(list(seq.visual_counts))
            nxt = boundaries.get(i + 1)
            pending = None
            kwargs: dict[str, Any] = {}
            if nxt is not None and nxt.source == "previous":
                pending = _rows_capture(seq, nxt, probe=False, full_map=plan.full_map)
                kwargs["row_capture"] = pending
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=seq.rope, position_ids=None,
                past_key_values=cache, use_cache=True, **kwargs,
            )  # fmt: skip
            if i < len(deepstack):
                hidden = _deepstack_add(hidden, deepstack[i], ds_where)
    logits = _head(stack, hidden[:, -1:])[:, -1].float()
    if devices is not None:
        logits = logits.to(inputs.embeds.device)  # sampling and stop checks run on the entry device
    decoding = plan if plan is not None and plan.decode_layer is not None else None
    return PrefillResult(logits, cache, groups, layer_visual, decoding)


def _check_decode_layer(layer: int, boundaries: Any, num_layers: int) -> None:
    """A decode-time plan reads layer ``layer - 1`` and masks the keys of layers >= ``layer``: both must
    exist and share one key set (no in-LLM boundary at or after ``layer``)."""
    if not 0 < layer < num_layers:
        raise ValueError(f"decode-time plan at layer {layer}: the model has layers 0..{num_layers - 1} (valid 1..)")
    later = sorted(b for b in boundaries if b >= layer)
    if later:
        raise ValueError(
            f"decode-time plan at layer {layer} masks the keys of layer {layer - 1}'s group, but the plan also "
            f"drops tokens before layer(s) {later}, which then hold other keys"
        )


@torch.inference_mode()
def decode_step(stack: DecoderStack, state: PrefillResult, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) through every layer group; returns the next logits (B, V) float32 and
    advances each group's key mask and next position (one rotary table per distinct position). A plan
    with a decode stage (PrefillResult.plan) runs :func:`_decode_step_masked` instead."""
    if state.plan is not None:
        return _decode_step_masked(stack, state, tokens)
    base = base_implementation(stack.config)
    hidden = stack.embed(tokens[:, None])
    ones = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
    ends = [g.start for g in state.groups[1:]] + [stack.num_layers]
    shared = _rope(stack, hidden, state.groups[0].next_position[..., None])
    for group, end in zip(state.groups, ends, strict=True):
        group.key_valid = torch.cat([group.key_valid, _on_device_of(ones, group.key_valid)], dim=1)
        mask = layer_mask(base, group.key_valid, 1, group.padded, hidden.dtype)
        rope = _rope(stack, hidden, group.next_position[..., None]) if group.own_positions else shared
        for i in range(group.start, end):
            if stack.layer_devices is not None and stack.layer_devices[i] != hidden.device:
                hidden, mask, rope = _step_inputs_on(stack.layer_devices[i], hidden, mask, rope)
            hidden = stack.layers[i](
                hidden, attention_mask=mask, position_embeddings=rope, position_ids=None,
                past_key_values=state.cache, use_cache=True,
            )  # fmt: skip
    for group in state.groups:
        if group.own_positions or group is state.groups[0]:
            group.next_position = group.next_position + 1
    return _on_entry(stack, _head(stack, hidden)[:, -1].float(), tokens)


def _on_device_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` where ``like`` is (split models: e.g. the step's (B, 1) key column beside a later group's
    key mask on another GPU); the same tensor when it already is."""
    return tensor if tensor.device == like.device else tensor.to(like.device)


def _step_inputs_on(
    device: torch.device, hidden: torch.Tensor, mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """A decode step's layer inputs on the next layer's device (split models; a layer inside a module the
    map names whole has no hook of its own to move them)."""
    return hidden.to(device), _to(mask, device), (rope[0].to(device), rope[1].to(device))


def _head(stack: DecoderStack, hidden: torch.Tensor) -> torch.Tensor:
    """norm then head, (B, T, D) -> (B, T, V); on a split model each runs where its weights are (a map that
    names only their parent gives them no hook of their own to move the input)."""
    if stack.layer_devices is None:
        return stack.head(stack.norm(hidden))
    normed = stack.norm(hidden.to(execution_device(stack.norm)))
    return stack.head(normed.to(execution_device(stack.head)))



def _on_entry(stack: DecoderStack, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A split model's head may sit on another device than the tokens: the logits go back beside them."""
    return logits.to(tokens.device) if stack.split else logits


def _decode_step_masked(stack: DecoderStack, state: PrefillResult, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`decode_step` for a plan with a decode stage: layer l-1 also reports the current token's
    attention row over its keys (RowCapture, from the layer's own query and keys), the plan answers with
    the keys layers >= l may see (InLLMPlan.decode_act), and those layers attend with that key mask. The
    cache stays whole; layers < l are untouched. Every layer from l on is in the last group (checked at
    prefill)."""
    plan = state.plan
    base = base_implementation(stack.config)
    hidden = stack.embed(tokens[:, None])
    batch = tokens.shape[0]
    ones = torch.ones(batch, 1, dtype=torch.bool, device=tokens.device)
    ends = [g.start for g in state.groups[1:]] + [stack.num_layers]
    shared = _rope(stack, hidden, state.groups[0].next_position[..., None])
    read_at = plan.decode_layer - 1
    with capturing_rows(stack.config):
        for group, end in zip(state.groups, ends, strict=True):
            group.key_valid = torch.cat([group.key_valid, _on_device_of(ones, group.key_valid)], dim=1)
            mask = layer_mask(base, group.key_valid, 1, group.padded, hidden.dtype)
            rope = _rope(stack, hidden, group.next_position[..., None]) if group.own_positions else shared
            for i in range(group.start, end):
                if stack.layer_devices is not None and stack.layer_devices[i] != hidden.device:
                    hidden, mask, rope = _step_inputs_on(stack.layer_devices[i], hidden, mask, rope)
                kwargs: dict[str, Any] = {}
                capture = None
                if i == read_at:
                    where = stack.layer_devices[i] if stack.layer_devices is not None else group.key_valid.device
                    rows = torch.zeros(batch, 1, dtype=torch.long, device=where)
                    capture = RowCapture(rows, torch.ones_like(rows, dtype=torch.bool), group.key_valid.to(where))
                    kwargs["row_capture"] = capture
                hidden = stack.layers[i](
                    hidden, attention_mask=mask, position_embeddings=rope, position_ids=None,
                    past_key_values=state.cache, use_cache=True, **kwargs,
                )  # fmt: skip
                if capture is not None:
                    restricted = _decode_mask(base, plan, state, group, capture, hidden.dtype)
                    mask = mask if restricted is None else _on_device_of(restricted, hidden)
    for group in state.groups:
        if group.own_positions or group is state.groups[0]:
            group.next_position = group.next_position + 1
    state.steps += 1
    return _on_entry(stack, _head(stack, hidden)[:, -1].float(), tokens)


def _decode_mask(
    base: str, plan: InLLMPlan, state: PrefillResult, group: _Group, capture: RowCapture, dtype: torch.dtype
) -> torch.Tensor | None:
    """The attention mask of layers >= decode_layer at this step, from the plan's key choice (None:
    every key, the group's own mask stays)."""
    if capture.scores is None:
        raise RuntimeError(f"layer {plan.decode_layer - 1} did not report the attention row the decode plan asked for")
    n_keys = group.key_valid.shape[1]
    prompt = group.visual.shape[1]
    visual = torch.nn.functional.pad(group.visual, (0, n_keys - prompt), value=False)
    scores = capture.scores.to(group.key_valid.device)  # a split model's layer may sit elsewhere
    step = DecodeStep(state.steps, scores, group.key_valid, visual, prompt, group.visual_counts, state.memory)
    keys = plan.decode_act(step)
    if keys is None:
        return None
    return layer_mask(base, group.key_valid & keys, 1, True, dtype)


def choose_next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) next ids: argmax, or temperature + nucleus sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def trim_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to, not including, the first stop id (every family's result holds these)."""
    stops = set(stop_ids)
    return next((list(ids[:k]) for k, t in enumerate(ids) if t in stops), list(ids))


@dataclass
class Generated:
    """Per row the generated ids up to (not including) the first stop id; the first-token logits (B, V);
    the video tokens entering each layer per row (layers x B host ints: the in-LLM retention)."""

    ids: list[list[int]]
    first_logits: torch.Tensor
    layer_visual: list[list[int]]
    decode_mode: str = "eager"  # the mode the request decoded in (``auto`` resolved)


@torch.inference_mode()
def generate(
    stack: DecoderStack,
    inputs: LMInputs,
    options: GenerationOptions,
    *,
    stop_ids: Sequence[int],
    stop_check: Callable[[torch.Tensor], torch.Tensor] | None = None,
    timer: Any = None,
    plan: InLLMPlan | None = None,
) -> Generated:
    """Prefill (with ``plan`` acting inside) then decode until every row stopped or max_new_tokens.

    A row stops at a stop id (``options.ignore_eos`` ignores them) or when ``stop_check(ids (B, T)) ->
    (B,) bool`` fires (stop strings). ``options.decode_mode`` static / compiled decodes on a static cache
    filled from this prefill (llava.model.static_decode); an in-LLM plan needs eager decoding, since its
    layer groups keep caches of different lengths (``auto`` picks it then). ``timer`` is charged "prefill"
    and "decode"."""
    device = inputs.embeds.device
    mode = resolve_decode_mode(
        options.decode_mode, device, base_implementation(stack.config), plan is not None, options.max_new_tokens,
        split=stack.split,
    )
    static = mode != "eager" and options.max_new_tokens > 1
    if static and plan is not None:
        raise ValueError(
            f"decode_mode={mode!r} runs one static cache of one length and one mask for every "
            "layer; an in-LLM method keeps shorter caches in later layers, a decode-time method masks keys per "
            "step: use decode_mode=eager or auto"
        )
    generator = None
    if options.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(options.seed if options.seed is not None else torch.seed() % (2**63))
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    with maybe_stage(timer, "prefill"):
        state = prefill(stack, inputs, room=0 if static else options.max_new_tokens, plan=plan)
    with maybe_stage(timer, "decode"):
        decoder = None
        if static:
            decoder = start_static_decode(
                stack.static_model, stack.static_step, stack.config, state.cache,
                state.groups[0].key_valid.long(), options.max_new_tokens, mode,
            )  # fmt: skip
        logits = state.logits
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
        filler = stops[0].clamp(min=0)
        steps: list[torch.Tensor] = []
        for step in range(options.max_new_tokens):
            token = choose_next_tokens(logits, options.do_sample, options.temperature, options.top_p, generator)
            token = torch.where(finished, filler, token)
            steps.append(token)
            if not options.ignore_eos:
                finished = finished | torch.isin(token, stops)
            if stop_check is not None:
                finished = finished | stop_check(torch.stack(steps, dim=1)).to(device)
            if step + 1 == options.max_new_tokens or bool(finished.all()):
                break
            if decoder is not None:
                positions = state.groups[0].next_position
                logits = decoder.step(token, stack.static_positions(positions))
                state.groups[0].next_position = positions + 1
            else:
                logits = decode_step(stack, state, token)
    generated = torch.stack(steps, dim=1).tolist()
    trim = () if options.ignore_eos else stop_ids
    return Generated([trim_at_stop(row, trim) for row in generated], state.logits, state.layer_visual, mode)


def layer_average_retention(layer_visual: list[list[int]], row: int, before: int) -> float:
    """Video tokens entering each layer, averaged over layers, over those at the LM input (the
    "equivalent retention" of in-LLM methods)."""
    if not layer_visual or before == 0:
        return 1.0
    return sum(counts[row] for counts in layer_visual) / (len(layer_visual) * before)


def stop_string_check(tokenizer: Any, stops: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``check(ids (B, T)) -> (B,) bool``: rows whose decoded text holds a stop string (None if no stops).
    A host-side check per step, paid only by requests that name stop strings."""
    if not stops:
        return None

    def check(ids: torch.Tensor) -> torch.Tensor:
        texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        return torch.tensor([any(s and s in t for s in stops) for t in texts], device=ids.device)

    return check
