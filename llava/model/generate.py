"""The LLaVA family's language model as the layer-wise driver sees it (llava.model.lm_driver).

The visual block is spliced into ``inputs_embeds`` and positions may skip (original-position mode), so
the prompt is a batch of embedding sequences with explicit positions; :func:`pad_left` lays them out
left padded, and :func:`llava_stack` says where the Qwen2 decoder's parts are. Prefill and decoding are
the driver's, shared with the Qwen-VL family.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel

from llava.model.lm_driver import DecoderStack, LMInputs


def pad_left(
    sequences: list[torch.Tensor],
    positions: list[torch.Tensor],
    next_positions: list[int],
    visual: list[torch.Tensor],
    visual_counts: list[int],
) -> LMInputs:
    """Stack (L_i, D) embeddings, (L_i,) positions and (L_i,) video-token flags with left padding
    (zeros, invalid, position 0)."""
    if not sequences:
        raise ValueError("empty batch")
    longest = max(s.shape[0] for s in sequences)
    first = sequences[0]
    batch = len(sequences)
    nxt = torch.tensor(next_positions, dtype=torch.long, device=first.device)
    lengths = tuple(int(s.shape[0]) for s in sequences)
    if batch == 1:  # nothing to pad: views, no copies (a short prefill is launch-bound)
        valid = torch.ones((1, longest), dtype=torch.bool, device=first.device)
        pos = positions[0].long()[None, None]
        return LMInputs(first[None], valid, pos, nxt[None], visual[0][None], lengths, tuple(visual_counts))
    embeds = first.new_zeros((batch, longest, first.shape[-1]))
    valid = torch.zeros((batch, longest), dtype=torch.bool, device=first.device)
    is_visual = torch.zeros((batch, longest), dtype=torch.bool, device=first.device)
    pos = torch.zeros((batch, longest), dtype=torch.long, device=first.device)
    for i, (seq, p, v) in enumerate(zip(sequences, positions, visual, strict=True)):  # one copy per request
        start = longest - seq.shape[0]
        embeds[i, start:] = seq
        valid[i, start:] = True
        pos[i, start:] = p
        is_visual[i, start:] = v
    return LMInputs(embeds, valid, pos[None], nxt[None], is_visual, lengths, tuple(visual_counts))


def static_step(
    lm: PreTrainedModel, cache: Cache, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One decode token per row on a static cache: the stock forward the static / compiled decode modes
    run (module level, so a compiled step is keyed by it). positions (B, 1); returns (B, V) float32."""
    out = lm(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )
    return out.logits[:, -1].float()


def llava_stack(lm: PreTrainedModel, *, split: bool = False) -> DecoderStack:
    """The Qwen2ForCausalLM of a LLaVA checkpoint as a :class:`DecoderStack` (1-D positions); ``split``:
    the model is dispatched over several devices (llava.placement.is_split of the whole model)."""
    body = lm.model
    return DecoderStack(
        embed=body.embed_tokens,
        layers=body.layers,
        norm=body.norm,
        head=lm.lm_head,
        rotary=body.rotary_emb,
        config=lm.config,
        rope_rows=1,
        static_model=lm,
        static_step=static_step,
        static_positions=lambda nxt: nxt[0][:, None],
        split=split,
    )
