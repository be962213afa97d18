"""Prefill and decode for a batch of left-padded embedding sequences, with explicit positions.

Our own loop instead of ``generate``: the visual block is spliced into ``inputs_embeds``, positions
may skip (original-position mode), and the prefill and decode stages are timed separately. It uses
only the public forward of a transformers causal LM (inputs_embeds / input_ids, a 2-D attention
mask, position_ids, a DynamicCache allocated once per request: llava.model.kv_arena). A mask is
always passed, so masking never guesses packed sequences from the positions.
``GenerationOptions.decode_mode`` "static" / "compiled" moves decoding onto a static cache (and a
compiled step) after the unchanged prefill: see llava.model.static_decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from llava.model.kv_arena import arena_cache
from llava.model.static_decode import start_static_decode
from llava.runtime import GenerationOptions, cut_at_stop


@dataclass
class BatchInputs:
    """Left-padded LM inputs. embeds (B, L, D); attention_mask (B, L) 1 = real; position_ids (B, L);
    next_position (B,): position of the first generated token (the uncompressed length in
    original-position mode)."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    next_position: torch.Tensor


def pad_left(sequences: list[torch.Tensor], positions: list[torch.Tensor], next_positions: list[int]) -> BatchInputs:
    """Stack (L_i, D) embeddings and (L_i,) positions with left padding (zeros, mask 0, position 0)."""
    if not sequences:
        raise ValueError("empty batch")
    longest = max(s.shape[0] for s in sequences)
    first = sequences[0]
    embeds = first.new_zeros((len(sequences), longest, first.shape[-1]))
    mask = torch.zeros((len(sequences), longest), dtype=torch.long, device=first.device)
    pos = torch.zeros((len(sequences), longest), dtype=torch.long, device=first.device)
    for i, (seq, p) in enumerate(zip(sequences, positions, strict=True)):  # one copy per request
        embeds[i, longest - seq.shape[0] :] = seq
        mask[i, longest - seq.shape[0] :] = 1
        pos[i, longest - seq.shape[0] :] = p
    nxt = torch.tensor(next_positions, dtype=torch.long, device=first.device)
    return BatchInputs(embeds, mask, pos, nxt)


@torch.inference_mode()
def prefill(lm: PreTrainedModel, batch: BatchInputs, room: int = 0) -> tuple[torch.Tensor, DynamicCache]:
    """Run the prompt; returns the last position's logits (B, V) in float32 and the KV cache, allocated
    with room for ``room`` more tokens (see llava.model.kv_arena)."""
    cache = arena_cache(lm.config, room)
    out = lm(
        inputs_embeds=batch.embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.past_key_values


def choose_next_tokens(
    logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) next ids: argmax, or temperature + nucleus sampling (every family)."""
    if not options.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / max(options.temperature, 1e-5), dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > options.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def static_step(
    lm: PreTrainedModel, cache: Cache, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One decode token per row on a static cache: the forward the static / compiled decode modes run
    (module level, so a compiled step is keyed by it). positions (B, 1); returns (B, V) float32."""
    out = lm(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )
    return out.logits[:, -1].float()


@dataclass
class Decoded:
    output_ids: list[list[int]]
    texts: list[str]


@torch.inference_mode()
def decode(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    first_logits: torch.Tensor,
    cache: DynamicCache,
    batch: BatchInputs,
    options: GenerationOptions,
    stop_ids: list[int],
) -> Decoded:
    """Generate up to max_new_tokens per row; a row ends at a stop id or a stop string.

    Output ids include the final stop id; the text excludes special tokens and is cut before the
    first stop string. Finished rows keep feeding a stop id (ignored) so the batch stays rectangular.
    With ``options.decode_mode`` static / compiled the prefill ``cache`` is copied into a static cache first.
    """
    device = first_logits.device
    generator = None
    if options.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(options.seed if options.seed is not None else torch.seed() % (2**63))
    rows = first_logits.shape[0]
    stop_tensor = torch.tensor(stop_ids or [-1], device=device)
    mask = batch.attention_mask
    position = batch.next_position.clone()
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    logits = first_logits
    texts = [""] * rows
    static = None
    if options.decode_mode != "eager" and options.max_new_tokens > 1:
        static = start_static_decode(
            lm, static_step, lm.config, cache, batch.attention_mask, options.max_new_tokens, options.decode_mode
        )
    for _ in range(options.max_new_tokens):
        token = choose_next_tokens(logits, options, generator)
        token = torch.where(finished, stop_tensor[0].clamp(min=0), token)
        steps.append(token)
        newly = torch.isin(token, stop_tensor) & ~finished
        finished |= newly
        if options.stop:
            ids = torch.stack(steps, 1).tolist()
            for i in range(rows):  # host-side string check, per row and step (stop strings only)
                if not finished[i]:
                    text = tokenizer.decode(ids[i], skip_special_tokens=True)
                    if cut_at_stop(text, options.stop) != text:
                        finished[i] = True
        if bool(finished.all()) or len(steps) == options.max_new_tokens:
            break
        if static is not None:
            logits = static.step(token, position[:, None])
            position = position + 1
            continue
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        out = lm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        position = position + 1
    generated = torch.stack(steps, 1).tolist()
    output_ids: list[list[int]] = []
    stop_set = set(stop_ids)
    for i, ids in enumerate(generated):
        end = next((k + 1 for k, t in enumerate(ids) if t in stop_set), len(ids))
        ids = ids[:end]
        text = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), options.stop)
        output_ids.append(ids)
        texts[i] = text
    return Decoded(output_ids, texts)
